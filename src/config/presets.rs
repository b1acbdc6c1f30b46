//! Documented limits of known APIs, added to an upstream that names a preset.
//!
//! Numbers come from Genesys' published limits and the field notes in `shared/seeds/`.
//! A `[[limit]]` with the same name (for that upstream or for all) replaces the preset's.

use super::{Dur, LimitConfig, Scope, UpstreamConfig};
use serde::Deserialize;

/// A known API whose limits pacer ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The Genesys Cloud Platform API (`api.<region>`).
    Genesys,
    /// Genesys Cloud login (`login.<region>`): token issuance.
    GenesysLogin,
}

struct Spec {
    name: &'static str,
    matches: Option<&'static str>,
    scope: Scope,
    requests: Option<(u64, u64)>,
    concurrency: Option<u64>,
    jobs: Option<u64>,
}

const GENESYS: &[Spec] = &[
    // org.app.user.rate.per.minute / per-token limit for client credentials.
    Spec {
        name: "per-client",
        matches: None,
        scope: Scope::Client,
        requests: Some((300, 60)),
        concurrency: None,
        jobs: None,
    },
    // Client-credentials requests of the whole org.
    Spec {
        name: "org",
        matches: None,
        scope: Scope::Global,
        requests: Some((3000, 60)),
        concurrency: None,
        jobs: None,
    },
    // Resource limit documented for IVR updates.
    Spec {
        name: "ivr-put",
        matches: Some("PUT /api/v2/architect/ivrs/{ivrId}"),
        scope: Scope::Client,
        requests: Some((100, 60)),
        concurrency: None,
        jobs: None,
    },
    // 50 concurrent Data Action executions per org.
    Spec {
        name: "data-actions",
        matches: Some("POST /api/v2/integrations/actions/{actionId}/execute"),
        scope: Scope::Global,
        requests: None,
        concurrency: Some(50),
        jobs: None,
    },
    // Analytics queries: 5-10 concurrent per org; keep two spare for wallboards.
    Spec {
        name: "analytics-queries",
        matches: Some("POST /api/v2/analytics/*/details/query"),
        scope: Scope::Global,
        requests: None,
        concurrency: Some(8),
        jobs: None,
    },
    // Analytics conversation- and user-details jobs hold one of the org's few concurrent
    // analytics slots from creation until they finish. The field notes (seed 004) give
    // "5-10 concurrent queries per org"; the preset keeps to the bottom of that range, for
    // both job families together.
    Spec {
        name: "analytics-jobs",
        matches: Some("POST /api/v2/analytics/*/details/jobs"),
        scope: Scope::Global,
        requests: None,
        concurrency: None,
        jobs: Some(5),
    },
];

const GENESYS_LOGIN: &[Spec] = &[
    // client.credentials.token.rate.per.minute
    Spec {
        name: "token-issuance",
        matches: Some("POST /oauth/token"),
        scope: Scope::Client,
        requests: Some((300, 60)),
        concurrency: None,
        jobs: None,
    },
];

impl Preset {
    fn specs(self) -> &'static [Spec] {
        match self {
            Preset::Genesys => GENESYS,
            Preset::GenesysLogin => GENESYS_LOGIN,
        }
    }
}

/// The preset limits of every upstream that names a preset, followed by the written ones.
pub(super) fn with_preset_limits(
    upstreams: &[UpstreamConfig],
    written: Vec<LimitConfig>,
) -> Vec<LimitConfig> {
    let mut out = Vec::new();
    for u in upstreams {
        let Some(preset) = u.preset else { continue };
        for spec in preset.specs() {
            let overridden = written
                .iter()
                .any(|l| l.name == spec.name && l.upstream.as_deref().is_none_or(|n| n == u.name));
            if overridden {
                continue;
            }
            out.push(LimitConfig {
                name: spec.name.to_string(),
                upstream: Some(u.name.clone()),
                matches: spec.matches.map(str::to_string),
                scope: spec.scope,
                requests: spec.requests.map(|(n, _)| n),
                per: spec.requests.map(|(_, secs)| Dur::secs(secs)),
                concurrency: spec.concurrency,
                jobs: spec.jobs,
                job_ttl: None,
                headroom: 0.0,
                guard: None,
                shadow: false,
            });
        }
    }
    out.extend(written);
    out
}
