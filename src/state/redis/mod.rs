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
//!
//! One job per file: [`scripts`] (the Lua and its typed replies), [`keys`] (key names),
//! [`conn`] (connections and topologies), [`fallback`] (local shares, breaker, settle and
//! recovery), [`shared`] (adaptive states and critical keys the replicas share) and
//! [`backend`] (the [`RedisBackend`] that ties them, with its heartbeat).

mod backend;
mod conn;
mod fallback;
mod keys;
mod scripts;
mod shared;

pub use backend::RedisBackend;
