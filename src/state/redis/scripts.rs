//! The Lua scripts pacer runs in Redis, what each takes and what each answers.
//!
//! Every script reads Redis' own clock (`TIME`), so replicas never disagree about a window.
//! The admission script answers a flat array; [`AdmitReply::decode`] turns it into named
//! fields once, checking every index it names, so the backend never reads it by position.

use super::conn::Conn;
use std::time::Duration;

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

/// Remembers keys critical traffic reached (see [`crate::reserve`]): scored by Redis' time
/// in ms, pruned past their memory, at most `max` members (those seen longest ago go).
/// KEYS: the set; ARGV: memory in ms, max, then the members.
const LEARN_CRITICAL: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local memory, max = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - memory)
local extra = redis.call('ZCARD', KEYS[1]) - max
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1) end
redis.call('PEXPIRE', KEYS[1], memory)
return 1
"#;

/// A layer's kind in the admission script's arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyKind {
    /// A sorted set of send times.
    Rate = 1,
    /// A sorted set of leases scored by their expiry.
    Concurrency = 2,
}

/// One key of an admission, as the script is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AdmitKey {
    /// The Redis key (carries the `{prefix}` hash tag).
    pub key: String,
    pub kind: KeyKind,
    /// Most members the key may hold for this request.
    pub ceiling: u64,
    /// The window (rate) or the lease (concurrency), in µs.
    pub span_us: u64,
    /// Requests waiting before this one on the key.
    pub ahead: u64,
    /// The key's whole quota, for the room left that `RateLimit` headers report.
    pub quota: u64,
}

/// The admission script's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AdmitReply {
    /// Recorded in every key.
    Admitted(Admitted),
    /// Nothing recorded: a key has no room.
    Refused(Refused),
    /// Nothing checked: the caller's upstream pause lasts (another replica saw a 429).
    Paused {
        /// What remains of the pause.
        wait: Option<Duration>,
    },
}

/// An admission recorded in every key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Admitted {
    /// The rate key with the least room left, if the admission has a rate key.
    pub tightest: Option<Tightest>,
    /// Each key's use as seen by this admission, in key order (this send included).
    pub counts: Vec<u64>,
}

/// The room left in an admission's tightest rate key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tightest {
    /// Index of the key in the admission's keys.
    pub key: usize,
    /// Sends left in its window.
    pub remaining: u64,
    /// Until its oldest counted send leaves the window.
    pub reset: Duration,
}

/// An admission refused by one of its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refused {
    /// Index of the key that refused in the admission's keys.
    pub key: usize,
    /// When it has room; `None` for a concurrency key (room comes with a release).
    pub wait: Option<Duration>,
    /// Each key's use as seen by this admission, in key order.
    pub counts: Vec<u64>,
}

/// The admission script answered something it never answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unexpected script answer")]
pub(super) struct UnexpectedReply;

/// Why an admission in Redis has no answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum AdmitError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Unexpected(#[from] UnexpectedReply),
}

impl AdmitReply {
    /// Decodes the script's array for an admission of `keys` keys. Layout:
    /// `{1, now_us, tight, remaining, reset_us, counts...}` (admitted; `tight` is a 1-based
    /// key index, 0 for none, and `remaining` below 0 means unknown),
    /// `{0, wait_us, key, 0, 0, counts...}` (refused; `wait_us` -1 for concurrency) or
    /// `{0, pause_us, 0, 1, 0}` (paused).
    pub fn decode(v: &[i64], keys: usize) -> Result<AdmitReply, UnexpectedReply> {
        let (&[status, wait_or_now, key, remaining, reset], rest) =
            v.split_first_chunk::<5>().ok_or(UnexpectedReply)?;
        // The 0-based index of one of this admission's keys, from the script's 1-based one.
        let key_at = |i: i64| {
            usize::try_from(i)
                .ok()
                .and_then(|i| i.checked_sub(1))
                .filter(|&i| i < keys)
        };
        let wait = (wait_or_now >= 0).then(|| Duration::from_micros(wait_or_now as u64));
        if status == 0 && remaining == 1 && rest.is_empty() {
            return Ok(AdmitReply::Paused { wait });
        }
        let counts: Vec<u64> = rest
            .get(..keys)
            .ok_or(UnexpectedReply)?
            .iter()
            .map(|&c| c.max(0) as u64)
            .collect();
        match status {
            1 => {
                let tightest = match key_at(key) {
                    Some(key) => (remaining >= 0).then(|| Tightest {
                        key,
                        remaining: remaining as u64,
                        reset: Duration::from_micros(reset.max(0) as u64),
                    }),
                    None if key == 0 => None,
                    None => return Err(UnexpectedReply),
                };
                Ok(AdmitReply::Admitted(Admitted { tightest, counts }))
            }
            0 => {
                let key = key_at(key).ok_or(UnexpectedReply)?;
                Ok(AdmitReply::Refused(Refused { key, wait, counts }))
            }
            _ => Err(UnexpectedReply),
        }
    }
}

/// The scripts, hashed once; loaded on every new connection (see [`Scripts::load`]).
pub(super) struct Scripts {
    admit: redis::Script,
    record: redis::Script,
    pad: redis::Script,
    learn_critical: redis::Script,
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts {
            admit: redis::Script::new(ADMIT),
            record: redis::Script::new(RECORD),
            pad: redis::Script::new(PAD),
            learn_critical: redis::Script::new(LEARN_CRITICAL),
        }
    }
}

impl Scripts {
    /// Loads the scripts every request may run on a new connection, so that even the
    /// first admission is one EVALSHA (the crate would otherwise answer NOSCRIPT with a
    /// SCRIPT LOAD and a second EVALSHA). Best effort: a Redis restarted later loses them
    /// and the crate reloads.
    pub async fn load(&self, conn: &mut Conn, timeout: Duration) {
        for script in [&self.admit, &self.record, &self.pad] {
            if let Ok(Err(e)) = tokio::time::timeout(timeout, script.load_async(conn)).await {
                tracing::debug!(error = %e, "redis script load");
            }
        }
    }

    /// Trims, checks and records every key of one admission as `member`; `pause_key`
    /// refuses it while it exists.
    pub async fn admit(
        &self,
        conn: &mut Conn,
        member: String,
        keys: &[AdmitKey],
        pause_key: String,
    ) -> Result<AdmitReply, AdmitError> {
        let mut inv = self.admit.prepare_invoke();
        inv.arg(keys.len()).arg(member);
        for k in keys {
            inv.key(&k.key);
            inv.arg(k.kind as u8)
                .arg(k.ceiling)
                .arg(k.span_us)
                .arg(k.ahead)
                .arg(k.quota);
        }
        inv.key(pause_key);
        let v: Vec<i64> = inv.invoke_async(conn).await?;
        Ok(AdmitReply::decode(&v, keys.len())?)
    }

    /// Records one send as `member` in every key: (key, its expiry in ms).
    pub async fn record(
        &self,
        conn: &mut Conn,
        member: String,
        keys: Vec<(String, u64)>,
    ) -> Result<(), redis::RedisError> {
        let mut inv = self.record.prepare_invoke();
        inv.arg(member);
        for (key, expiry_ms) in keys {
            inv.key(key).arg(expiry_ms);
        }
        inv.invoke_async::<()>(conn).await
    }

    /// Raises `key`'s count in its window of `window_us` to at least `used` with stand-in
    /// sends named after `member`; returns how many it added.
    pub async fn pad(
        &self,
        conn: &mut Conn,
        key: String,
        used: u64,
        window_us: u64,
        member: String,
        expiry_ms: u64,
    ) -> Result<u64, redis::RedisError> {
        let mut inv = self.pad.prepare_invoke();
        inv.key(key)
            .arg(used)
            .arg(window_us)
            .arg(member)
            .arg(expiry_ms);
        inv.invoke_async(conn).await
    }

    /// Remembers in the set `key` that critical traffic reached `members`, for `keep_ms`,
    /// at most `max` members.
    pub async fn learn_critical(
        &self,
        conn: &mut Conn,
        key: String,
        keep_ms: u64,
        max: usize,
        members: Vec<String>,
    ) -> Result<(), redis::RedisError> {
        let mut learn = self.learn_critical.prepare_invoke();
        learn.key(key).arg(keep_ms).arg(max);
        for m in members {
            learn.arg(m);
        }
        learn.invoke_async::<()>(conn).await
    }
}

#[cfg(test)]
mod tests;
