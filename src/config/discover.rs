//! `[discover]` and each limit's `discover = { namespace, key }`: reading the org's
//! published limits (see [`crate::discover`]), and their validation.

use super::*;

/// Shortest `[discover] interval`: each read is one API request per namespace.
pub const MIN_DISCOVER_INTERVAL: Duration = Duration::from_secs(10);

/// `[discover]`: read the org's published limits at start and every `interval`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiscoverConfig {
    /// The `[[credential]]` whose token reads the limits (it needs permission to).
    pub credential: String,
    /// The `[[upstream]]` (the Platform API) the limits are read from; when omitted, the
    /// one upstream with `preset = "genesys"`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Time between reads; default 1 h, at least [`MIN_DISCOVER_INTERVAL`].
    #[serde(default = "default_interval")]
    pub interval: Dur,
}

fn default_interval() -> Dur {
    Dur::secs(3600)
}

/// Where a limit's published value is: `GET …/limits/namespaces/{namespace}`, the entry
/// whose `key` is `key`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiscoverKey {
    pub namespace: String,
    pub key: String,
}

/// A namespace or key as Genesys spells them: letters, digits, `.`, `_`, `-` (they go
/// into a URL path and are compared as-is).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Config {
    /// The upstream `[discover]` reads from: its `upstream`, or the one `genesys` preset
    /// upstream.
    pub fn discover_upstream(&self) -> Option<&str> {
        let d = self.discover.as_ref()?;
        if let Some(u) = &d.upstream {
            return Some(u);
        }
        let mut genesys = self
            .upstreams
            .iter()
            .filter(|u| u.preset == Some(Preset::Genesys));
        match (genesys.next(), genesys.next()) {
            (Some(u), None) => Some(&u.name),
            _ => None,
        }
    }

    /// `[discover]` and every limit's `discover`.
    pub(super) fn validate_discover(&self, err: &mut dyn FnMut(String, String)) {
        for (i, l) in self.limits.iter().enumerate() {
            let Some(k) = &l.discover else { continue };
            let p = format!("limit[{i}].discover");
            if !valid_name(&k.namespace) {
                err(
                    format!("{p}.namespace"),
                    "must be 1-128 letters, digits, '.', '_' or '-'".into(),
                );
            }
            if !valid_name(&k.key) {
                err(
                    format!("{p}.key"),
                    "must be 1-128 letters, digits, '.', '_' or '-'".into(),
                );
            }
            if l.requests.is_none() {
                err(
                    p,
                    "only a rate limit (`requests` and `per`) can take a published value".into(),
                );
            }
        }
        let Some(d) = &self.discover else { return };
        if self.credential(&d.credential).is_none() {
            err(
                "discover.credential".into(),
                format!("no [[credential]] named {:?}", d.credential),
            );
        }
        match &d.upstream {
            Some(u) if self.upstream(u).is_none() => err(
                "discover.upstream".into(),
                format!("no [[upstream]] named {u:?}"),
            ),
            Some(_) => {}
            None if self.discover_upstream().is_none() => err(
                "discover.upstream".into(),
                "required unless exactly one [[upstream]] has preset = \"genesys\"".into(),
            ),
            None => {}
        }
        if d.interval.0 < MIN_DISCOVER_INTERVAL {
            err(
                "discover.interval".into(),
                format!("must be at least {}s", MIN_DISCOVER_INTERVAL.as_secs()),
            );
        }
    }
}
