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
mod prom;
mod raw;
mod raw_upstream;
pub mod redis;
mod tls;
mod upstream;

pub use body::*;
pub use client::*;
pub use instance::*;
pub use memory::*;
pub use ports::*;
pub use prom::*;
pub use raw::*;
pub use raw_upstream::*;
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
    match tokio::time::timeout(TEST_LIMIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {TEST_LIMIT:?}"),
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

/// The one lock of the test process. Every test that creates load, measures time, starts
/// Redis or a child process, or is otherwise sensitive to what runs beside it holds it
/// for its whole run (take it first, before starting anything); light tests do not take
/// it and run in parallel with anything. A test that failed does not poison it.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until no other heavy test runs; hold the guard to the end of the test.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

/// [`serial`] for a test that is not async.
pub fn serial_blocking() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.blocking_lock()
}
