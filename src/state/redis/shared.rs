//! What replicas share besides counters: clients' adaptive states (a cut, a learned
//! ceiling) in a hash, and the keys critical traffic reached in a sorted set. Both are
//! read by the heartbeat and written in the background; a failure is never an outage.

use super::conn::Conn;
use super::scripts::Scripts;
use crate::limit::window::Nanos;
use crate::state::{Clock, SharedAdaptive};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most clients whose adaptive state replicas share; the rest are each replica's own.
const MAX_SHARED_ADAPTIVE: usize = 10_000;

/// Each read of the critical set looks this far before the previous one, so a member
/// written while that read ran is not missed.
const CRITICAL_READ_OVERLAP_MS: u64 = 1_000;

/// Milliseconds since the Unix epoch (shared adaptive states expire by the wall clock:
/// replicas' own clocks differ only by far less than a hold).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The shared state as the heartbeat last read it.
pub(super) struct Shared {
    clock: Clock,
    /// Keys kept per caller at most (`[identity] max_keys`).
    max_keys: usize,
    /// Adaptive state shared by the replicas, with a version bumped whenever it changed.
    adaptive: Mutex<SharedAdaptive>,
    /// Keys the replicas saw critical traffic reach, read by the heartbeat and not yet
    /// taken by the queue (bounded by `max_keys`), and Redis' time of the last read (ms).
    critical: Mutex<(Option<u64>, HashMap<String, Nanos>)>,
}

impl Shared {
    /// Nothing read yet; at most `max_keys` critical keys are kept.
    pub fn new(clock: Clock, max_keys: usize) -> Self {
        Shared {
            clock,
            max_keys: max_keys.max(1),
            adaptive: Mutex::new((0, Arc::default())),
            critical: Mutex::new((None, HashMap::new())),
        }
    }

    /// Reads the shared adaptive states in the hash `key`, drops expired ones (and the
    /// soonest to expire past [`MAX_SHARED_ADAPTIVE`]), and bumps the version when they
    /// changed.
    pub async fn refresh_adaptive(
        &self,
        conn: &mut Conn,
        key: &str,
    ) -> Result<(), redis::RedisError> {
        let all: HashMap<String, String> = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
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
                .arg(key)
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

    /// The adaptive states as last read, with their version.
    pub fn adaptive(&self) -> SharedAdaptive {
        let current = self.adaptive.lock().unwrap_or_else(|p| p.into_inner());
        (current.0, current.1.clone())
    }

    /// Reads what the replicas learned about critical traffic (the sorted set `key`) since
    /// the last read.
    pub async fn refresh_critical(
        &self,
        conn: &mut Conn,
        key: &str,
    ) -> Result<(), redis::RedisError> {
        let since = self
            .critical
            .lock()
            .ok()
            .and_then(|c| c.0)
            .map_or("-inf".to_string(), |ms| {
                ms.saturating_sub(CRITICAL_READ_OVERLAP_MS).to_string()
            });
        // Plain commands, not a script: admissions stay the only scripts Redis runs.
        let (secs, micros) = conn.time(key).await?;
        let got: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(key)
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

    /// Keys other replicas saw critical traffic reach since the last call, with when.
    pub fn take_critical(&self) -> Vec<(String, Nanos)> {
        match self.critical.lock() {
            Ok(mut c) if !c.1.is_empty() => std::mem::take(&mut c.1).into_iter().collect(),
            _ => Vec::new(),
        }
    }

    /// Writes a client's adaptive state (`field`, `value`) into the hash `key` for `ttl`,
    /// in the background.
    pub fn share_adaptive(
        mut conn: Conn,
        key: String,
        field: String,
        value: String,
        ttl: Duration,
        timeout: Duration,
    ) {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let entry = format!("{}|{value}", wall_ms().saturating_add(ttl_ms));
        tokio::spawn(async move {
            let mut pipe = redis::pipe();
            pipe.hset(&key, field, entry).ignore();
            pipe.pexpire(&key, i64::try_from(ttl_ms).unwrap_or(i64::MAX))
                .ignore();
            let _ = tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await;
        });
    }

    /// Adds `members` to the critical set `key` for `keep`, in the background.
    pub fn share_critical(
        &self,
        mut conn: Conn,
        scripts: Arc<Scripts>,
        key: String,
        members: Vec<String>,
        keep: Duration,
        timeout: Duration,
    ) {
        let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1);
        let max = self.max_keys;
        tokio::spawn(async move {
            let learn = scripts.learn_critical(&mut conn, key, keep_ms, max, members);
            let _ = tokio::time::timeout(timeout, learn).await;
        });
    }
}
