//! `[usage]`: poll the Genesys Usage API for the whole organization's requests per OAuth
//! client (see [`crate::usage`]).

use super::*;

/// Shortest `[usage] interval`: each poll is a query, one or more result reads and a
/// name look-up per new client, so a poll every few seconds would itself eat the quota.
pub const MIN_USAGE_INTERVAL: Duration = Duration::from_secs(1);

/// `[usage]`: which credential reads usage, how often, and whether outside consumption
/// lowers pacer's own ceilings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// The `[[credential]]` whose token queries usage (needs `Usage > Client > View` and
    /// `OAuth > Client > View`); no polling without one.
    pub credential: Option<String>,
    /// The API `[[upstream]]` to query; default [`Config::usage_upstream`].
    pub upstream: Option<String>,
    /// Time between polls.
    pub interval: Dur,
    /// Lower a configured client's per-client ceiling by the rate it is used outside pacer.
    pub subtract: bool,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            credential: None,
            upstream: None,
            interval: Dur::secs(300),
            subtract: false,
        }
    }
}

impl Config {
    /// The index of the upstream `[usage]` queries: `[usage] upstream`, else the first
    /// upstream with `preset = "genesys"`, else the first that no `[[credential]]` logs in
    /// through.
    pub fn usage_upstream(&self) -> Option<usize> {
        if let Some(name) = &self.usage.upstream {
            return self.upstream_index(name);
        }
        let logins: HashSet<&str> = self
            .credentials
            .iter()
            .map(|c| c.upstream.as_str())
            .collect();
        self.upstreams
            .iter()
            .position(|u| u.preset == Some(Preset::Genesys))
            .or_else(|| {
                self.upstreams
                    .iter()
                    .position(|u| !logins.contains(u.name.as_str()))
            })
    }

    /// `[usage]`: a known credential, a known upstream, an interval of at least
    /// [`MIN_USAGE_INTERVAL`].
    pub(super) fn validate_usage(&self, err: &mut impl FnMut(String, String)) {
        let u = &self.usage;
        if let Some(name) = &u.credential {
            if self.credential(name).is_none() {
                err(
                    "usage.credential".into(),
                    format!("no [[credential]] named {name:?}"),
                );
            } else if u.upstream.is_none() && self.usage_upstream().is_none() {
                err(
                    "usage.upstream".into(),
                    "no API upstream to query: name one".into(),
                );
            }
        } else if u.subtract {
            err(
                "usage.subtract".into(),
                "needs usage.credential: without polls there is nothing to subtract".into(),
            );
        }
        if let Some(name) = &u.upstream {
            if self.upstream_index(name).is_none() {
                err(
                    "usage.upstream".into(),
                    format!("no [[upstream]] named {name:?}"),
                );
            }
        }
        if u.interval.0 < MIN_USAGE_INTERVAL {
            err(
                "usage.interval".into(),
                format!(
                    "must be at least {}s: every poll is itself counted against the limits",
                    MIN_USAGE_INTERVAL.as_secs()
                ),
            );
        }
    }
}
