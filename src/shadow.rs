//! Shadow mode, for rolling pacer out in front of production: a shadow limit (`[[limit]]
//! shadow = true`, or every limit and every upstream pause with `[server] shadow = true`)
//! counts and decides as usual but never queues or sheds. A request it would have held is
//! forwarded at once, and what would have happened is counted here and in
//! `pacer_shadow_shed_total` / `pacer_shadow_wait_seconds`.
//!
//! What "counts as usual" means for a sliding window whose over-quota requests are let
//! through: the window counts every request that was really sent — the same sends the
//! upstream counts — not the smaller set enforcement would have sent. So each decision is
//! "would this request have fit, given what really went out?": a shadow limit that mirrors
//! an upstream's own limit reports exactly the requests that upstream would refuse, and its
//! `/status` use is the real use. The price: under sustained overload it reports
//! more would-be sheds than enforcement would cause, since enforcement's own sheds would
//! have left room for later requests. Requests queued behind *other* limits are not counted
//! as ahead of a shadow decision: nothing queues for a shadow limit.

use crate::limit::window::Nanos;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What held a request back in shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subject {
    /// The limit at this index.
    Limit(usize),
    /// An upstream pause (429 + `Retry-After`) on the upstream at this index.
    Pause(usize),
}

/// A shadow layer that had no room for a request it let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WouldBlock {
    pub subject: Subject,
    /// How long until there would have been room; `None` when a concurrency cap was full
    /// (only a release could have made room, at a time no one can predict).
    pub wait: Option<Nanos>,
}

/// Why enforcement would have shed a request, as the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShadowReason {
    /// The predicted wait exceeds what was left of `max_wait`.
    WaitTooLong,
    /// The upstream's pause lasts longer than `max_wait`.
    UpstreamPaused,
    /// A concurrency cap was full: enforcement would have queued it for a release and shed
    /// it if none came within `max_wait`.
    Concurrency,
}

impl ShadowReason {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowReason::WaitTooLong => "wait_too_long",
            ShadowReason::UpstreamPaused => "upstream_paused",
            ShadowReason::Concurrency => "concurrency",
        }
    }
}

/// What enforcement would have done with a request a shadow layer let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Waited this long in the queue, then been sent.
    Wait(Duration),
    /// Been shed with 429.
    Shed(ShadowReason),
}

/// The verdict on `block` for a request that may still wait `budget` (its `max_wait`
/// less what it already waited for enforcing limits): the queue's own rule, wait or shed.
pub fn verdict(block: &WouldBlock, budget: Duration) -> Verdict {
    let Some(wait) = block.wait else {
        return Verdict::Shed(ShadowReason::Concurrency);
    };
    let wait = Duration::from_nanos(wait);
    if wait <= budget {
        return Verdict::Wait(wait);
    }
    Verdict::Shed(match block.subject {
        Subject::Limit(_) => ShadowReason::WaitTooLong,
        Subject::Pause(_) => ShadowReason::UpstreamPaused,
    })
}

/// What the shadow layers would have done, per (limit, client label), for `/status`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Tally {
    /// Requests enforcement would have shed, by reason.
    pub would_shed: HashMap<&'static str, u64>,
    /// Requests enforcement would have made wait.
    pub would_wait: u64,
    /// Their waits, summed.
    pub would_wait_seconds: f64,
}

/// Label sets the book keeps at most; later ones fold into the `other` client. Limits and
/// client labels are bounded already, this bounds their product.
const MAX_ENTRIES: usize = 10_000;

/// (limit label, client label).
type TallyKey = (Arc<str>, Arc<str>);

/// Running tallies of every shadow verdict, keyed by (limit label, client label).
#[derive(Debug, Default)]
pub struct ShadowBook {
    tallies: Mutex<HashMap<TallyKey, Tally>>,
}

impl ShadowBook {
    /// Adds one verdict.
    pub fn record(&self, limit: &Arc<str>, client: &Arc<str>, verdict: Verdict) {
        let mut tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (limit.clone(), client.clone());
        if tallies.len() >= MAX_ENTRIES && !tallies.contains_key(&key) {
            key.1 = Arc::from("other");
        }
        let t = tallies.entry(key).or_default();
        match verdict {
            Verdict::Wait(d) => {
                t.would_wait += 1;
                t.would_wait_seconds += d.as_secs_f64();
            }
            Verdict::Shed(r) => *t.would_shed.entry(r.as_str()).or_default() += 1,
        }
    }

    /// Every tally as (limit label, client label, tally), sorted.
    pub fn tallies(&self) -> Vec<(Arc<str>, Arc<str>, Tally)> {
        let tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = tallies
            .iter()
            .map(|((l, c), t)| (l.clone(), c.clone(), t.clone()))
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }
}

/// The `limit` label of an upstream pause's shadow verdicts.
pub fn pause_label(upstream: &str) -> String {
    format!("upstream_pause:{upstream}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    fn block(subject: Subject, wait: Option<Nanos>) -> WouldBlock {
        WouldBlock { subject, wait }
    }

    #[test]
    fn a_wait_within_the_budget_would_have_waited() {
        let b = block(Subject::Limit(0), Some(2 * S));
        assert_eq!(
            verdict(&b, Duration::from_secs(5)),
            Verdict::Wait(Duration::from_secs(2))
        );
        assert_eq!(
            verdict(&b, Duration::from_secs(2)),
            Verdict::Wait(Duration::from_secs(2))
        );
    }

    #[test]
    fn a_wait_past_the_budget_would_have_been_shed() {
        let limit = block(Subject::Limit(0), Some(6 * S));
        assert_eq!(
            verdict(&limit, Duration::from_secs(5)),
            Verdict::Shed(ShadowReason::WaitTooLong)
        );
        let pause = block(Subject::Pause(0), Some(6 * S));
        assert_eq!(
            verdict(&pause, Duration::from_secs(5)),
            Verdict::Shed(ShadowReason::UpstreamPaused)
        );
        assert_eq!(
            verdict(&pause, Duration::from_secs(6)),
            Verdict::Wait(Duration::from_secs(6))
        );
        // Nothing left of max_wait: any wait would have been shed.
        assert_eq!(
            verdict(&limit, Duration::ZERO),
            Verdict::Shed(ShadowReason::WaitTooLong)
        );
    }

    #[test]
    fn a_full_concurrency_cap_counts_as_its_own_reason() {
        let b = block(Subject::Limit(1), None);
        assert_eq!(
            verdict(&b, Duration::from_secs(30)),
            Verdict::Shed(ShadowReason::Concurrency)
        );
    }

    #[test]
    fn the_book_tallies_per_limit_and_client_and_stays_bounded() {
        let book = ShadowBook::default();
        let limit: Arc<str> = Arc::from("per-client");
        let ivr: Arc<str> = Arc::from("ivr");
        book.record(&limit, &ivr, Verdict::Wait(Duration::from_millis(1500)));
        book.record(&limit, &ivr, Verdict::Wait(Duration::from_millis(500)));
        book.record(&limit, &ivr, Verdict::Shed(ShadowReason::WaitTooLong));
        let t = book.tallies();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].2.would_wait, 2);
        assert!((t[0].2.would_wait_seconds - 2.0).abs() < 1e-9);
        assert_eq!(t[0].2.would_shed.get("wait_too_long"), Some(&1));
        for i in 0..MAX_ENTRIES + 50 {
            let client: Arc<str> = Arc::from(format!("c{i}"));
            book.record(&limit, &client, Verdict::Shed(ShadowReason::Concurrency));
        }
        let t = book.tallies();
        assert_eq!(t.len(), MAX_ENTRIES + 1, "capped, plus `other`");
        let other = t.iter().find(|(_, c, _)| &**c == "other").map(|e| &e.2);
        assert_eq!(
            other.and_then(|t| t.would_shed.get("concurrency")),
            Some(&51)
        );
    }
}
