//! Credential broker: OAuth clients (`[[credential]]`) whose tokens pacer fetches itself
//! with the client-credentials grant, so the apps calling through pacer hold no Genesys
//! secret.
//!
//! [`Credentials`] is built once per configuration (held by [`crate::proxy::Proxy`]). Per
//! credential it keeps one token: fetched from the login upstream by one caller however
//! many arrive at once (single flight), handed out until `refresh_before` its expiry, and
//! dropped by [`Credentials::invalidate`] when an upstream answers 401 to it. Tokens and
//! secrets never reach logs, `Debug` output or metrics: a [`Token`] prints as a hash.

mod phase;
mod slot;

pub use phase::CredentialForward;
#[cfg(test)]
mod tests;

use crate::answer::{collect_limited, full};
use crate::broker::issued_token;
use crate::config::{Config, CredentialConfig};
use crate::forward::Upstream;
use crate::metrics::Metrics;
use base64::Engine as _;
use http::{header, HeaderValue, Method, Request, StatusCode};
use sha2::{Digest, Sha256};
use slot::Slot;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Largest token answer read.
const MAX_TOKEN_ANSWER: usize = 64 * 1024;

/// Largest answer [`Credentials::get_json`] reads.
pub const MAX_JSON_BYTES: usize = 1024 * 1024;

/// A bearer token pacer fetched. Compares by value; prints only a short hash of itself.
#[derive(Clone)]
pub struct Token(Arc<TokenInner>);

struct TokenInner {
    value: String,
    header: HeaderValue,
}

impl Token {
    /// A token, if it can be sent in an `Authorization` header.
    pub fn new(value: &str) -> Option<Token> {
        if value.is_empty() {
            return None;
        }
        let mut header = HeaderValue::from_str(&format!("Bearer {value}")).ok()?;
        header.set_sensitive(true);
        Some(Token(Arc::new(TokenInner {
            value: value.to_string(),
            header,
        })))
    }

    /// `Bearer <token>`, marked sensitive (never HPACK-indexed).
    pub fn authorization(&self) -> HeaderValue {
        self.0.header.clone()
    }

    /// The token itself, to send; never log it.
    pub fn expose(&self) -> &str {
        &self.0.value
    }

    /// First 8 hex digits of the token's SHA-256: enough to tell tokens apart in a log.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.0.value.as_bytes());
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.value == other.0.value
    }
}

impl Eq for Token {}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(sha256:{})", self.fingerprint())
    }
}

/// Why pacer has no token, or its own call failed. Carries no token or secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// No `[[credential]]` by that name.
    #[error("no [[credential]] named {0:?}")]
    Unknown(String),
    /// No `[[upstream]]` by that name.
    #[error("no [[upstream]] named {0:?}")]
    UnknownUpstream(String),
    /// The upstream could not be reached (connection, TLS, protocol).
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// No complete answer within the upstream's `timeout`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The upstream answered with this status: the token endpoint for a token, the API
    /// for [`Credentials::get_json`] (401 after one retry with a fresh token).
    #[error("upstream answered {0}")]
    Status(u16),
    /// The answer was not what was asked for (not a token, not JSON, too large).
    #[error("unusable answer: {0}")]
    BadAnswer(&'static str),
}

/// Called for every request [`Credentials`] sends: upstream index, OAuth client id,
/// method and path. [`crate::proxy::Proxy`] counts them against the limits
/// (`Admission::record_sent`), so pacer's own token exchanges and API calls use the same
/// quotas as the traffic it forwards.
pub type SendHook = Arc<dyn Fn(usize, &str, &Method, &str) + Send + Sync>;

struct Entry {
    config: CredentialConfig,
    /// Index of the login upstream.
    upstream: usize,
    /// Its URL, so that a reload keeps a token only for the same login service.
    login_url: String,
    slot: Arc<Slot>,
}

/// Every configured credential and its cached token; built once per configuration.
pub struct Credentials {
    entries: HashMap<String, Entry>,
    upstreams: Vec<Arc<Upstream>>,
    on_send: Option<SendHook>,
    metrics: Option<Arc<Metrics>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("names", &self.entries.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// The credentials of a validated configuration; `upstreams` are its upstream clients
    /// in configuration order. A credential naming an unknown upstream is left out
    /// (validation refuses such a configuration).
    pub fn new(config: &Config, upstreams: Vec<Arc<Upstream>>) -> Credentials {
        let entries = config
            .credentials
            .iter()
            .filter_map(|c| {
                let upstream = config.upstream_index(&c.upstream)?;
                let login_url = config.upstreams.get(upstream)?.url.clone();
                Some((
                    c.name.clone(),
                    Entry {
                        config: c.clone(),
                        upstream,
                        login_url,
                        slot: Arc::default(),
                    },
                ))
            })
            .collect();
        Credentials {
            entries,
            upstreams,
            on_send: None,
            metrics: None,
        }
    }

    /// Counts exchanges in `pacer_credential_exchanges_total`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Credentials {
        self.metrics = Some(metrics);
        self
    }

    /// Calls `hook` for every request sent (see [`SendHook`]).
    pub fn with_send_hook(mut self, hook: SendHook) -> Credentials {
        self.on_send = Some(hook);
        self
    }

    /// Keeps the cached tokens of `old` (a previous configuration's credentials) for every
    /// credential whose settings and login URL are unchanged, so a reload costs no exchange.
    pub fn carry_over(mut self, old: &Credentials) -> Credentials {
        for (name, entry) in &mut self.entries {
            if let Some(prev) = old.entries.get(name) {
                if prev.config == entry.config && prev.login_url == entry.login_url {
                    entry.slot = prev.slot.clone();
                }
            }
        }
        self
    }

    /// True when no credential is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The configured credential names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// `/status` → `credentials`: per credential (by name) its OAuth client id, login
    /// upstream and token state (see `Slot::report`); never a token or a secret.
    pub fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let mut names: Vec<&String> = self.entries.keys().collect();
        names.sort();
        let rows = names.into_iter().map(|name| {
            let e = &self.entries[name];
            let mut row = e.slot.report(now);
            row["name"] = name.as_str().into();
            row["client_id"] = e.config.client_id.as_str().into();
            row["upstream"] = e.config.upstream.as_str().into();
            row
        });
        serde_json::Value::Array(rows.collect())
    }

    /// The OAuth client id of credential `name`: the caller identity of its requests.
    pub fn client_id(&self, name: &str) -> Option<&str> {
        self.entries.get(name).map(|e| e.config.client_id.as_str())
    }

    /// The token of credential `name`: cached until `refresh_before` its expiry, else
    /// fetched from the login upstream by one caller while concurrent callers wait for it
    /// (or keep the old token while it has not expired). After a failed exchange, callers
    /// get that error for a second without another exchange. Never waits longer than the
    /// login upstream's `timeout` per exchange.
    pub async fn token(&self, name: &str) -> Result<Token, CredentialError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| CredentialError::Unknown(name.to_string()))?;
        let refresh_before = entry.config.refresh_before.map(|d| d.0);
        entry
            .slot
            .get(refresh_before, || self.exchange(entry))
            .await
    }

    /// After an upstream answered 401 to `token`: drops it if it is still credential
    /// `name`'s cached token, so exactly one new exchange follows however many callers got
    /// the 401. True when it was dropped.
    pub fn invalidate(&self, name: &str, token: &Token) -> bool {
        let dropped = self
            .entries
            .get(name)
            .is_some_and(|e| e.slot.invalidate(token));
        if dropped {
            tracing::info!(credential = name, token = %token.fingerprint(), "token refused upstream; fetching a new one");
        }
        dropped
    }

    /// `GET path` (with an optional `?query`) on upstream `upstream` with credential
    /// `name`'s token, for pacer's own calls (limits discovery, usage): the JSON answer of
    /// a 2xx, read up to [`MAX_JSON_BYTES`] within the upstream's `timeout`. A 401 drops
    /// the token and tries once more with a fresh one.
    pub async fn get_json(
        &self,
        name: &str,
        upstream: &str,
        path: &str,
    ) -> Result<serde_json::Value, CredentialError> {
        self.call_json(name, upstream, Method::GET, path, None)
            .await
    }

    /// Like [`Credentials::get_json`], but `POST path` with `body` as JSON (the usage
    /// query). A 2xx answer's JSON body, e.g. a 202's.
    pub async fn post_json(
        &self,
        name: &str,
        upstream: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, CredentialError> {
        let body = bytes::Bytes::from(body.to_string());
        self.call_json(name, upstream, Method::POST, path, Some(body))
            .await
    }

    /// One JSON call of pacer's own with credential `name`'s token; see
    /// [`Credentials::get_json`].
    async fn call_json(
        &self,
        name: &str,
        upstream: &str,
        method: Method,
        path: &str,
        body: Option<bytes::Bytes>,
    ) -> Result<serde_json::Value, CredentialError> {
        let index = self
            .upstreams
            .iter()
            .position(|u| &*u.name == upstream)
            .ok_or_else(|| CredentialError::UnknownUpstream(upstream.to_string()))?;
        let target = self.upstreams[index].clone();
        let client_id = self
            .client_id(name)
            .ok_or_else(|| CredentialError::Unknown(name.to_string()))?;
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let mut retried = false;
        loop {
            let token = self.token(name).await?;
            let mut req = Request::new(full(body.clone().unwrap_or_default()));
            *req.method_mut() = method.clone();
            req.headers_mut()
                .insert(header::AUTHORIZATION, token.authorization());
            req.headers_mut()
                .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            if body.is_some() {
                req.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            self.sent(index, client_id, &method, path);
            let timeout = target.timeout();
            let call = async {
                let resp = target
                    .send(req, path, query)
                    .await
                    .map_err(|e| CredentialError::Unreachable(e.detail().to_string()))?;
                let status = resp.status();
                if !status.is_success() {
                    return Err(CredentialError::Status(status.as_u16()));
                }
                let body = collect_limited(resp.into_body(), MAX_JSON_BYTES)
                    .await
                    .map_err(|_| CredentialError::BadAnswer("body too large or broken"))?;
                serde_json::from_slice(&body).map_err(|_| CredentialError::BadAnswer("not JSON"))
            };
            let result = tokio::time::timeout(timeout, call)
                .await
                .unwrap_or(Err(CredentialError::Timeout(timeout)));
            match result {
                Err(CredentialError::Status(401)) if !retried => {
                    retried = true;
                    self.invalidate(name, &token);
                }
                other => return other,
            }
        }
    }

    /// Calls the send hook: a request with credential's token goes to `upstream`.
    pub(crate) fn sent(&self, upstream: usize, client_id: &str, method: &Method, path: &str) {
        if let Some(hook) = &self.on_send {
            hook(upstream, client_id, method, path);
        }
    }

    /// One client-credentials exchange against the login upstream.
    async fn exchange(&self, entry: &Entry) -> Result<(Token, Option<Duration>), CredentialError> {
        let c = &entry.config;
        let login = self
            .upstreams
            .get(entry.upstream)
            .cloned()
            .ok_or_else(|| CredentialError::UnknownUpstream(c.upstream.clone()))?;
        let pair = format!("{}:{}", c.client_id, c.client_secret.expose());
        let basic = base64::engine::general_purpose::STANDARD.encode(pair);
        let mut auth = HeaderValue::from_str(&format!("Basic {basic}"))
            .map_err(|_| CredentialError::BadAnswer("client id cannot be sent"))?;
        auth.set_sensitive(true);
        let mut req = Request::new(full("grant_type=client_credentials"));
        *req.method_mut() = Method::POST;
        let h = req.headers_mut();
        h.insert(header::AUTHORIZATION, auth);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        self.sent(entry.upstream, &c.client_id, &Method::POST, &c.token_path);
        let timeout = login.timeout();
        let call = async {
            let resp = login
                .send(req, &c.token_path, None)
                .await
                .map_err(|e| CredentialError::Unreachable(e.detail().to_string()))?;
            let status = resp.status();
            if status != StatusCode::OK {
                return Err(CredentialError::Status(status.as_u16()));
            }
            let body = collect_limited(resp.into_body(), MAX_TOKEN_ANSWER)
                .await
                .map_err(|_| CredentialError::BadAnswer("token answer too large or broken"))?;
            let issued =
                issued_token(&body).ok_or(CredentialError::BadAnswer("no access_token"))?;
            let token = Token::new(&issued.access_token).ok_or(CredentialError::BadAnswer(
                "access_token is not a header value",
            ))?;
            Ok((token, issued.lifetime))
        };
        let result = tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(CredentialError::Timeout(timeout)));
        if let Some(m) = &self.metrics {
            m.credential_exchange(&c.name, result.is_ok());
        }
        match &result {
            Ok((token, lifetime)) => tracing::info!(
                credential = %c.name,
                token = %token.fingerprint(),
                lifetime_secs = lifetime.map(|l| l.as_secs()),
                "fetched a token"
            ),
            Err(e) => tracing::warn!(credential = %c.name, error = %e, "token exchange failed"),
        }
        result
    }
}
