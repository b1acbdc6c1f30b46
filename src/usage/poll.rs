//! One poll of the Usage API, and the task that polls every `[usage] interval` with the
//! configuration in force.

use super::parse::{client_name, execution_id, results, QueryStatus};
use super::{Context, Polled};
use crate::config::Scope;
use crate::credential::CredentialError;
use crate::proxy::Proxy;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;

/// Where queries are posted; results are read from `{QUERY_PATH}/{executionId}/results`.
pub const QUERY_PATH: &str = "/api/v2/usage/query";

/// Reads of a query's results before the poll gives up on it.
const RESULT_READS: u32 = 5;

/// Wait before the second read of results; doubled for each further one (at most
/// 0.25 + 0.5 + 1 + 2 s in all).
const FIRST_DELAY: Duration = Duration::from_millis(250);

/// Client names looked up per poll at most, so a large organization's first polls stay
/// within the limits too.
const NAMES_PER_POLL: usize = 20;

/// How often the task looks again whether `[usage]` is configured, when it is not.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Why a poll got no counts.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PollError {
    #[error("no API upstream to query")]
    NoUpstream,
    #[error(transparent)]
    Call(#[from] CredentialError),
    #[error("the query answer has no usable executionId")]
    NoExecution,
    #[error("the usage query failed")]
    Failed,
    #[error("the usage query was not complete after {RESULT_READS} reads")]
    NotComplete,
}

/// What the poll needs from the configuration in force: the watched clients, the usage
/// upstream and its per-client limit.
fn context(proxy: &Proxy, upstream: usize) -> Context {
    let config = &proxy.config;
    let mut watched: Vec<Arc<str>> = config
        .clients
        .iter()
        .map(|c| Arc::from(c.id.as_str()))
        .collect();
    for c in &config.credentials {
        if !watched.iter().any(|w| **w == *c.client_id) {
            watched.push(Arc::from(c.client_id.as_str()));
        }
    }
    // The per-client layer as `LimitSet::per_client` picks it: the first client-scope
    // rate limit without a `match` that applies to the upstream.
    let set = proxy.admission.limits();
    let ceiling = set
        .specs
        .iter()
        .enumerate()
        .find(|(_, s)| {
            s.scope == Scope::Client
                && s.template.is_none()
                && s.ceilings.is_some()
                && s.upstream.is_none_or(|u| u == upstream)
        })
        .and_then(|(i, s)| Some((config.limits.get(i)?.requests?, s.per)));
    Context {
        watched,
        upstream,
        ceiling,
        subtract: config.usage.subtract,
    }
}

/// Polls once with `proxy`'s configuration, if `[usage] credential` is set: queries
/// today's requests per OAuth client, reads the results until complete (a few reads,
/// bounded), records them in `proxy.usage`, then looks up the names of up to
/// [`NAMES_PER_POLL`] new clients. Every call is counted against the credential's
/// client's limits (the credentials' send hook).
pub async fn poll_once(proxy: &Proxy) -> Result<(), PollError> {
    let config = &proxy.config;
    let Some(credential) = config.usage.credential.as_deref() else {
        return Ok(());
    };
    let index = config.usage_upstream().ok_or(PollError::NoUpstream)?;
    let upstream = config
        .upstreams
        .get(index)
        .ok_or(PollError::NoUpstream)?
        .name
        .as_str();
    let creds = &proxy.credentials;
    let wall = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let day = wall.get(..10).unwrap_or_default().to_string();
    let query = serde_json::json!({
        "interval": format!("{day}T00:00:00Z/{wall}"),
        "granularity": "Day",
        "metrics": ["Requests"],
        "groupBy": ["OAuthClientId"],
    });
    let answer = creds
        .post_json(credential, upstream, QUERY_PATH, &query)
        .await?;
    let id = execution_id(&answer).ok_or(PollError::NoExecution)?;
    let path = format!("{QUERY_PATH}/{id}/results");
    let max_keys = config.identity.max_keys;
    let mut delay = FIRST_DELAY;
    let mut counts = None;
    for read in 0..RESULT_READS {
        if read > 0 {
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
        }
        let answer = creds.get_json(credential, upstream, &path).await?;
        match results(&answer, max_keys) {
            (QueryStatus::Complete, c) => {
                counts = Some(c);
                break;
            }
            (QueryStatus::Failed, _) => return Err(PollError::Failed),
            (QueryStatus::Running, _) => {}
        }
    }
    let counts = counts.ok_or(PollError::NotComplete)?;
    let polled = Polled {
        day,
        at: Instant::now(),
        counts,
    };
    proxy
        .usage
        .record(polled, &context(proxy, index), wall.as_str());
    for id in proxy.usage.unnamed(NAMES_PER_POLL) {
        // `id` passed `client_id_ok`: safe as a path segment.
        let path = format!("/api/v2/oauth/clients/{id}");
        match creds.get_json(credential, upstream, &path).await {
            Ok(answer) => proxy.usage.set_name(&id, client_name(&answer)),
            Err(CredentialError::Status(404)) => proxy.usage.set_name(&id, None),
            Err(e) => {
                tracing::debug!(client = %id, error = %e, "client name look-up failed");
                break;
            }
        }
    }
    Ok(())
}

/// Polls every `[usage] interval` with the configuration in force at that moment (so a
/// reload that adds, changes or removes `[usage]` takes effect at the next poll) until
/// `stop` turns true.
pub async fn run(current: Arc<ArcSwap<Proxy>>, mut stop: watch::Receiver<bool>) {
    loop {
        let proxy = current.load_full();
        let wait = if proxy.config.usage.credential.is_some() {
            let result = tokio::select! {
                r = poll_once(&proxy) => r,
                _ = stop.changed() => return,
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "usage poll failed");
                proxy.usage.failed(e.to_string());
            }
            proxy.config.usage.interval.0
        } else {
            proxy.usage.forget();
            IDLE_CHECK
        };
        drop(proxy);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}
