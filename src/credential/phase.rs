//! Forwarding on a credential route (`[[route]] credential = "NAME"`): the credential's
//! token goes upstream in the caller's place. An upstream 401 drops that token (one
//! refresh however many requests got it) and, since a 401 means the upstream did not act,
//! the request is sent once more with a fresh token when its body was read whole (at most
//! `[server] buffer_body_bytes`); otherwise the caller gets 502 `credential_rejected`.

use super::{CredentialError, Credentials, Token};
use crate::answer::{full, ProxyBody};
use crate::error::{ErrorKind, ProxyError};
use crate::forward::Upstream;
use crate::route::RouteCredential;
use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use std::sync::Arc;

/// What a credential route's requests are sent with.
#[derive(Clone)]
pub struct CredentialForward {
    credentials: Arc<Credentials>,
    /// `[server] buffer_body_bytes`: bodies up to this were read whole and can be replayed.
    buffered: u64,
}

/// A request read whole, to send again.
struct Replay {
    method: Method,
    headers: HeaderMap,
    body: Bytes,
}

impl CredentialForward {
    /// Sends with `credentials`; bodies of at most `buffered` bytes may be replayed.
    pub fn new(credentials: Arc<Credentials>, buffered: u64) -> Self {
        CredentialForward {
            credentials,
            buffered,
        }
    }

    /// Sends a prepared request to `upstream` (index `index`) with the credential's token.
    pub async fn send(
        &self,
        upstream: &Upstream,
        index: usize,
        credential: &RouteCredential,
        mut req: Request<ProxyBody>,
        path: &str,
        query: Option<&str>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let name = &*credential.name;
        let token = self.token(name).await?;
        req.headers_mut()
            .insert(header::AUTHORIZATION, token.authorization());
        let replay = self.replayable(&mut req).await?;
        let resp = upstream.send(req, path, query).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        drop(resp);
        self.credentials.invalidate(name, &token);
        let Some(replay) = replay else {
            return Err(rejected(name, "the body was not read whole: not replayed"));
        };
        let fresh = self.token(name).await?;
        let mut again = Request::new(full(replay.body));
        *again.method_mut() = replay.method;
        *again.headers_mut() = replay.headers;
        again
            .headers_mut()
            .insert(header::AUTHORIZATION, fresh.authorization());
        self.credentials
            .sent(index, &credential.client_id, again.method(), path);
        let resp = upstream.send(again, path, query).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(rejected(name, "refused again after a refresh"));
        }
        Ok(resp)
    }

    async fn token(&self, name: &str) -> Result<Token, ProxyError> {
        self.credentials
            .token(name)
            .await
            .map_err(|e: CredentialError| {
                ProxyError::new(
                    ErrorKind::CredentialUnavailable,
                    format!("credential {name}: {e}"),
                )
            })
    }

    /// The request's parts to send it again, when its body is in memory: the body phase
    /// read every body of at most `buffered` bytes whole, so one of an exact length within
    /// it is collected here at once.
    async fn replayable(&self, req: &mut Request<ProxyBody>) -> Result<Option<Replay>, ProxyError> {
        match req.body().size_hint().exact() {
            Some(n) if n <= self.buffered || n == 0 => {}
            _ => return Ok(None),
        }
        let body = std::mem::replace(req.body_mut(), full(Bytes::new()));
        let body = body
            .collect()
            .await
            .map_err(|_| {
                ProxyError::new(
                    ErrorKind::BadRequest("request body could not be read"),
                    "body failed",
                )
            })?
            .to_bytes();
        *req.body_mut() = full(body.clone());
        Ok(Some(Replay {
            method: req.method().clone(),
            headers: req.headers().clone(),
            body,
        }))
    }
}

fn rejected(name: &str, why: &str) -> ProxyError {
    ProxyError::new(
        ErrorKind::CredentialRejected,
        format!("credential {name}: upstream answered 401; {why}"),
    )
}
