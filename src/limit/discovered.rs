//! A limit's published ceiling (`[discover]`, see [`crate::discover`]), shared by every copy
//! of its [`super::LimitSpec`] so that discovery lowers it at runtime without rebuilding
//! the limits or losing their counters.

use super::{scaled, LimitSpec};
use std::sync::atomic::{AtomicU64, Ordering};

impl LimitSpec {
    /// The rate ceiling of a priority class in force now: the configured one cut to
    /// `scale` (adaptive cuts and learned ceilings are shares of the configured size), and
    /// never above the published one (`[discover]`).
    pub fn ceiling_now(&self, class: usize, reserved: bool, scale: f64) -> Option<u64> {
        let c = self.rate_ceiling(class, reserved)?;
        let published = self.discovered.as_ref().map_or(c, |d| d.cap(c));
        Some(scaled(c, scale).min(published))
    }

    /// Requests per window after headroom in force now: the configured number, or the
    /// published one where discovery lowered it.
    pub fn requests_now(&self) -> Option<u64> {
        let n = self.requests?;
        Some(self.discovered.as_ref().map_or(n, |d| d.cap(n)))
    }
}

/// The published size of one rate limit, after its headroom, relative to its configured
/// size. Only ever lowers a ceiling: a published value at or above the configured one, or
/// none (0), leaves every ceiling as configured.
#[derive(Debug)]
pub struct Discovered {
    /// Requests per window after headroom, as configured.
    configured: u64,
    /// The same as published; 0 while nothing is published.
    published: AtomicU64,
}

impl Discovered {
    /// Nothing published yet for a limit of `configured` requests per window (after
    /// headroom).
    pub fn new(configured: u64) -> Discovered {
        Discovered {
            configured,
            published: AtomicU64::new(0),
        }
    }

    /// Sets the published size (after headroom); 0 forgets it.
    pub fn set(&self, published: u64) {
        self.published.store(published, Ordering::Relaxed);
    }

    /// The published size in force, when it lowers the configured one.
    pub fn lowered(&self) -> Option<u64> {
        let p = self.published.load(Ordering::Relaxed);
        (p > 0 && p < self.configured).then_some(p)
    }

    /// `ceiling` (one class's share of the configured size, possibly divided among
    /// replicas) cut in the proportion published / configured, never below 1.
    pub fn cap(&self, ceiling: u64) -> u64 {
        match self.lowered() {
            None => ceiling,
            Some(p) => {
                let cut = (ceiling as u128) * (p as u128) / (self.configured.max(1) as u128);
                (cut as u64).clamp(1, ceiling.max(1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowers_never_raises() {
        let d = Discovered::new(100);
        assert_eq!(d.cap(100), 100);
        d.set(20);
        assert_eq!(d.cap(100), 20);
        assert_eq!(d.cap(80), 16);
        assert_eq!(d.cap(1), 1);
        d.set(500);
        assert_eq!(d.cap(100), 100);
        assert_eq!(d.lowered(), None);
        d.set(0);
        assert_eq!(d.cap(100), 100);
    }
}
