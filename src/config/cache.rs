//! `[[cache]]` entries and `[cache_settings]`: which read-only answers pacer may keep and
//! hand out again (see [`crate::cache`]), and how much memory that may take.

use super::{ConfigError, Dur};
use serde::Deserialize;
use std::collections::HashSet;
use std::time::Duration;

/// Default `[cache_settings] max_bytes`: 32 MiB.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 32 * 1024 * 1024;
/// Default `[cache_settings] max_entry_bytes`: 256 KiB.
pub const DEFAULT_CACHE_MAX_ENTRY_BYTES: u64 = 256 * 1024;
/// Largest `[cache_settings] max_bytes` (4 GiB): the cache lives in pacer's memory.
pub const MAX_CACHE_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Longest `[[cache]] ttl`: a copy older than a day is no longer an answer.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(24 * 3600);

/// Who may receive a cached answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheShare {
    /// Only requests with the same credentials (bearer token, or whatever `Authorization`
    /// carries) receive it.
    #[default]
    Token,
    /// Every token of the same caller (the OAuth client, or the route's identity) receives
    /// it: safe only when the client's tokens all see the same data, i.e. a
    /// client-credentials client, never a user's token.
    Client,
}

impl CacheShare {
    /// The value as written.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheShare::Token => "token",
            CacheShare::Client => "client",
        }
    }
}

/// `[[cache]]`: answers to a read-only endpoint kept for `ttl`, and identical requests in
/// flight coalesced.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Endpoint template, `GET /path/{param}/*` or `HEAD ...`; the same templates as limits.
    #[serde(rename = "match")]
    pub matches: String,
    /// How long an answer is handed out again.
    pub ttl: Dur,
    /// The upstream it applies to; all when omitted.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Who may receive a cached answer.
    #[serde(default)]
    pub share: CacheShare,
    /// Larger answers stream through and are not kept; else `[cache_settings]`'s.
    #[serde(default)]
    pub max_entry_bytes: Option<u64>,
    /// Keep answers marked `Cache-Control: no-store` or `private` too.
    #[serde(default)]
    pub ignore_no_store: bool,
}

/// `[cache_settings]`: the memory the response cache may take.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// All kept answers together (bodies, headers and keys) at most; least recently used
    /// ones are dropped first.
    pub max_bytes: u64,
    /// Default of `[[cache]] max_entry_bytes`.
    pub max_entry_bytes: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
            max_entry_bytes: DEFAULT_CACHE_MAX_ENTRY_BYTES,
        }
    }
}

impl CacheConfig {
    /// The entry's largest kept answer under `settings`.
    pub fn entry_bytes(&self, settings: &CacheSettings) -> u64 {
        self.max_entry_bytes.unwrap_or(settings.max_entry_bytes)
    }
}

/// Adds every problem of the `[[cache]]` entries and `[cache_settings]` to `errors`.
pub(super) fn validate(
    entries: &[CacheConfig],
    settings: &CacheSettings,
    upstreams: &HashSet<&str>,
    errors: &mut Vec<ConfigError>,
) {
    let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
    if settings.max_bytes == 0 || settings.max_bytes > MAX_CACHE_BYTES {
        err(
            "cache_settings.max_bytes".into(),
            format!("must be between 1 and {MAX_CACHE_BYTES}"),
        );
    }
    if settings.max_entry_bytes == 0 || settings.max_entry_bytes > settings.max_bytes {
        err(
            "cache_settings.max_entry_bytes".into(),
            "must be at least 1 and at most max_bytes".into(),
        );
    }
    let mut seen = HashSet::new();
    for (i, c) in entries.iter().enumerate() {
        let p = format!("cache[{i}]");
        match crate::endpoint::Template::parse(&c.matches) {
            Err(e) => err(format!("{p}.match"), e.to_string()),
            Ok(t) => {
                let method = t.label().split(' ').next().unwrap_or_default();
                if !matches!(method, "GET" | "HEAD") {
                    err(
                        format!("{p}.match"),
                        format!(
                            "only GET and HEAD answers are cached, not {method:?} \
                             (a POST query changes nothing, but its body is not part of the key)"
                        ),
                    );
                }
                if !seen.insert((t.label().to_string(), c.upstream.clone())) {
                    err(
                        format!("{p}.match"),
                        format!("duplicate cache entry {:?}", c.matches),
                    );
                }
            }
        }
        if c.ttl.0.is_zero() {
            err(format!("{p}.ttl"), "must be greater than zero".into());
        } else if c.ttl.0 > MAX_CACHE_TTL {
            err(format!("{p}.ttl"), "must be at most 24h".into());
        }
        if let Some(u) = &c.upstream {
            if !upstreams.contains(u.as_str()) {
                err(
                    format!("{p}.upstream"),
                    format!("no [[upstream]] named {u:?}"),
                );
            }
        }
        if let Some(n) = c.max_entry_bytes {
            if n == 0 || n > settings.max_bytes {
                err(
                    format!("{p}.max_entry_bytes"),
                    "must be at least 1 and at most cache_settings.max_bytes".into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, MINIMAL};
    use super::*;

    fn errors(extra: &str) -> Vec<String> {
        match Config::parse(&format!("{MINIMAL}\n{extra}")) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn check_config_refuses_what_cannot_be_cached_with_key_paths() {
        let errs = errors(
            r#"
[cache_settings]
max_bytes = 1000
max_entry_bytes = 2000

[[cache]]
match = "POST /api/v2/analytics/queues/observations/query"
ttl = "5s"

[[cache]]
match = "GET /api/v2/routing/queues/{queueId}/estimatedwaittime"
ttl = "0s"
upstream = "nowhere"
max_entry_bytes = 0

[[cache]]
match = "* /api/v2/users/*"
ttl = "2d"
share = "everyone"
"#,
        );
        let has = |prefix: &str| errs.iter().any(|e| e.starts_with(prefix));
        for path in [
            "cache_settings.max_entry_bytes:",
            "cache[0].match: only GET and HEAD",
            "cache[1].ttl:",
            "cache[1].upstream:",
            "cache[1].max_entry_bytes:",
            "cache[2].match: only GET and HEAD",
            "cache[2].share:",
        ] {
            assert!(has(path), "no {path:?} in {errs:#?}");
        }
    }

    #[test]
    fn defaults_and_a_valid_entry() {
        let c = Config::parse(&format!(
            "{MINIMAL}\n[[cache]]\nmatch = \"GET /api/v2/users/{{userId}}/presences/purecloud\"\nttl = \"10s\"\nshare = \"client\"\n"
        ))
        .expect("valid");
        assert_eq!(c.cache_settings, CacheSettings::default());
        assert_eq!(c.caches[0].share, CacheShare::Client);
        assert_eq!(c.caches[0].entry_bytes(&c.cache_settings), 256 * 1024);
        assert_eq!(c.cache_settings.max_bytes, 32 * 1024 * 1024);
        // The genesys preset adds limits, never cache entries: staleness is the user's choice.
        let preset = Config::parse(
            "[[upstream]]\nname = \"g\"\nurl = \"https://api.mypurecloud.com\"\npreset = \"genesys\"\n[[route]]\nprefix = \"/\"\nupstream = \"g\"\n",
        )
        .expect("preset");
        assert!(preset.caches.is_empty());
        assert!(!preset.limits.is_empty());
    }

    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme
            .find("## Response cache and coalescing")
            .expect("section")..];
        let start = section.find("```toml\n").expect("example") + "```toml\n".len();
        let example = &section[start..start + section[start..].find("```").expect("end")];
        let c = Config::parse(&format!("{MINIMAL}\n{example}")).expect("README example");
        assert_eq!(c.caches.len(), 2);
        assert_eq!(c.caches[0].share, CacheShare::Client);
    }
}
