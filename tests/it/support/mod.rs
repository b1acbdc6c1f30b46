//! Helpers shared by the black-box tests, one job a module: a pacer instance on
//! `127.0.0.1:0`, a recording upstream, HTTP clients, raw sockets, Prometheus text,
//! throw-away TLS certificates, Redis servers and ports.
//!
//! Everything here talks over real sockets; nothing reaches into pacer's internals
//! beyond `Config::parse` and `app::start`.

mod body;
mod client;
mod instance;
mod memory;
mod ports;
mod process;
mod prom;
mod raw;
mod raw_upstream;
pub mod redis;
mod tally;
mod tls;
mod upstream;

pub use body::*;
pub use client::*;
pub use instance::*;
pub use memory::*;
pub use ports::*;
pub use process::*;
pub use prom::*;
pub use raw::*;
pub use raw_upstream::*;
pub use tally::*;
pub use tls::*;
pub use upstream::*;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Error type of test bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Body type every test client and the test upstream send.
pub type TestBody = UnsyncBoxBody<Bytes, BoxError>;

/// Upper bound for one whole test; a hang fails instead of stalling the suite.
pub const TEST_LIMIT: Duration = Duration::from_secs(25);

/// Runs `f`, failing the test if it takes longer than [`TEST_LIMIT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    within_for(what, TEST_LIMIT, f).await
}

/// Runs `f`, failing the test if it takes longer than `limit`.
pub async fn within_for<T>(what: &str, limit: Duration, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {limit:?}"),
    }
}

/// A new, empty directory under the system temporary directory.
pub fn unique_temp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!(
        "pacer-{tag}-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// How much of the machine a test takes while it runs; [`slot`] shares the machine by it.
/// Measured alone on 2 cores (`/usr/bin/time`, CPU time over wall time) when the classes
/// were drawn; light tests (no slot at all) run beside anything.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// Waits on the wall clock, on timeouts or on child processes and uses little CPU
    /// (under a fifth of a core): simulator windows, Retry-After, Redis outages, slow
    /// peers. Runs beside up to three others of its kind, so their waits overlap.
    Timed,
    /// Keeps a good part of a core busy (the Python SDK importing itself, a Redis cluster,
    /// several replicas, a fault proxy) but asserts no tight timing: two slots.
    Busy,
    /// Floods pacer, measures the process's memory or CPU, or asserts timing tight
    /// enough that a neighbour could break it: runs alone.
    Alone,
}

/// Slots of the machine's one semaphore; [`Load::Alone`] takes all of them.
const SLOTS: u32 = 4;

/// The test process's one semaphore. Fair (first come, first served), so a waiting
/// [`Load::Alone`] test is not starved by a stream of timed ones. A test that failed does
/// not poison it.
static MACHINE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(SLOTS as usize);

/// Waits until the machine has room for a test of this `load`; hold the permit to the end
/// of the test (take it first, before starting anything). Many tests at once only help
/// when the harness runs that many: `.cargo/config.toml` sets `RUST_TEST_THREADS`.
pub async fn slot(load: Load) -> tokio::sync::SemaphorePermit<'static> {
    let n = match load {
        Load::Timed => 1,
        Load::Busy => 2,
        Load::Alone => SLOTS,
    };
    MACHINE
        .acquire_many(n)
        .await
        .expect("the semaphore is never closed")
}

/// [`slot`] for a test that is not async.
pub fn slot_blocking(load: Load) -> tokio::sync::SemaphorePermit<'static> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(slot(load))
}
