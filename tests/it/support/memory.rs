//! Resident memory of the test process.

use std::sync::atomic::{AtomicU64, Ordering};

/// Resident memory of this process, from `/proc/self/status` (Linux only).
pub fn vm_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Largest value seen, for sampling memory during a transfer.
#[derive(Debug, Default)]
pub struct Peak(AtomicU64);

impl Peak {
    /// Records the current VmRSS.
    pub fn sample_rss(&self) {
        if let Some(rss) = vm_rss_bytes() {
            self.0.fetch_max(rss, Ordering::Relaxed);
        }
    }

    /// The largest value recorded.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
