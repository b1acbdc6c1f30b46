//! The leader's side: the one admitted request of a flight goes upstream in a task of its
//! own, so that its caller going away cancels nothing for the followers; its answer is read
//! (up to `max_entry_bytes`), kept when it may be, and handed to the followers.

use super::{value_hash, Entry, Lead, Lookup, Pending, ResponseCache, Rule, X_PACER_CACHE};
use crate::admit::{Admitted, Answering};
use crate::answer::{full, BoxError, ProxyBody};
use crate::error::{ErrorKind, ProxyError};
use crate::forward::Forward;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use std::sync::Arc;
use tokio::time::Instant;

/// What a leader's upstream call came back with.
type Sent = (Result<Response<ProxyBody>, ProxyError>, Answering);

/// How reading an answer's body up to the bound ended.
enum Read {
    /// The whole body.
    Whole(Bytes),
    /// Larger than the bound: what was read, and the rest still to stream.
    Larger(Bytes, ProxyBody),
}

impl ResponseCache {
    /// Sends a flight's leader upstream in a task of its own and waits for its answer;
    /// `None` only when that task ended without one (it panicked).
    pub async fn send_shared(
        self: &Arc<Self>,
        forward: &Forward,
        req: Admitted,
        lead: (Lead, Pending),
    ) -> Option<Sent> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let forward = forward.clone();
        let cache = self.clone();
        tokio::spawn(async move {
            let (result, answering) = forward.send(req).await;
            let result = match result {
                Ok(resp) => cache.keep(resp, lead).await,
                // Dropping the lead sends each follower through admission on its own.
                Err(e) => Err(e),
            };
            // The caller may have gone: the answer was kept and shared all the same, and
            // the request's concurrency is held until here.
            let _ = tx.send((result, answering));
        });
        rx.await.ok()
    }

    /// Reads an answer the flight may share, keeps it when its entry allows, and hands it
    /// to the followers; anything else goes back to the leader's caller as it came.
    async fn keep(
        &self,
        resp: Response<ProxyBody>,
        (lead, pending): (Lead, Pending),
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(rule) = self.rules.get(pending.rule) else {
            return Ok(resp);
        };
        let Some(vary) = shareable(&resp, rule) else {
            return Ok(resp);
        };
        let (mut parts, body) = resp.into_parts();
        let read = tokio::time::timeout(self.read_deadline, read_up_to(body, rule.max_entry_bytes))
            .await
            .map_err(|_| {
                ProxyError::new(
                    ErrorKind::UpstreamTimeout,
                    "upstream answer body not finished within request_deadline",
                )
            })?
            .map_err(|e| {
                ProxyError::new(
                    ErrorKind::UpstreamUnreachable,
                    format!("upstream answer body failed: {e}"),
                )
            })?;
        let body = match read {
            Read::Larger(prefix, rest) => {
                // Too large to keep: it streams through; the followers go on their own.
                drop(lead);
                let rest = BodyStream::new(rest);
                let stream =
                    futures_util::stream::once(
                        async move { Ok::<_, BoxError>(Frame::data(prefix)) },
                    )
                    .chain(rest);
                return Ok(Response::from_parts(
                    parts,
                    StreamBody::new(stream).boxed_unsync(),
                ));
            }
            Read::Whole(body) => body,
        };
        let now = Instant::now();
        let entry = Arc::new(Entry {
            rule: pending.rule,
            headers: parts.headers.clone(),
            body: body.clone(),
            vary: vary
                .into_iter()
                .map(|name| {
                    let hash = value_hash(&pending.headers, &name);
                    (name, hash)
                })
                .collect(),
            stored: now,
            expires: now + rule.ttl,
        });
        self.store.insert(lead.key, entry.clone());
        lead.land(entry);
        parts.headers.insert(
            X_PACER_CACHE,
            HeaderValue::from_static(Lookup::Miss.as_str()),
        );
        Ok(Response::from_parts(parts, full(body)))
    }
}

/// The request headers an answer's `Vary` names when the answer may be kept and shared
/// under `rule`; `None` when it may not be.
fn shareable(resp: &Response<ProxyBody>, rule: &Rule) -> Option<Vec<HeaderName>> {
    let headers = resp.headers();
    if resp.status() != StatusCode::OK || headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    if !rule.ignore_no_store && forbids_storing(headers) {
        return None;
    }
    // An answer announcing more than the bound is not read at all.
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > rule.max_entry_bytes as u64) {
        return None;
    }
    let mut names = Vec::new();
    for v in headers.get_all(header::VARY) {
        let v = v.to_str().ok()?;
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            // Bounded: an upstream cannot make an entry heavy through its Vary.
            if names.len() >= 16 {
                return None;
            }
            names.push(name);
        }
    }
    Some(names)
}

/// True for `Cache-Control: no-store` or `private` (the answer is one user's).
pub(super) fn forbids_storing(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.split('=').next().unwrap_or_default().trim())
        .any(|d| d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("private"))
}

/// Reads `body` whole if it is at most `max` bytes.
async fn read_up_to(mut body: ProxyBody, max: usize) -> Result<Read, BoxError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            // Trailers: not part of what is kept.
            continue;
        };
        if buf.len().saturating_add(data.len()) > max {
            buf.extend_from_slice(&data);
            return Ok(Read::Larger(buf.freeze(), body));
        }
        buf.extend_from_slice(&data);
    }
    Ok(Read::Whole(buf.freeze()))
}
