//! The simulator's configuration: Genesys' documented limits by default, every key
//! optional, unknown keys rejected.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::endpoint::Template;

/// How the simulated Genesys org limits its callers.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Window length of every `requests` limit that does not set its own `per`.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// Delay before answering each `/api/v2` request.
    #[serde(deserialize_with = "duration")]
    pub latency: Duration,
    /// Extra delay drawn uniformly from `0..=latency_jitter`.
    #[serde(deserialize_with = "duration")]
    pub latency_jitter: Duration,
    /// Approximate size of a 200 body, in bytes.
    pub body_bytes: usize,
    /// Lifetime of issued tokens (`expires_in`).
    #[serde(deserialize_with = "duration")]
    pub token_ttl: Duration,
    /// Organization id reported by `/api/v2/tokens/me`.
    pub org_id: String,
    /// Requests per OAuth client per window (`org.app.user.rate.per.minute`).
    pub client_requests: u64,
    /// Requests of the whole org per window.
    pub org_requests: u64,
    /// Token issuances per client per window (`client.credentials.token.rate.per.minute`).
    pub token_requests: u64,
    /// In-flight `/api/v2` requests per client; 0 = unlimited.
    pub client_concurrency: u64,
    /// Analytics details jobs running at once per client; more creations get 429. 0 =
    /// unlimited.
    pub job_concurrency: u64,
    /// How long each analytics details job runs before it is FULFILLED.
    #[serde(deserialize_with = "duration")]
    pub job_duration: Duration,
    /// Send `inin-ratelimit-count`/`-allowed`/`-reset` on `/api/v2` answers, as Genesys
    /// does; off for an upstream that says nothing about its budget.
    pub rate_headers: bool,
    /// Known OAuth clients.
    #[serde(rename = "client")]
    pub clients: Vec<SimClient>,
    /// Per-endpoint limits.
    #[serde(rename = "endpoint")]
    pub endpoints: Vec<SimEndpoint>,
}

/// One OAuth client the simulated login service knows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimClient {
    /// OAuth client id.
    pub id: String,
    /// OAuth client secret.
    pub secret: String,
    /// Display name reported by `/api/v2/tokens/me`; the id when omitted.
    #[serde(default)]
    pub name: Option<String>,
}

/// Who shares one endpoint limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each OAuth client has its own count.
    #[default]
    Client,
    /// The whole org shares one count.
    Org,
}

/// A limit on the requests matching one method + path template.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimEndpoint {
    /// `METHOD /path/{param}/...`, `*` as method for any; a trailing `*` matches any rest.
    #[serde(rename = "match")]
    pub template: Template,
    /// Requests per window; no rate limit when omitted.
    #[serde(default)]
    pub requests: Option<u64>,
    /// Window of this limit; the global `window` when omitted.
    #[serde(default, deserialize_with = "opt_duration")]
    pub per: Option<Duration>,
    /// Who shares the count.
    #[serde(default)]
    pub scope: Scope,
    /// In-flight cap per scope key; 0 = none.
    #[serde(default)]
    pub concurrency: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            window: Duration::from_secs(60),
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            body_bytes: 64,
            token_ttl: Duration::from_secs(24 * 60 * 60),
            org_id: "00000000-0000-4000-8000-000000000001".to_owned(),
            client_requests: 300,
            org_requests: 3000,
            token_requests: 300,
            client_concurrency: 0,
            // The field notes' "5-10 concurrent queries per org" (seed 004), lower end.
            job_concurrency: 5,
            job_duration: Duration::from_secs(30),
            rate_headers: true,
            clients: default_clients(),
            endpoints: default_endpoints(),
        }
    }
}

fn default_clients() -> Vec<SimClient> {
    [
        ("ivr-client", "ivr-secret", "IVR Data Actions"),
        ("bulk-client", "bulk-secret", "Bulk export"),
        ("reporting-client", "reporting-secret", "Reporting"),
        ("admin-client", "admin-secret", "Admin"),
    ]
    .into_iter()
    .map(|(id, secret, name)| SimClient {
        id: id.to_owned(),
        secret: secret.to_owned(),
        name: Some(name.to_owned()),
    })
    .collect()
}

fn default_endpoints() -> Vec<SimEndpoint> {
    // A literal that parses by construction; an empty list would only drop the default.
    Template::parse("PUT /api/v2/architect/ivrs/{ivrId}")
        .map(|template| SimEndpoint {
            template,
            requests: Some(100),
            per: None,
            scope: Scope::Client,
            concurrency: 0,
        })
        .into_iter()
        .collect()
}

impl SimConfig {
    /// Parses and validates a TOML document.
    pub fn from_toml_str(s: &str) -> Result<SimConfig, SimConfigError> {
        let config: SimConfig =
            toml::from_str(s).map_err(|e| SimConfigError::new(Kind::Parse(e.to_string())))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML file.
    pub fn from_file(p: &Path) -> Result<SimConfig, SimConfigError> {
        let text = std::fs::read_to_string(p).map_err(|source| {
            SimConfigError::new(Kind::Io {
                path: p.to_path_buf(),
                source,
            })
        })?;
        Self::from_toml_str(&text)
    }

    /// A known client by id.
    pub fn client(&self, id: &str) -> Option<&SimClient> {
        self.clients.iter().find(|c| c.id == id)
    }

    fn validate(&self) -> Result<(), SimConfigError> {
        let invalid = |msg: String| Err(SimConfigError::new(Kind::Invalid(msg)));
        if self.window.is_zero() {
            return invalid("window: must be longer than zero".into());
        }
        for (i, c) in self.clients.iter().enumerate() {
            if c.id.is_empty() {
                return invalid(format!("client[{i}].id: must not be empty"));
            }
            if self.clients[..i].iter().any(|o| o.id == c.id) {
                return invalid(format!("client[{i}].id: duplicate id {:?}", c.id));
            }
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if e.per.is_some_and(|p| p.is_zero()) {
                return invalid(format!("endpoint[{i}].per: must be longer than zero"));
            }
        }
        Ok(())
    }
}

impl SimEndpoint {
    /// The window of this endpoint's rate limit.
    pub fn window(&self, default: Duration) -> Duration {
        self.per.unwrap_or(default)
    }
}

/// Why a simulator configuration could not be loaded.
#[derive(Debug)]
pub struct SimConfigError {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    Parse(String),
    Invalid(String),
}

impl SimConfigError {
    fn new(kind: Kind) -> Self {
        SimConfigError { kind }
    }

    /// The file could not be read.
    pub fn is_io(&self) -> bool {
        matches!(self.kind, Kind::Io { .. })
    }

    /// The text is not TOML of the expected shape (including unknown keys).
    pub fn is_parse(&self) -> bool {
        matches!(self.kind, Kind::Parse(_))
    }

    /// The values parsed but contradict each other or are out of range.
    pub fn is_invalid(&self) -> bool {
        matches!(self.kind, Kind::Invalid(_))
    }
}

impl fmt::Display for SimConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Io { path, source } => write!(f, "reading {}: {source}", path.display()),
            Kind::Parse(msg) => write!(f, "simulator config: {msg}"),
            Kind::Invalid(msg) => write!(f, "simulator config: {msg}"),
        }
    }
}

impl std::error::Error for SimConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            Kind::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_document_gives_genesys_defaults() {
        let c = SimConfig::from_toml_str("").unwrap();
        assert_eq!(c.window, Duration::from_secs(60));
        assert_eq!(c.latency, Duration::ZERO);
        assert_eq!(c.body_bytes, 64);
        assert_eq!(c.token_ttl, Duration::from_secs(86_400));
        assert_eq!(c.org_id, "00000000-0000-4000-8000-000000000001");
        assert_eq!(
            (
                c.client_requests,
                c.org_requests,
                c.token_requests,
                c.client_concurrency
            ),
            (300, 3000, 300, 0)
        );
        let ids: Vec<_> = c.clients.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "ivr-client",
                "bulk-client",
                "reporting-client",
                "admin-client"
            ]
        );
        assert_eq!(c.client("ivr-client").unwrap().secret, "ivr-secret");
        assert_eq!(
            c.client("bulk-client").unwrap().name.as_deref(),
            Some("Bulk export")
        );
        assert_eq!(c.endpoints.len(), 1);
        let e = &c.endpoints[0];
        assert_eq!(e.template.to_string(), "PUT /api/v2/architect/ivrs/{ivrId}");
        assert_eq!(
            (e.requests, e.scope, e.concurrency),
            (Some(100), Scope::Client, 0)
        );
        assert_eq!(e.window(c.window), Duration::from_secs(60));
    }

    #[test]
    fn default_impl_matches_empty_document() {
        let d = SimConfig::default();
        assert_eq!(d.clients.len(), 4);
        assert_eq!(d.endpoints.len(), 1);
        assert_eq!(d.client_requests, 300);
    }

    #[test]
    fn parses_every_key() {
        let c = SimConfig::from_toml_str(
            r#"
            window = "2s"
            latency = "5ms"
            latency_jitter = "1ms"
            body_bytes = 200
            token_ttl = "1h"
            org_id = "org"
            client_requests = 5
            org_requests = 8
            token_requests = 2
            client_concurrency = 3
            job_concurrency = 2
            job_duration = "250ms"
            [[client]]
            id = "a"
            secret = "s"
            [[endpoint]]
            match = "POST /api/v2/analytics/*/details/jobs"
            scope = "org"
            concurrency = 2
            [[endpoint]]
            match = "GET /api/v2/users/*"
            requests = 7
            per = "500ms"
            "#,
        )
        .unwrap();
        assert_eq!(c.window, Duration::from_secs(2));
        assert_eq!(c.latency, Duration::from_millis(5));
        assert_eq!(c.latency_jitter, Duration::from_millis(1));
        assert_eq!(c.token_ttl, Duration::from_secs(3600));
        assert_eq!(
            (c.job_concurrency, c.job_duration),
            (2, Duration::from_millis(250))
        );
        assert_eq!(c.clients.len(), 1);
        assert_eq!(c.clients[0].name, None);
        assert_eq!(c.endpoints[0].scope, Scope::Org);
        assert_eq!(c.endpoints[0].requests, None);
        assert_eq!(c.endpoints[0].concurrency, 2);
        assert_eq!(c.endpoints[1].window(c.window), Duration::from_millis(500));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = SimConfig::from_toml_str("windw = \"1s\"").unwrap_err();
        assert!(e.is_parse(), "{e}");
        assert!(e.to_string().contains("windw"), "{e}");
        let e = SimConfig::from_toml_str("[[client]]\nid = \"a\"\nsecret = \"b\"\nsecrt = 1")
            .unwrap_err();
        assert!(e.is_parse(), "{e}");
        let e = SimConfig::from_toml_str("[[endpoint]]\nmatch = \"GET /x\"\nscop = \"org\"")
            .unwrap_err();
        assert!(e.is_parse(), "{e}");
    }

    #[test]
    fn bad_values_are_errors() {
        for doc in [
            "window = \"soon\"",
            "window = 60",
            "[[endpoint]]\nmatch = \"/no/method\"",
            "[[endpoint]]\nmatch = \"GET /a\"\nscope = \"planet\"",
        ] {
            let e = SimConfig::from_toml_str(doc).unwrap_err();
            assert!(e.is_parse(), "{doc}: {e}");
        }
        for doc in [
            "window = \"0s\"",
            "[[client]]\nid = \"a\"\nsecret = \"b\"\n[[client]]\nid = \"a\"\nsecret = \"c\"",
        ] {
            let e = SimConfig::from_toml_str(doc).unwrap_err();
            assert!(e.is_invalid(), "{doc}: {e}");
        }
    }

    #[test]
    fn missing_file_is_io_error() {
        let e = SimConfig::from_file(Path::new("/nonexistent/sim.toml")).unwrap_err();
        assert!(e.is_io());
    }
}
