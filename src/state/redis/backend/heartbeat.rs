//! The heartbeat: connects (and reconnects), registers this replica and counts the live
//! ones, renews concurrency leases, reads what the replicas share, and after an outage
//! replays this replica's sends before Redis is used again.

use super::RedisBackend;
use crate::state::redis::conn::Conn;
use crate::state::redis::fallback::SETTLE;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// Heartbeat period: replica count, lease renewal, breaker probes.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica whose heartbeat is older than this no longer counts.
const REPLICA_STALE_MS: u64 = 10_000;
/// Failed heartbeats in a row after which the connection is replaced.
const DEAD_AFTER_BEATS: u32 = 2;
/// Longest wait between reconnection attempts while Redis is down.
const MAX_RECONNECT: Duration = Duration::from_secs(1);
/// A heartbeat younger than this means the replica is talking to Redis now.
const FRESH_MS: u64 = 3_000;
/// Heartbeat period while settling, to notice returning peers quickly.
const SETTLE_POLL: Duration = Duration::from_millis(250);

/// Connects (and reconnects with backoff), announces this replica, learns how many there
/// are, renews leases, and closes the breaker once Redis answers again.
pub(super) async fn run(backend: std::sync::Weak<RedisBackend>) {
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
                    b.scripts.load(&mut c, timeout).await;
                    if let Ok(mut slot) = b.conn.write() {
                        *slot = Some(c.clone());
                    }
                    backoff = Duration::from_millis(100);
                    c
                }
                _ => {
                    b.health().unreachable();
                    drop(b);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RECONNECT);
                    continue;
                }
            },
        };
        let recovering = b.health().recovering();
        let beat = tokio::time::timeout(timeout, async {
            if recovering {
                // Tell the shared windows what this replica sent meanwhile, before the
                // heartbeat that tells the peers it is back.
                replay(&b, &mut conn).await?;
            }
            let beat = beat_once(&b, &mut conn).await?;
            // Other replicas' cuts and learned ceilings; a failure here is no outage.
            if let Err(e) = b
                .shared
                .refresh_adaptive(&mut conn, &b.keys.adaptive())
                .await
            {
                tracing::debug!(error = %e, "reading shared adaptive state");
            }
            Ok::<_, redis::RedisError>(beat)
        })
        .await;
        match beat {
            Ok(Ok((replicas, fresh))) => {
                failed_beats = 0;
                if recovering {
                    b.health().replayed(Instant::now());
                    tracing::info!(settle = ?SETTLE, "redis reachable: replayed local sends, sharing again once the peers are back");
                }
                b.health().reachable();
                let known = b.replicas.load(Ordering::SeqCst);
                let replicas = if b.cfg.replicas > 0 {
                    b.cfg.replicas
                } else if b.health().in_fallback() {
                    // Peers still reconnecting are not counted yet: a smaller count now
                    // would enlarge this replica's local share while they send theirs.
                    replicas.max(known)
                } else {
                    replicas.max(1)
                };
                b.health().peers_back(fresh >= replicas);
                // What the replicas learned about critical traffic (two round trips); a
                // failure is no outage, and a slow read does not hold up the next beat.
                let critical_key = b.keys.critical();
                let read = b.shared.refresh_critical(&mut conn, &critical_key);
                match tokio::time::timeout(b.cfg.timeout.0 * 2, read).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "reading the critical set"),
                    Err(_) => tracing::debug!("reading the critical set: timeout"),
                }
                if b.replicas.swap(replicas, Ordering::SeqCst) != replicas {
                    b.local.rescale(&b.set, replicas);
                }
            }
            _ => {
                b.failed("heartbeat");
                b.health().unreachable();
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
        let (up, in_fallback) = {
            let health = b.health();
            (health.up(), health.in_fallback())
        };
        let pause = if !up {
            backoff.max(Duration::from_millis(200))
        } else if in_fallback {
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
    let replicas_key = b.keys.replicas();
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

/// Writes this replica's recent sends (the mirror) into Redis after an outage.
async fn replay(b: &RedisBackend, conn: &mut Conn) -> Result<(), redis::RedisError> {
    let now = b.clock.now();
    let exported = b.local.with(|set, ledger, _| ledger.export(set, now));
    if exported.is_empty() {
        return Ok(());
    }
    let (secs, micros) = conn.time(&b.keys.replicas()).await?;
    let redis_now = secs.saturating_mul(1_000_000).saturating_add(micros);
    let mut pipe = redis::pipe();
    let mut n = 0u64;
    for (layer, entries) in exported {
        let key = b.keys.layer(&layer, false);
        let span_ms = b.set.specs[layer.limit].window / 1_000_000;
        for (at, count) in entries {
            // A send recorded after `now` was read is as recent as `now`.
            let score = redis_now.saturating_sub(now.saturating_sub(at) / 1000);
            for _ in 0..count {
                n += 1;
                pipe.zadd(&key, format!("{}:replay:{n}", b.replica), score)
                    .ignore();
            }
        }
        pipe.pexpire(&key, (span_ms + 1000) as i64).ignore();
    }
    pipe.query_async::<()>(conn).await
}
