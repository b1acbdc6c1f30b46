//! Counters shared by every replica in Redis.
//!
//! One admission is one Lua script, one round trip: it trims every layer's window, checks
//! room in all of them and records the send in all of them, or in none. Rate layers are
//! sorted sets of send times; concurrency layers are sorted sets of leases scored by their
//! expiry, so a crashed replica's permits come back after `lease_ttl`. Time is Redis'
//! own (`TIME`), so replicas' clocks never disagree about a window. Every key carries the
//! `{prefix}` hash tag: all keys of one admission live in one slot.
//!
//! If Redis is unreachable or slower than `timeout`, the request is decided by a local
//! ledger holding `quota / replicas` (a breaker then skips Redis until a heartbeat finds it
//! again). That ledger mirrors every send this replica made through Redis, so its own
//! recent use still counts; on recovery the mirror is replayed into Redis so the shared
//! windows learn what was sent meanwhile.
//!
//! Redis is one server (`mode = "single"`), a Redis Cluster (`cluster`: every admission's
//! keys share the tag's slot, so its script runs on that slot's primary) or the primary that
//! Sentinels name (`sentinel`: asked at every (re)connection, so a failover is followed once
//! the heartbeat replaces the dead connection).

use crate::state::{Backend, BackendStatus, Clock, Grant, SharedAdaptive};
use crate::config::{RedisMode, StateConfig};
use crate::limit::window::Nanos;
use crate::limit::{
    scaled, BlockKind, Blocked, Demand, Headroom, KeyPart, LayerKey, Ledger, LimitSet, Taken,
};
use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// Trims, checks and records every layer of one request atomically.
///
/// KEYS: one per layer, then the pause key. ARGV: layer count, member, then per layer
/// kind (1 rate, 2 concurrency), ceiling, span in µs (window or lease), ahead, quota.
/// Returns `{1, now_us, tight_key, remaining, reset_us, counts...}`,
/// `{0, wait_us (-1: concurrency), key, 0, 0, counts...}` when a layer blocks, or
/// `{0, pause_us, 0, 1, 0}` while the upstream's pause lasts (no layer involved), where
/// `counts` is each key's use as seen by this admission.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local member = ARGV[2]
local pause = redis.call('PTTL', KEYS[n + 1])
if pause > 0 then return {0, pause * 1000, 0, 1, 0} end
local worst, worst_layer = -2, 0
local counts = {}
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local kind, ceil, span, ahead = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
  local key = KEYS[i]
  if kind == 1 then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - span)
    local count = redis.call('ZCARD', key)
    counts[i] = count
    local room = ceil - ahead
    if count >= room then
      local wait
      if room <= 0 then
        wait = span * (1 + math.floor(ahead / ceil))
      else
        local e = redis.call('ZRANGE', key, count - room, count - room, 'WITHSCORES')
        wait = tonumber(e[2]) + span - now
      end
      if wait < 1 then wait = 1 end
      if worst ~= -1 and wait > worst then worst, worst_layer = wait, i end
    end
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local count = redis.call('ZCARD', key)
    counts[i] = count
    if count + ahead >= ceil then worst, worst_layer = -1, i end
  end
end
if worst ~= -2 then
  local out = {0, worst, worst_layer, 0, 0}
  for i = 1, n do out[#out + 1] = counts[i] end
  return out
end
local tight, remaining, reset = 0, -1, 0
for i = 1, n do
  local b = 2 + (i - 1) * 5
  local kind, span, quota = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 5])
  local key = KEYS[i]
  if kind == 1 then
    redis.call('ZADD', key, now, member)
    local left = quota - counts[i] - 1
    if remaining < 0 or left < remaining then
      tight, remaining = i, left
      local e = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      reset = tonumber(e[2]) + span - now
    end
  else
    redis.call('ZADD', key, now + span, member)
  end
  redis.call('PEXPIRE', key, math.floor(span / 1000) + 1000)
end
local out = {1, now, tight, remaining, reset}
for i = 1, n do out[#out + 1] = counts[i] + 1 end
return out
"#;

/// Records one send in every key at Redis' time. KEYS: rate keys; ARGV: member, then each
/// key's expiry in ms.
const RECORD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('PEXPIRE', key, ARGV[i + 1])
end
return 1
"#;

/// Raises a rate key's count to at least ARGV[1] with stand-in sends at Redis' time: the
/// upstream counted sends made outside pacer (`inin-ratelimit-count`). KEYS[1]: the rate
/// key; ARGV: at least (already clamped to the key's ceiling), the window (µs), a member
/// prefix unique to this call, the key's expiry (ms). Returns how many it added.
const PAD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local missing = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
for i = 1, missing do
  redis.call('ZADD', KEYS[1], now, ARGV[3] .. ':' .. i)
end
if missing > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return math.max(missing, 0)
"#;

/// Most clients whose adaptive state replicas share; the rest are each replica's own.
const MAX_SHARED_ADAPTIVE: usize = 10_000;

/// Milliseconds since the Unix epoch (shared adaptive states expire by the wall clock:
/// replicas' own clocks differ only by far less than a hold).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Remembers keys critical traffic reached (see [`crate::reserve`]): scored by Redis' time
/// in ms, pruned past their memory, at most `max` members (those seen longest ago go).
/// KEYS: the set; ARGV: memory in ms, max, then the members.
static LEARN_CRITICAL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local memory, max = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - memory)
local extra = redis.call('ZCARD', KEYS[1]) - max
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1) end
redis.call('PEXPIRE', KEYS[1], memory)
return 1
"#,
    )
});

/// Each read of the critical set looks this far before the previous one, so a member
/// written while that read ran is not missed.
const CRITICAL_READ_OVERLAP_MS: u64 = 1_000;

/// Consecutive failures that open the breaker.
const BREAKER_FAILURES: u32 = 3;
/// Heartbeat period: replica count, lease renewal, breaker probes.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica whose heartbeat is older than this no longer counts.
const REPLICA_STALE_MS: u64 = 10_000;
/// Failed heartbeats in a row after which the connection is replaced.
const DEAD_AFTER_BEATS: u32 = 2;
/// Longest wait between reconnection attempts while Redis is down.
const MAX_RECONNECT: Duration = Duration::from_secs(1);
/// Least time between Redis answering again and its use: every replica reconnects (at most
/// `MAX_RECONNECT` apart) and replays its local sends first.
const SETTLE: Duration = Duration::from_secs(3);
/// After the settle time a replica also waits until as many replicas as it knew of are
/// heartbeating again (each replays before its first heartbeat), so a peer that comes back
/// late cannot have sends Redis misses; this long at most, for a peer that never returns.
const SETTLE_MAX: Duration = Duration::from_secs(10);
/// A heartbeat younger than this means the replica is talking to Redis now.
const FRESH_MS: u64 = 3_000;
/// Heartbeat period while settling, to notice returning peers quickly.
const SETTLE_POLL: Duration = Duration::from_millis(250);
/// How often a request blocked by a shared concurrency cap asks again.
const CONCURRENCY_RETRY: Duration = Duration::from_millis(25);

/// A connection to whichever topology is configured; commands, pipelines and scripts are
/// routed by their keys (all carry the `{prefix}` tag, so one slot in a cluster).
#[derive(Clone)]
enum Conn {
    /// One server, or the primary the Sentinels named.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Redis' clock as `(seconds, microseconds)`, read on the server holding `key`: in a
    /// cluster, the primary of its slot, whose clock the admission script uses too.
    async fn time(&mut self, key: &str) -> Result<(u64, u64), redis::RedisError> {
        let time = redis::cmd("TIME");
        match self {
            Conn::Single(c) => time.query_async(c).await,
            Conn::Cluster(c) => {
                let route = Route::new(key_slot(key.as_bytes()), SlotAddr::Master);
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                redis::from_owned_redis_value(c.route_command(&time, route).await?)
            }
        }
    }
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag, or of the whole key without
/// one, modulo 16384.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&c| c == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&c| c == b'}')
                .map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty());
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Where Redis is, from `[state]`.
enum Target {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master: String,
        /// Credentials and database of the primary: those of the first Sentinel URL.
        node: SentinelNodeConnectionInfo,
    },
}

impl Target {
    fn new(cfg: &StateConfig) -> Result<Target, redis::RedisError> {
        let nodes = || -> Result<Vec<ConnectionInfo>, redis::RedisError> {
            cfg.nodes
                .iter()
                .map(|n| n.expose().into_connection_info())
                .collect()
        };
        let timeout = cfg.timeout.0 * 10;
        let certs = match &cfg.ca_file {
            Some(path) => Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(path).map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "state.ca_file",
                        format!("{}: {e}", path.display()),
                    ))
                })?),
            }),
            None => None,
        };
        Ok(match cfg.mode {
            RedisMode::Single => {
                let url = cfg
                    .url
                    .as_ref()
                    .map(|u| u.expose().to_string())
                    .unwrap_or_default();
                match certs {
                    Some(certs) => Target::Single(redis::Client::build_with_tls(url, certs)?),
                    None => Target::Single(redis::Client::open(url)?),
                }
            }
            RedisMode::Cluster => {
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes()?)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(3);
                if let Some(certs) = certs {
                    builder = builder.certs(certs);
                }
                Target::Cluster(builder.build()?)
            }
            RedisMode::Sentinel => {
                let sentinels = nodes()?;
                let first = sentinels.first().ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "no sentinel nodes",
                    ))
                })?;
                let tls_mode = match &first.addr {
                    redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                        Some(redis::TlsMode::Insecure)
                    }
                    redis::ConnectionAddr::TcpTls { .. } => Some(redis::TlsMode::Secure),
                    _ => None,
                };
                let node = SentinelNodeConnectionInfo {
                    tls_mode,
                    redis_connection_info: Some(first.redis.clone()),
                };
                Target::Sentinel {
                    master: cfg.master.clone().unwrap_or_default(),
                    sentinels,
                    node,
                }
            }
        })
    }

    /// A new connection; for Sentinel, to the primary the Sentinels name now.
    async fn connect(&self, timeout: Duration) -> Result<Conn, redis::RedisError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(1);
        match self {
            Target::Single(client) => ConnectionManager::new_with_config(client.clone(), config)
                .await
                .map(Conn::Single),
            Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
            Target::Sentinel {
                sentinels,
                master,
                node,
            } => {
                // A fresh client each time: no cached connection to a Sentinel that died.
                let mut sentinel = SentinelClient::build(
                    sentinels.clone(),
                    master.clone(),
                    Some(node.clone()),
                    SentinelServerType::Master,
                )?;
                let client = sentinel.async_get_client().await?;
                let addr = client.get_connection_info().addr.to_string();
                let conn = ConnectionManager::new_with_config(client, config).await?;
                tracing::info!(master = %master, addr = %addr, "redis primary from sentinel");
                Ok(Conn::Single(conn))
            }
        }
    }
}

/// The shared use last seen per rate key: (count, when). Keys are caller input, so the map
/// is bounded: entries leave once their window has passed (they would pad nothing), and at
/// `max` keys a new key is not remembered until such entries are gone.
struct Observed {
    seen: HashMap<LayerKey, (u64, Nanos)>,
    max: usize,
    /// When the map was last pruned; a full map is pruned at most every `PRUNE_EVERY`, so a
    /// flood of new keys costs O(1) per admission.
    pruned_at: Option<Nanos>,
}

/// Least time between two prunings of a full [`Observed`] map.
const PRUNE_EVERY: Nanos = 1_000_000_000;

impl Observed {
    fn new(max: usize) -> Self {
        Observed {
            seen: HashMap::new(),
            max: max.max(1),
            pruned_at: None,
        }
    }

    /// Remembers `count` for `layer` seen at `now`, unless the map is full of live keys.
    fn insert(&mut self, set: &LimitSet, layer: &LayerKey, count: u64, now: Nanos) {
        if let Some(entry) = self.seen.get_mut(layer) {
            *entry = (count, now);
            return;
        }
        if self.seen.len() >= self.max
            && self
                .pruned_at
                .is_none_or(|at| now.saturating_sub(at) >= PRUNE_EVERY)
        {
            self.prune(set, now);
        }
        // Full of keys seen within their window: this one is not padded on a switch to
        // local shares (its replica's own sends still are, through the mirror).
        if self.seen.len() < self.max {
            self.seen.insert(layer.clone(), (count, now));
        }
    }

    /// Forgets keys whose window has passed since they were seen.
    fn prune(&mut self, set: &LimitSet, now: Nanos) {
        self.seen.retain(|layer, (_, at)| {
            set.specs
                .get(layer.limit)
                .is_some_and(|spec| now.saturating_sub(*at) < spec.window)
        });
        self.pruned_at = Some(now);
    }
}

struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    backoff: Duration,
}

/// The shared store.
pub struct RedisBackend {
    set: Arc<LimitSet>,
    clock: Clock,
    cfg: StateConfig,
    target: Target,
    conn: RwLock<Option<Conn>>,
    script: redis::Script,
    record_script: redis::Script,
    pad_script: redis::Script,
    replica: String,
    seq: AtomicU64,
    /// Replicas seen by heartbeat (or configured).
    replicas: AtomicU64,
    up: AtomicBool,
    breaker: Mutex<Breaker>,
    /// Local shares and the mirror of this replica's own sends.
    fallback: Mutex<(u64, Arc<LimitSet>, Ledger)>,
    /// Concurrency leases this replica holds: member → keys, renewed by the heartbeat.
    leases: Mutex<HashMap<u64, Vec<String>>>,
    /// Last shared use seen per rate key, for the switch to local shares; bounded.
    observed: Mutex<Observed>,
    /// True while decisions are made with local shares.
    in_fallback: AtomicBool,
    /// When this replica replayed its local sends into Redis after an outage; Redis is
    /// used again `SETTLE` later, once every peer is back too, so none admits against
    /// windows that miss another's sends.
    replayed_at: Mutex<Option<Instant>>,
    /// As many replicas as this one knows of heartbeat Redis now (set by the heartbeat).
    peers_back: AtomicBool,
    /// Adaptive state shared by the replicas as the heartbeat last read it, with a version
    /// bumped whenever it changed.
    adaptive: Mutex<SharedAdaptive>,
    /// Keys kept per caller at most (`[identity] max_keys`).
    max_keys: usize,
    /// Keys the replicas saw critical traffic reach, read by the heartbeat and not yet
    /// taken by the queue (bounded by `max_keys`), and Redis' time of the last read (ms).
    critical: Mutex<(Option<u64>, HashMap<String, Nanos>)>,
}

impl RedisBackend {
    /// Creates the backend and starts its heartbeat; Redis may be down at this point.
    /// `max_keys` bounds what it remembers per caller key (`[identity] max_keys`).
    pub fn start(
        set: Arc<LimitSet>,
        clock: Clock,
        cfg: StateConfig,
        max_keys: usize,
    ) -> Result<Arc<RedisBackend>, redis::RedisError> {
        let backend = Arc::new(Self::new(set, clock, cfg, max_keys)?);
        tokio::spawn(heartbeat(Arc::downgrade(&backend)));
        Ok(backend)
    }

    /// The backend without its heartbeat: it does not connect by itself.
    fn new(
        set: Arc<LimitSet>,
        clock: Clock,
        cfg: StateConfig,
        max_keys: usize,
    ) -> Result<RedisBackend, redis::RedisError> {
        let target = Target::new(&cfg)?;
        let replicas = cfg.replicas.max(1);
        Ok(RedisBackend {
            fallback: Mutex::new((replicas, Arc::new(set.scaled(replicas)), Ledger::new())),
            set,
            clock,
            target,
            conn: RwLock::new(None),
            adaptive: Mutex::new((0, Arc::default())),
            script: redis::Script::new(ADMIT),
            record_script: redis::Script::new(RECORD),
            pad_script: redis::Script::new(PAD),
            replica: format!("{:016x}", rand::random::<u64>()),
            seq: AtomicU64::new(1),
            replicas: AtomicU64::new(replicas),
            up: AtomicBool::new(false),
            breaker: Mutex::new(Breaker {
                failures: 0,
                open_until: None,
                backoff: Duration::from_millis(250),
            }),
            leases: Mutex::new(HashMap::new()),
            observed: Mutex::new(Observed::new(max_keys)),
            in_fallback: AtomicBool::new(false),
            replayed_at: Mutex::new(None),
            peers_back: AtomicBool::new(false),
            max_keys: max_keys.max(1),
            critical: Mutex::new((None, HashMap::new())),
            cfg,
        })
    }

    fn key(&self, layer: &LayerKey, concurrency: bool) -> String {
        let spec = &self.set.specs[layer.limit];
        let part = match &layer.part {
            KeyPart::Global => "g".to_string(),
            KeyPart::Client(c) => format!("c:{c}"),
            KeyPart::Endpoint(e) => format!("e:{e}"),
            KeyPart::ClientEndpoint(c, e) => format!("ce:{c}|{e}"),
        };
        let kind = if concurrency { "c" } else { "r" };
        format!(
            "{{{}}}:{kind}:{}:{}:{part}",
            self.cfg.key_prefix, layer.limit, spec.name
        )
    }

    /// Sorted set of live replicas, scored by their last heartbeat (ms).
    fn replicas_key(&self) -> String {
        format!("{{{}}}:replicas", self.cfg.key_prefix)
    }

    /// Hash of the clients' shared adaptive states: field `upstream:client`, value
    /// `expiry_ms|state`.
    fn adaptive_key(&self) -> String {
        format!("{{{}}}:adaptive", self.cfg.key_prefix)
    }

    /// Reads the shared adaptive states, drops expired ones (and the soonest to expire past
    /// [`MAX_SHARED_ADAPTIVE`]), and bumps the version when they changed.
    async fn refresh_adaptive(&self, conn: &mut Conn) -> Result<(), redis::RedisError> {
        let key = self.adaptive_key();
        let all: HashMap<String, String> =
            redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
        let now = wall_ms();
        let mut live: Vec<(u64, String, String)> = Vec::new();
        let mut stale: Vec<String> = Vec::new();
        for (field, value) in all {
            match value
                .split_once('|')
                .and_then(|(t, v)| Some((t.parse::<u64>().ok()?, v)))
            {
                Some((until, v)) if until > now => live.push((until, field, v.to_string())),
                _ => stale.push(field),
            }
        }
        if live.len() > MAX_SHARED_ADAPTIVE {
            live.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
            stale.extend(live.drain(MAX_SHARED_ADAPTIVE..).map(|(_, f, _)| f));
        }
        if !stale.is_empty() {
            redis::cmd("HDEL")
                .arg(&key)
                .arg(&stale)
                .query_async::<()>(conn)
                .await?;
        }
        let mut entries: Vec<(String, String)> = live.into_iter().map(|(_, f, v)| (f, v)).collect();
        entries.sort_unstable();
        let mut current = self.adaptive.lock().unwrap_or_else(|p| p.into_inner());
        if *current.1 != entries {
            current.0 = current.0.wrapping_add(1);
            current.1 = Arc::new(entries);
        }
        Ok(())
    }

    /// Sorted set of the keys critical traffic reached, scored by when (ms, Redis time).
    fn critical_key(&self) -> String {
        format!("{{{}}}:critical", self.cfg.key_prefix)
    }

    /// Reads what the replicas learned about critical traffic since the last read.
    async fn refresh_critical(&self, conn: &mut Conn) -> Result<(), redis::RedisError> {
        let since = self
            .critical
            .lock()
            .ok()
            .and_then(|c| c.0)
            .map_or("-inf".to_string(), |ms| {
                ms.saturating_sub(CRITICAL_READ_OVERLAP_MS).to_string()
            });
        let key = self.critical_key();
        // Plain commands, not a script: admissions stay the only scripts Redis runs.
        let (secs, micros) = conn.time(&key).await?;
        let got: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&key)
            .arg(since)
            .arg("+inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(self.max_keys)
            .query_async(conn)
            .await?;
        let redis_now = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let now = self.clock.now();
        let Ok(mut critical) = self.critical.lock() else {
            return Ok(());
        };
        critical.0 = Some(redis_now);
        for pair in got.chunks_exact(2) {
            let Ok(score) = pair[1].parse::<f64>() else {
                continue;
            };
            // A score from the future (another primary's clock) counts as now.
            let age_ms = redis_now.saturating_sub(score.max(0.0) as u64);
            let at = now.saturating_sub(age_ms.saturating_mul(1_000_000));
            let inbox = &mut critical.1;
            if pair[0].len() > crate::reserve::MAX_MEMBER_BYTES {
                continue;
            }
            if let Some(seen) = inbox.get_mut(&pair[0]) {
                *seen = (*seen).max(at);
            } else if inbox.len() < self.max_keys {
                inbox.insert(pair[0].clone(), at);
            }
        }
        Ok(())
    }

    fn pause_key(&self, key: &str) -> String {
        format!("{{{}}}:pause:{key}", self.cfg.key_prefix)
    }

    fn lock_fallback(&self) -> MutexGuard<'_, (u64, Arc<LimitSet>, Ledger)> {
        self.fallback.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the local shares' limits and ledger, with the time read under the lock
    /// so that records stay in order.
    fn local<R>(&self, f: impl FnOnce(&LimitSet, &mut Ledger, Nanos) -> R) -> R {
        let mut fb = self.lock_fallback();
        let (_, set, ledger) = &mut *fb;
        let set = set.clone();
        f(&set, ledger, self.clock.now())
    }

    /// The connection to use for this request, or `None` to decide with local shares.
    /// After any failure only the heartbeat ends local mode: it replays this replica's
    /// sends into Redis, then waits the settle time.
    fn connection(&self) -> Option<Conn> {
        let now = Instant::now();
        if let Ok(b) = self.breaker.lock() {
            if b.open_until.is_some_and(|t| t > now) {
                return None;
            }
        }
        if !self.leave_fallback_if_settled() {
            return None;
        }
        self.conn.read().ok().and_then(|c| c.clone())
    }

    /// False while deciding locally; ends local mode once the settle time after the replay
    /// has passed and the peers are back (or `SETTLE_MAX` has passed).
    fn leave_fallback_if_settled(&self) -> bool {
        if !self.in_fallback.load(Ordering::SeqCst) {
            return true;
        }
        let Ok(mut replayed) = self.replayed_at.lock() else {
            return false;
        };
        let settled = |at: Instant| {
            let waited = at.elapsed();
            waited >= SETTLE && (self.peers_back.load(Ordering::SeqCst) || waited >= SETTLE_MAX)
        };
        match *replayed {
            Some(at) if settled(at) => {
                *replayed = None;
                self.in_fallback.store(false, Ordering::SeqCst);
                tracing::info!("redis reachable: quotas shared again");
                true
            }
            _ => false,
        }
    }

    fn failed(&self, why: &str) {
        // A failure while settling after an outage starts the recovery over.
        if let Ok(mut replayed) = self.replayed_at.lock() {
            *replayed = None;
        }
        let Ok(mut b) = self.breaker.lock() else {
            return;
        };
        b.failures += 1;
        if b.failures >= BREAKER_FAILURES && b.open_until.is_none() {
            tracing::warn!(reason = why, "redis unreachable: using local shares");
            b.open_until = Some(Instant::now() + b.backoff);
            b.backoff = (b.backoff * 2).min(Duration::from_secs(30));
            self.up.store(false, Ordering::SeqCst);
        }
    }

    fn succeeded(&self) {
        if let Ok(mut b) = self.breaker.lock() {
            b.failures = 0;
        }
    }

    /// Decides with the local shares; the request also lands in the mirror.
    fn take_locally(&self, demand: &Demand, ahead: &[u64]) -> Result<Grant, Blocked> {
        self.local(|set, ledger, now| {
            let index = |l: &LayerKey| demand.layers.iter().position(|x| x == l);
            let ahead_of = |l: &LayerKey| index(l).and_then(|i| ahead.get(i).copied()).unwrap_or(0);
            let taken = ledger.try_take(set, now, demand, &ahead_of)?;
            let headroom = ledger.tightest(set, now, demand);
            Ok(Grant { taken, headroom })
        })
    }

    /// The keys one admission touches, in script order: (layer, is it the cap's key).
    fn script_keys(&self, demand: &Demand) -> Vec<(LayerKey, bool)> {
        let mut keys = Vec::with_capacity(demand.layers.len());
        for layer in &demand.layers {
            let spec = &self.set.specs[layer.limit];
            if spec.ceilings.is_some() {
                keys.push((layer.clone(), false));
            }
            if spec.concurrency.is_some() {
                keys.push((layer.clone(), true));
            }
        }
        keys
    }

    async fn take_shared(
        &self,
        conn: &mut Conn,
        demand: &Demand,
        ahead: &[u64],
        keys: &[(LayerKey, bool)],
        pause: Option<&str>,
        id: u64,
    ) -> Result<Vec<i64>, redis::RedisError> {
        let class = demand.priority.index();
        let lease = self.cfg.lease_ttl.0.as_micros() as u64;
        let mut inv = self.script.prepare_invoke();
        inv.arg(keys.len()).arg(format!("{}:{id}", self.replica));
        for (layer, cap) in keys {
            let spec = &self.set.specs[layer.limit];
            let index = demand.layers.iter().position(|l| l == layer);
            let a = index.and_then(|i| ahead.get(i)).copied().unwrap_or(0);
            let scale = index.map_or(demand.rate_scale, |i| demand.scale_of(i));
            // Decided in Rust per key: the script only sees each key's ceiling.
            let reserved = index.is_none_or(|i| demand.holds_reserve(i));
            let (kind, ceil, span, quota) = match (
                cap,
                spec.rate_ceiling(class, reserved),
                spec.concurrency_cap(class, reserved),
            ) {
                (false, Some(c), _) => {
                    let ceil = scaled(c, scale);
                    (1, ceil, spec.window / 1000, ceil)
                }
                (true, _, Some(c)) => (2, c, lease, spec.concurrency_cap(0, true).unwrap_or(c)),
                _ => (2, u64::MAX, lease, 0),
            };
            inv.key(self.key(layer, *cap));
            inv.arg(kind).arg(ceil).arg(span).arg(a).arg(quota);
        }
        // Without a caller to pause, a key no one sets: the script's check finds nothing.
        inv.key(self.pause_key(pause.unwrap_or("-")));
        inv.invoke_async(conn).await
    }

    /// Loads the scripts on a new connection, so that even the first admission is one
    /// EVALSHA (the crate would otherwise answer NOSCRIPT with a SCRIPT LOAD and a second
    /// EVALSHA). Best effort: a Redis restarted later loses them and the crate reloads.
    async fn load_scripts(&self, conn: &mut Conn, timeout: Duration) {
        for script in [&self.script, &self.record_script, &self.pad_script] {
            if let Ok(Err(e)) = tokio::time::timeout(timeout, script.load_async(conn)).await {
                tracing::debug!(error = %e, "redis script load");
            }
        }
    }

    /// Remembers the shared use each key had, for a conservative switch to local shares.
    fn observe(&self, keys: &[(LayerKey, bool)], counts: &[i64]) {
        let now = self.clock.now();
        if let Ok(mut seen) = self.observed.lock() {
            for ((layer, cap), &count) in keys.iter().zip(counts) {
                if !cap {
                    seen.insert(&self.set, layer, count.max(0) as u64, now);
                }
            }
        }
    }

    /// Leaving shared mode: other replicas' recent sends are unknown here. Every key this
    /// replica used or saw in the last window is padded to its full local share with
    /// stand-in sends made now, so until they expire it may only send as its own earlier
    /// sends expire. Each replica then sends no more in any window than it did before the
    /// switch, and together they stay within the quota (their earlier sends were).
    fn enter_fallback(&self) {
        if self.in_fallback.swap(true, Ordering::SeqCst) {
            return;
        }
        self.peers_back.store(false, Ordering::SeqCst);
        let seen: Vec<(LayerKey, Nanos)> = self
            .observed
            .lock()
            .map(|mut s| s.seen.drain().map(|(k, (_, at))| (k, at)).collect())
            .unwrap_or_default();
        self.local(|set, ledger, now| {
            for (layer, at) in seen {
                let spec = &set.specs[layer.limit];
                if let (Some(share), true) = (spec.requests, now.saturating_sub(at) < spec.window) {
                    ledger.pad(set, now, &layer, share);
                }
            }
        });
        tracing::warn!("redis unreachable: deciding with local shares");
    }

    fn concurrency_keys(&self, layers: &[LayerKey]) -> Vec<String> {
        layers
            .iter()
            .filter(|l| self.set.specs[l.limit].concurrency.is_some())
            .map(|l| self.key(l, true))
            .collect()
    }

    fn rate_keys(&self, layers: &[LayerKey]) -> Vec<String> {
        layers
            .iter()
            .filter(|l| self.set.specs[l.limit].ceilings.is_some())
            .map(|l| self.key(l, false))
            .collect()
    }

    /// Local sends are also written to Redis, best effort: when only this replica lost
    /// Redis for a moment (a timeout under load), or while it settles after an outage, the
    /// replicas still sharing see them.
    fn write_through(&self, taken: &Taken) {
        if let Some(conn) = self.conn.read().ok().and_then(|c| c.clone()) {
            self.record_in_redis(conn, &taken.layers);
        }
    }

    /// Records one send in every rate key of `layers` at Redis' time, in the background.
    fn record_in_redis(&self, mut conn: Conn, layers: &[LayerKey]) {
        let keys: Vec<(String, u64)> = layers
            .iter()
            .filter(|l| self.set.specs[l.limit].ceilings.is_some())
            .map(|l| {
                (
                    self.key(l, false),
                    self.set.specs[l.limit].window / 1_000_000 + 1000,
                )
            })
            .collect();
        if keys.is_empty() {
            return;
        }
        let member = format!(
            "{}:sent:{}",
            self.replica,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let script = self.record_script.clone();
        let timeout = self.cfg.timeout.0;
        tokio::spawn(async move {
            let mut inv = script.prepare_invoke();
            inv.arg(member);
            for (key, expiry) in keys {
                inv.key(key).arg(expiry);
            }
            let _ = tokio::time::timeout(timeout * 5, inv.invoke_async::<()>(&mut conn)).await;
        });
    }

    /// Removes a member from keys in Redis, in the background.
    fn forget(&self, keys: Vec<String>, member: String) {
        if keys.is_empty() {
            return;
        }
        let Some(mut conn) = self.connection() else {
            return;
        };
        let timeout = self.cfg.timeout.0;
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.zrem(k, &member).ignore();
            }
            let _ = tokio::time::timeout(timeout * 5, pipe.query_async::<()>(&mut conn)).await;
        });
    }

    /// Writes this replica's recent sends (the mirror) into Redis after an outage.
    async fn replay(&self, conn: &mut Conn) -> Result<(), redis::RedisError> {
        let now = self.clock.now();
        let exported = self.local(|set, ledger, _| ledger.export(set, now));
        if exported.is_empty() {
            return Ok(());
        }
        let (secs, micros) = conn.time(&self.replicas_key()).await?;
        let redis_now = secs.saturating_mul(1_000_000).saturating_add(micros);
        let mut pipe = redis::pipe();
        let mut n = 0u64;
        for (layer, entries) in exported {
            let key = self.key(&layer, false);
            let span_ms = self.set.specs[layer.limit].window / 1_000_000;
            for (at, count) in entries {
                // A send recorded after `now` was read is as recent as `now`.
                let score = redis_now.saturating_sub(now.saturating_sub(at) / 1000);
                for _ in 0..count {
                    n += 1;
                    pipe.zadd(&key, format!("{}:replay:{n}", self.replica), score)
                        .ignore();
                }
            }
            pipe.pexpire(&key, (span_ms + 1000) as i64).ignore();
        }
        pipe.query_async::<()>(conn).await
    }
}

impl Backend for RedisBackend {
    fn take(
        self: Arc<Self>,
        demand: Arc<Demand>,
        ahead: Vec<u64>,
        pause: Option<String>,
    ) -> BoxFuture<'static, Result<Grant, Blocked>> {
        Box::pin(async move {
            let Some(mut conn) = self.connection() else {
                self.enter_fallback();
                let granted = self.take_locally(&demand, &ahead);
                if let Ok(g) = &granted {
                    self.write_through(&g.taken);
                }
                return granted;
            };
            let keys = self.script_keys(&demand);
            let id = self.seq.fetch_add(1, Ordering::Relaxed);
            let answer = tokio::time::timeout(
                self.cfg.timeout.0,
                self.take_shared(&mut conn, &demand, &ahead, &keys, pause.as_deref(), id),
            )
            .await;
            // The 1-based index of one of this admission's keys.
            let key_at = |i: i64| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| i.checked_sub(1))
                    .and_then(|i| keys.get(i))
                    .map(|(l, _)| l.clone())
            };
            let failure = match &answer {
                // A shared upstream pause answers before counting: no per-key counts.
                Ok(Ok(v)) if v.len() == 5 && v[0] == 0 && v[3] == 1 => None,
                Ok(Ok(v))
                    if v.len() >= 5 + keys.len()
                        && match v[0] {
                            1 => v[2] == 0 || key_at(v[2]).is_some(),
                            0 => key_at(v[2]).is_some(),
                            _ => false,
                        } =>
                {
                    None
                }
                Ok(Ok(_)) => Some("unexpected script answer".to_string()),
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("timeout".to_string()),
            };
            let v = match (failure, answer) {
                (None, Ok(Ok(v))) => v,
                (why, _) => {
                    self.failed(why.as_deref().unwrap_or("unknown"));
                    self.enter_fallback();
                    return self.take_locally(&demand, &ahead);
                }
            };
            self.succeeded();
            self.observe(&keys, &v[5..]);
            if v[0] == 1 {
                let mut taken =
                    self.local(|set, ledger, now| ledger.record(set, now, &demand.layers));
                taken.id = id;
                let conc = self.concurrency_keys(&demand.layers);
                if !conc.is_empty() {
                    if let Ok(mut leases) = self.leases.lock() {
                        leases.insert(id, conc);
                    }
                }
                let headroom = key_at(v[2]).filter(|_| v[3] >= 0).map(|layer| {
                    let index = demand.layers.iter().position(|l| *l == layer);
                    let scale = index.map_or(demand.rate_scale, |i| demand.scale_of(i));
                    let reserved = index.is_none_or(|i| demand.holds_reserve(i));
                    Headroom {
                        limit: layer.limit,
                        quota: self.set.specs[layer.limit]
                            .rate_ceiling(demand.priority.index(), reserved)
                            .map_or(0, |c| scaled(c, scale)),
                        remaining: v[3] as u64,
                        reset: Duration::from_micros(v[4].max(0) as u64),
                    }
                });
                Ok(Grant { taken, headroom })
            } else {
                let wait = (v[1] >= 0).then(|| (v[1] as Nanos).saturating_mul(1000));
                // Checked above: a refusal names one of this admission's keys, or is a pause.
                let kind = match key_at(v[2]) {
                    _ if v[3] == 1 => BlockKind::Paused,
                    Some(layer) => BlockKind::Layer(layer),
                    None => BlockKind::Unanswered,
                };
                Err(Blocked { kind, wait })
            }
        })
    }

    fn refund(&self, taken: &Taken) {
        self.local(|set, ledger, _| ledger.refund(set, taken));
        if taken.id > 0 {
            if let Ok(mut leases) = self.leases.lock() {
                leases.remove(&taken.id);
            }
            let mut keys = self.rate_keys(&taken.layers);
            keys.extend(self.concurrency_keys(&taken.layers));
            self.forget(keys, format!("{}:{}", self.replica, taken.id));
        }
    }

    fn release(&self, taken: &Taken) {
        self.local(|set, ledger, _| ledger.release(set, taken));
        if taken.id > 0 {
            let held = self
                .leases
                .lock()
                .ok()
                .and_then(|mut l| l.remove(&taken.id));
            if let Some(keys) = held {
                self.forget(keys, format!("{}:{}", self.replica, taken.id));
            }
        }
    }

    /// The upstream counts `used` sends in `layer`'s window: sends made outside pacer (the
    /// same OAuth client used by another system) are padded into the shared key, so every
    /// replica sees them. Only when `used` is above the count Redis last reported for the
    /// key (otherwise pacer's own sends already explain it: no extra round trip), clamped
    /// to the key's whole quota (the number is the upstream's, so untrusted). While Redis
    /// is unreachable the local shares are padded instead.
    fn at_least(&self, layer: &LayerKey, used: u64) {
        let spec = &self.set.specs[layer.limit];
        let Some(full) = spec.ceilings.map(|c| c[0]) else {
            return;
        };
        let used = used.min(full);
        let now = self.clock.now();
        let known = self
            .observed
            .lock()
            .ok()
            .and_then(|o| o.seen.get(layer).copied())
            .filter(|&(_, at)| now.saturating_sub(at) < spec.window)
            .map_or(0, |(count, _)| count);
        if used <= known {
            return;
        }
        let Some(mut conn) = self.connection() else {
            self.local(|set, ledger, now| ledger.pad(set, now, layer, used));
            return;
        };
        if let Ok(mut o) = self.observed.lock() {
            o.insert(&self.set, layer, used, now);
        }
        let key = self.key(layer, false);
        let span_us = spec.window / 1000;
        let expiry_ms = spec.window / 1_000_000 + 1000;
        let member = format!(
            "{}:pad:{}",
            self.replica,
            self.seq.fetch_add(1, Ordering::Relaxed)
        );
        let script = self.pad_script.clone();
        let timeout = self.cfg.timeout.0;
        tokio::spawn(async move {
            let mut inv = script.prepare_invoke();
            inv.key(key)
                .arg(used)
                .arg(span_us)
                .arg(member)
                .arg(expiry_ms);
            let _ = tokio::time::timeout(timeout * 5, inv.invoke_async::<i64>(&mut conn)).await;
        });
    }

    fn record_sent(&self, demand: &Demand) {
        self.local(|set, ledger, now| ledger.record_sent(set, now, &demand.layers));
        if let Some(conn) = self.conn.read().ok().and_then(|c| c.clone()) {
            self.record_in_redis(conn, &demand.layers);
        }
    }

    fn pause(&self, key: &str, pause: Duration) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let key = self.pause_key(key);
        let ms = pause.as_millis().max(1) as u64;
        let timeout = self.cfg.timeout.0;
        tokio::spawn(async move {
            let cmd = redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(ms)
                .to_owned();
            let _ = tokio::time::timeout(timeout * 5, cmd.query_async::<()>(&mut conn)).await;
        });
    }

    fn share_adaptive(&self, field: String, value: String, ttl: Duration) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let entry = format!("{}|{value}", wall_ms().saturating_add(ttl_ms));
        let key = self.adaptive_key();
        let timeout = self.cfg.timeout.0;
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            pipe.hset(&key, field, entry).ignore();
            pipe.pexpire(&key, i64::try_from(ttl_ms).unwrap_or(i64::MAX))
                .ignore();
            let _ = tokio::time::timeout(timeout * 5, pipe.query_async::<()>(&mut conn)).await;
        });
    }

    fn shared_adaptive(&self) -> SharedAdaptive {
        let current = self.adaptive.lock().unwrap_or_else(|p| p.into_inner());
        (current.0, current.1.clone())
    }

    fn share_critical(&self, members: Vec<String>, keep: Duration) {
        let Some(mut conn) = self.connection() else {
            return;
        };
        let key = self.critical_key();
        let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1);
        let max = self.max_keys;
        let timeout = self.cfg.timeout.0;
        tokio::spawn(async move {
            let mut learn = LEARN_CRITICAL.prepare_invoke();
            learn.key(key).arg(keep_ms).arg(max);
            for m in members {
                learn.arg(m);
            }
            let _ = tokio::time::timeout(timeout * 5, learn.invoke_async::<()>(&mut conn)).await;
        });
    }

    fn shared_critical(&self) -> Vec<(String, Nanos)> {
        match self.critical.lock() {
            Ok(mut c) if !c.1.is_empty() => std::mem::take(&mut c.1).into_iter().collect(),
            _ => Vec::new(),
        }
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn concurrency_retry(&self) -> Option<Duration> {
        Some(CONCURRENCY_RETRY)
    }

    fn usage(&self) -> Vec<(LayerKey, u64, u64)> {
        self.local(|set, ledger, now| ledger.usage(set, now))
    }

    fn key_count(&self) -> usize {
        self.lock_fallback().2.len()
    }

    fn has_key(&self, key: &LayerKey) -> bool {
        self.lock_fallback().2.has(key)
    }

    fn sweep(&self) {
        self.local(|set, ledger, now| {
            ledger.sweep(set, now);
        });
        let now = self.clock.now();
        if let Ok(mut seen) = self.observed.lock() {
            seen.prune(&self.set, now);
        }
    }

    fn status(&self) -> BackendStatus {
        BackendStatus {
            kind: "redis",
            up: self.up.load(Ordering::SeqCst) && self.leave_fallback_if_settled(),
            replicas: self.replicas.load(Ordering::SeqCst),
        }
    }
}

/// Connects (and reconnects with backoff), announces this replica, learns how many there
/// are, renews leases, and closes the breaker once Redis answers again.
async fn heartbeat(backend: std::sync::Weak<RedisBackend>) {
    let mut backoff = Duration::from_millis(100);
    let mut failed_beats = 0u32;
    loop {
        let Some(b) = backend.upgrade() else { return };
        let timeout = b.cfg.timeout.0 * 10;
        let conn = b.conn.read().ok().and_then(|c| c.clone());
        let mut conn = match conn {
            Some(c) => c,
            None => match tokio::time::timeout(timeout * 2, b.target.connect(timeout)).await {
                Ok(Ok(mut c)) => {
                    b.load_scripts(&mut c, timeout).await;
                    if let Ok(mut slot) = b.conn.write() {
                        *slot = Some(c.clone());
                    }
                    backoff = Duration::from_millis(100);
                    c
                }
                _ => {
                    b.up.store(false, Ordering::SeqCst);
                    drop(b);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RECONNECT);
                    continue;
                }
            },
        };
        let replayed_already = b.replayed_at.lock().map(|s| s.is_some()).unwrap_or(true);
        let recovering = b.in_fallback.load(Ordering::SeqCst) && !replayed_already;
        let beat = tokio::time::timeout(timeout, async {
            if recovering {
                // Tell the shared windows what this replica sent meanwhile, before the
                // heartbeat that tells the peers it is back.
                b.replay(&mut conn).await?;
            }
            let beat = beat_once(&b, &mut conn).await?;
            // Other replicas' cuts and learned ceilings; a failure here is no outage.
            if let Err(e) = b.refresh_adaptive(&mut conn).await {
                tracing::debug!(error = %e, "reading shared adaptive state");
            }
            Ok::<_, redis::RedisError>(beat)
        })
        .await;
        match beat {
            Ok(Ok((replicas, fresh))) => {
                failed_beats = 0;
                if recovering {
                    if let Ok(mut replayed) = b.replayed_at.lock() {
                        *replayed = Some(Instant::now());
                    }
                    tracing::info!(settle = ?SETTLE, "redis reachable: replayed local sends, sharing again once the peers are back");
                }
                if let Ok(mut br) = b.breaker.lock() {
                    br.failures = 0;
                    br.open_until = None;
                    br.backoff = Duration::from_millis(250);
                }
                b.up.store(true, Ordering::SeqCst);
                let known = b.replicas.load(Ordering::SeqCst);
                let replicas = if b.cfg.replicas > 0 {
                    b.cfg.replicas
                } else if b.in_fallback.load(Ordering::SeqCst) {
                    // Peers still reconnecting are not counted yet: a smaller count now
                    // would enlarge this replica's local share while they send theirs.
                    replicas.max(known)
                } else {
                    replicas.max(1)
                };
                b.peers_back.store(fresh >= replicas, Ordering::SeqCst);
                // What the replicas learned about critical traffic (two round trips); a
                // failure is no outage, and a slow read does not hold up the next beat.
                let read = b.refresh_critical(&mut conn);
                match tokio::time::timeout(b.cfg.timeout.0 * 2, read).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "reading the critical set"),
                    Err(_) => tracing::debug!("reading the critical set: timeout"),
                }
                if b.replicas.swap(replicas, Ordering::SeqCst) != replicas {
                    let scaled = Arc::new(b.set.scaled(replicas));
                    let mut fb = b.lock_fallback();
                    fb.0 = replicas;
                    fb.1 = scaled;
                }
            }
            _ => {
                b.failed("heartbeat");
                b.up.store(false, Ordering::SeqCst);
                // Even an idle replica decides locally from now on, so that when Redis
                // returns it too waits for the peers that sent locally meanwhile.
                b.enter_fallback();
                failed_beats += 1;
                // A connection whose peer vanished without a reset (a partition) only ever
                // times out, and the client does not replace it: start a fresh one.
                if failed_beats >= DEAD_AFTER_BEATS {
                    if let Ok(mut slot) = b.conn.write() {
                        *slot = None;
                    }
                    failed_beats = 0;
                }
            }
        }
        let pause = if !b.up.load(Ordering::SeqCst) {
            backoff.max(Duration::from_millis(200))
        } else if b.in_fallback.load(Ordering::SeqCst) {
            SETTLE_POLL
        } else {
            HEARTBEAT
        };
        drop(b);
        tokio::time::sleep(pause).await;
    }
}

/// One heartbeat: register, count live replicas (and those that heartbeat within
/// `FRESH_MS`), renew held leases.
async fn beat_once(b: &RedisBackend, conn: &mut Conn) -> Result<(u64, u64), redis::RedisError> {
    let replicas_key = b.replicas_key();
    let (secs, micros) = conn.time(&replicas_key).await?;
    let now_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
    let now_us = secs.saturating_mul(1_000_000).saturating_add(micros);
    let lease_us = b.cfg.lease_ttl.0.as_micros() as u64;
    let mut pipe = redis::pipe();
    pipe.zadd(&replicas_key, &b.replica, now_ms).ignore();
    pipe.zrembyscore(
        &replicas_key,
        "-inf",
        now_ms.saturating_sub(REPLICA_STALE_MS),
    )
    .ignore();
    pipe.pexpire(&replicas_key, (REPLICA_STALE_MS * 3) as i64)
        .ignore();
    pipe.zcard(&replicas_key);
    pipe.zcount(&replicas_key, now_ms.saturating_sub(FRESH_MS), "+inf");
    let leases: Vec<(u64, Vec<String>)> = b
        .leases
        .lock()
        .map(|l| l.iter().map(|(id, keys)| (*id, keys.clone())).collect())
        .unwrap_or_default();
    for (id, keys) in leases {
        for k in keys {
            pipe.zadd(&k, format!("{}:{id}", b.replica), now_us + lease_us)
                .ignore();
            pipe.pexpire(&k, (lease_us / 1000 + 1000) as i64).ignore();
        }
    }
    let counts: (u64, u64) = pipe.query_async(conn).await?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn observed_use_of_distinct_keys_stays_bounded() {
        let (c, set) = crate::limit::test_limits(
            "[state]\nbackend = \"redis\"\nurl = \"redis://127.0.0.1:1/\"\n\
             [[limit]]\nname = \"per-client\"\nscope = \"client\"\nrequests = 10\nper = \"2s\"\n",
        );
        let set = Arc::new(set);
        let max = 1000;
        // No heartbeat: it never connects, and nothing but this test touches the map.
        let b = RedisBackend::new(set.clone(), Clock::default(), c.state.clone(), max).unwrap();
        let key = |i: u64| {
            (
                LayerKey {
                    limit: 0,
                    part: KeyPart::Client(Arc::from(format!("caller-{i}"))),
                },
                false,
            )
        };
        let len = || b.observed.lock().unwrap().seen.len();
        for i in 0..100_000 {
            b.observe(&[key(i)], &[3]);
            assert!(len() <= max, "{} keys after {i}", len());
        }
        // A key already remembered is still updated while the map is full.
        b.observe(&[key(0)], &[7]);
        assert_eq!(b.observed.lock().unwrap().seen[&key(0).0].0, 7);
        // Once their window has passed, new keys take their place.
        tokio::time::advance(Duration::from_secs(3)).await;
        for i in 100_000..200_000 {
            b.observe(&[key(i)], &[1]);
            assert!(len() <= max, "{} keys after {i}", len());
        }
        assert!(b
            .observed
            .lock()
            .unwrap()
            .seen
            .contains_key(&key(100_000).0));
        // The regular sweep forgets what no switch to local shares would pad.
        tokio::time::advance(Duration::from_secs(3)).await;
        b.sweep();
        assert_eq!(len(), 0);
    }

    #[test]
    fn slots_follow_redis_cluster() {
        // Values from Redis' CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{pacer}:replicas"), key_slot(b"pacer"));
        assert_eq!(
            key_slot(b"{pacer}:r:0:x:g"),
            key_slot(b"{pacer}:pause:api:*")
        );
        // Only the first tag counts, and an empty one hashes the whole key.
        assert_eq!(key_slot(b"a{b}{c}"), key_slot(b"b"));
        assert_ne!(key_slot(b"{}a"), key_slot(b"{}b"));
    }
}
