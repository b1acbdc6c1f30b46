//! Token broker: a client-credentials token request that repeats one already answered
//! (same credentials, same body) gets the issued token again, with its remaining lifetime,
//! until shortly before it expires. A fleet of workers that each ask for a token then costs
//! one request of `client.credentials.token.rate.per.minute`, not one per worker.
//!
//! Requests are keyed by a hash of their credentials and body; concurrent identical
//! requests wait for the first one's answer (single flight). Tokens are kept in memory
//! only, in a bounded map; they never reach logs or metrics.

use crate::answer::{collect_limited, full, ProxyBody};
use crate::error::{ErrorKind, ProxyError};
use crate::feedback::IssuedToken;
use crate::identity::{is_token_path, Generations, TokenHash};
use crate::proxy::{call_next, Next, Proxy, Stage, StageFuture};
use crate::route::RouteMatch;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Token request bodies read to key the cache, at most.
const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
struct Cached {
    token: serde_json::Value,
    expires: Instant,
}

/// The cache key of a token request, put into the request for the learning stage.
#[derive(Debug, Clone, Copy)]
pub struct BrokerKey(pub TokenHash);

/// Marks a response answered from the cache (for metrics).
#[derive(Debug, Clone, Copy)]
pub struct FromCache;

/// Issued tokens by request key.
pub struct TokenBroker {
    margin: Duration,
    entries: Mutex<Generations<TokenHash, Cached>>,
    flights: Mutex<HashMap<TokenHash, Arc<tokio::sync::Mutex<()>>>>,
}

impl TokenBroker {
    /// A broker keeping at most `max` tokens, handing each out until `margin` before expiry.
    pub fn new(max: usize, margin: Duration) -> Self {
        TokenBroker {
            margin,
            entries: Mutex::new(Generations::new(max)),
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// The key of a token request: its credentials and body, hashed.
    pub fn key(authorization: Option<&HeaderValue>, body: &[u8]) -> TokenHash {
        let mut h = Sha256::new();
        h.update(authorization.map_or(&b""[..], |v| v.as_bytes()));
        h.update(b"\n");
        h.update(body);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize()[..16]);
        out
    }

    /// The cached answer for `key` with `expires_in` set to what is left, if enough is.
    pub fn get(&self, key: &TokenHash) -> Option<Bytes> {
        let cached = self.entries.lock().ok()?.get(key)?;
        let left = cached.expires.checked_duration_since(Instant::now())?;
        if left < self.margin {
            return None;
        }
        let mut token = cached.token;
        token["expires_in"] = serde_json::Value::from(left.as_secs());
        serde_json::to_vec(&token).ok().map(Bytes::from)
    }

    /// Remembers an issued token (a successful answer to the request keyed `key`); one
    /// without a lifetime is not handed out again.
    pub fn put(&self, key: TokenHash, issued: IssuedToken) {
        let Some(lifetime) = issued.lifetime else {
            return;
        };
        // The lifetime is clamped already ([`crate::feedback::MAX_TOKEN_LIFETIME`]); an
        // `Instant` that cannot be that far ahead still must not panic.
        let Some(expires) = Instant::now().checked_add(lifetime) else {
            return;
        };
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                key,
                Cached {
                    token: issued.body,
                    expires,
                },
            );
        }
    }

    fn flight(&self, key: TokenHash) -> Arc<tokio::sync::Mutex<()>> {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        // Forget finished flights so the map holds only keys in use.
        flights.retain(|_, f| Arc::strong_count(f) > 1);
        flights.entry(key).or_default().clone()
    }
}

/// The broker stage: answers repeated token requests from the cache.
pub struct Broker {
    proxy: Arc<Proxy>,
}

impl Broker {
    /// The broker stage of `proxy`.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Broker { proxy }
    }
}

fn cached_response(body: Bytes) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert("x-pacer-token-cache", HeaderValue::from_static("hit"));
    resp.extensions_mut().insert(FromCache);
    resp
}

impl Stage for Broker {
    fn call(self: Arc<Self>, req: Request<ProxyBody>, next: Next) -> StageFuture {
        let is_token = req.method() == Method::POST
            && req
                .extensions()
                .get::<RouteMatch>()
                .is_some_and(|m| is_token_path(&m.path));
        let Some(broker) = self.proxy.broker.clone().filter(|_| is_token) else {
            return call_next(next, req);
        };
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = collect_limited(body, MAX_BODY).await.map_err(|_| {
                ProxyError::new(
                    ErrorKind::PayloadTooLarge,
                    "token request body too large or broken",
                )
            })?;
            let key = TokenBroker::key(parts.headers.get(header::AUTHORIZATION), &body);
            if let Some(hit) = broker.get(&key) {
                return Ok(cached_response(hit));
            }
            // One request per key goes upstream; the others wait for its answer.
            let flight = broker.flight(key);
            let _leader = flight.lock().await;
            if let Some(hit) = broker.get(&key) {
                return Ok(cached_response(hit));
            }
            let mut req = Request::from_parts(parts, full(body));
            req.extensions_mut().insert(BrokerKey(key));
            call_next(next, req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn hands_out_until_the_margin_with_the_time_left() {
        let b = TokenBroker::new(100, Duration::from_secs(300));
        let key = TokenBroker::key(
            Some(&HeaderValue::from_static("Basic eDp5")),
            b"grant_type=client_credentials",
        );
        assert!(b.get(&key).is_none());
        let issued = |body: &[u8]| crate::feedback::issued_token(body).unwrap();
        b.put(
            key,
            issued(br#"{"access_token":"t","token_type":"bearer","expires_in":1000}"#),
        );
        let v: serde_json::Value = serde_json::from_slice(&b.get(&key).unwrap()).unwrap();
        assert_eq!(
            (v["access_token"].as_str(), v["expires_in"].as_u64()),
            (Some("t"), Some(1000))
        );
        tokio::time::advance(Duration::from_secs(600)).await;
        let v: serde_json::Value = serde_json::from_slice(&b.get(&key).unwrap()).unwrap();
        assert_eq!(v["expires_in"].as_u64(), Some(400));
        tokio::time::advance(Duration::from_secs(101)).await;
        assert!(
            b.get(&key).is_none(),
            "inside the margin: ask upstream again"
        );
        let other = TokenBroker::key(
            Some(&HeaderValue::from_static("Basic eDp6")),
            b"grant_type=client_credentials",
        );
        assert!(
            b.get(&other).is_none(),
            "other credentials never share a token"
        );
        // An upstream's lifetime is believed up to 24 h; none at all is not cached.
        b.put(
            other,
            issued(br#"{"access_token":"u","expires_in":18446744073709551615}"#),
        );
        let v: serde_json::Value = serde_json::from_slice(&b.get(&other).unwrap()).unwrap();
        assert_eq!(v["expires_in"].as_u64(), Some(86_400));
        b.put(key, issued(br#"{"access_token":"t","expires_in":-1}"#));
        assert!(b.get(&key).is_none());
    }
}
