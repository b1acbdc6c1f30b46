//! What discovery shows: per rate limit its configured, published and effective size and
//! where the effective one came from (`/status`, `pacer check-config --discover`).

use super::{read, Outcome};
use crate::config::{Config, LimitConfig};
use crate::credential::Credentials;
use crate::forward::Upstream;
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::Arc;

/// One rate limit's sizes (requests per window, before headroom) and their source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitReport {
    pub limit: String,
    pub upstream: Option<String>,
    /// Where its published value is, when it names one.
    pub namespace: Option<String>,
    pub key: Option<String>,
    pub configured: u64,
    /// The org's value in force (the last one read).
    pub published: Option<u64>,
    /// Why the last read gave no value for it.
    pub error: Option<String>,
    /// min(configured, published).
    pub effective: u64,
    /// `configured`, `discovered`, or either with why in parentheses (e.g.
    /// `configured (discovery failed: …)`).
    pub source: String,
    pub per_seconds: f64,
}

impl LimitReport {
    /// The report of a rate limit (`None` for a concurrency-only one), given the value in
    /// force and the last read's problem; `on` when `[discover]` is configured.
    pub(super) fn of(
        l: &LimitConfig,
        published: Option<u64>,
        problem: Option<&Outcome>,
        on: bool,
    ) -> Option<LimitReport> {
        let configured = l.requests?;
        let lowers = published.filter(|&p| p < configured);
        let error = match problem {
            Some(Outcome::Failed(e)) | Some(Outcome::NotPublished(e)) => Some(e.clone()),
            _ => None,
        };
        let base = if lowers.is_some() {
            "discovered"
        } else {
            "configured"
        };
        let source = match (l.discover.is_some() && on, problem) {
            (false, _) => base.to_string(),
            (true, Some(Outcome::Failed(e))) if lowers.is_some() => {
                format!("{base} (last read failed: {e})")
            }
            (true, Some(Outcome::Failed(e))) => format!("{base} (discovery failed: {e})"),
            (true, Some(Outcome::NotPublished(e))) => format!("{base} (not published: {e})"),
            (true, _) if published.is_none() => format!("{base} (not read yet)"),
            (true, _) => base.to_string(),
        };
        Some(LimitReport {
            limit: l.name.clone(),
            upstream: l.upstream.clone(),
            namespace: l.discover.as_ref().map(|k| k.namespace.clone()),
            key: l.discover.as_ref().map(|k| k.key.clone()),
            configured,
            published,
            error,
            effective: lowers.unwrap_or(configured),
            source,
            per_seconds: l.per.map_or(0.0, |d| d.0.as_secs_f64()),
        })
    }
}

/// `pacer check-config --discover`: reads the published limits once and describes each
/// rate limit's effective size and where it came from. A failed read is described, not
/// returned as an error: the configuration is still valid and pacer would run on its
/// configured values.
pub async fn check(config: &Config) -> String {
    let mut out = String::new();
    let Some(d) = &config.discover else {
        out.push_str("discover: no [discover] section; every limit is as configured\n");
        return out;
    };
    let upstream = config.discover_upstream().unwrap_or_default();
    let _ = writeln!(
        out,
        "discover: reading the org's limits from upstream {upstream:?} with credential {:?}",
        d.credential
    );
    let upstreams: Result<Vec<_>, _> = config
        .upstreams
        .iter()
        .map(|u| Upstream::new(u, 1).map(Arc::new))
        .collect();
    let upstreams = match upstreams {
        Ok(u) => u,
        Err(e) => {
            let _ = writeln!(
                out,
                "discover: FAILED: {e}; pacer would run on its configured values"
            );
            return out;
        }
    };
    let credentials = Credentials::new(config, upstreams);
    let reading = read(config, &credentials).await;
    for (namespace, error) in &reading.failures {
        let _ = writeln!(
            out,
            "discover: FAILED to read namespace {namespace:?}: {error}; pacer would run on its configured values"
        );
    }
    for (l, outcome) in config.limits.iter().zip(&reading.outcomes) {
        let published = match outcome {
            Some(Outcome::Published(n)) => Some(*n),
            _ => None,
        };
        let problem = outcome
            .as_ref()
            .filter(|o| !matches!(o, Outcome::Published(_)));
        let Some(r) = LimitReport::of(l, published, problem, true) else {
            continue;
        };
        let upstream = r
            .upstream
            .as_deref()
            .map_or_else(String::new, |u| format!(" (upstream {u})"));
        let published = r
            .published
            .map_or_else(|| "-".to_string(), |p| p.to_string());
        let _ = writeln!(
            out,
            "limit {:?}{upstream}: configured {}, published {published}, effective {} per {}s: {}",
            r.limit, r.configured, r.effective, r.per_seconds, r.source
        );
    }
    out
}
