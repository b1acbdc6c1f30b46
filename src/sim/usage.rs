//! The simulated Usage API and OAuth client look-up: `POST /api/v2/usage/query` (grouped
//! by `OAuthClientId`), `GET /api/v2/usage/query/{executionId}/results` (the requests of
//! each client since the start or the last `/sim/reset` — "today" — from the simulator's
//! own counters, so also traffic that never went through pacer) and
//! `GET /api/v2/oauth/clients/{id}` (the name from the simulator's client list).
//!
//! Like the real one, a query runs for a moment: the first read of its results answers
//! `"queryStatus": "Running"`, later reads `"Complete"`.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;

use super::config::SimConfig;
use super::stats::SimStats;
use crate::answer::{self, ProxyBody};

/// Where queries are posted.
pub const QUERY: &str = "/api/v2/usage/query";

/// Largest query body read.
const MAX_QUERY_BYTES: usize = 64 * 1024;

/// Executions remembered; older ones answer 404.
const MAX_EXECUTIONS: usize = 256;

/// Queries posted and not yet forgotten: execution id and reads of its results so far.
#[derive(Default)]
pub struct Executions {
    next: Mutex<(u64, VecDeque<(String, u32)>)>,
}

impl Executions {
    fn start(&self) -> String {
        let mut g = self.next.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        let id = format!("00000000-0000-4000-9000-{:012x}", g.0);
        if g.1.len() >= MAX_EXECUTIONS {
            g.1.pop_front();
        }
        g.1.push_back((id.clone(), 0));
        id
    }

    /// Reads of `id`'s results before this one, if it is known.
    fn read(&self, id: &str) -> Option<u32> {
        let mut g = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let e = g.1.iter_mut().find(|(e, _)| e == id)?;
        let before = e.1;
        e.1 = e.1.saturating_add(1);
        Some(before)
    }
}

/// True for the query: its body is read (and checked) instead of drained.
pub fn is_query(method: &Method, path: &str) -> bool {
    method == Method::POST && path == QUERY
}

/// Reads a query body: JSON grouped by `OAuthClientId`, else a 400 to answer.
pub async fn read_query(body: Incoming) -> Result<(), Response<ProxyBody>> {
    let bad = |m: &str| answer::error_response(StatusCode::BAD_REQUEST, "bad.request", m);
    let bytes: Bytes = Limited::new(body, MAX_QUERY_BYTES)
        .collect()
        .await
        .map_err(|_| bad("The request body could not be read"))?
        .to_bytes();
    let query: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| bad("The body is not JSON"))?;
    let grouped = query
        .get("groupBy")
        .and_then(|g| g.as_array())
        .is_some_and(|g| g.iter().any(|v| v == "OAuthClientId"));
    let interval = query.get("interval").and_then(|i| i.as_str());
    if !grouped || interval.is_none_or(|i| !i.contains('/')) {
        return Err(bad("Expected an interval and groupBy [\"OAuthClientId\"]"));
    }
    Ok(())
}

/// The answer to a usage or client request, or `None` when `path` is neither.
pub fn answer(
    executions: &Executions,
    config: &SimConfig,
    stats: impl FnOnce() -> SimStats,
    method: &Method,
    path: &str,
) -> Option<Response<ProxyBody>> {
    if is_query(method, path) {
        let id = executions.start();
        let uri = format!("{QUERY}/{id}/results");
        return Some(answer::json_response(
            StatusCode::ACCEPTED,
            &json!({"executionId": id, "resultsUri": uri}),
        ));
    }
    if method != Method::GET {
        return None;
    }
    if let Some(id) = path
        .strip_prefix(QUERY)
        .and_then(|p| p.strip_prefix('/'))
        .and_then(|p| p.strip_suffix("/results"))
    {
        let Some(reads) = executions.read(id) else {
            return Some(not_found());
        };
        if reads == 0 {
            return Some(answer::json_response(
                StatusCode::OK,
                &json!({"queryStatus": "Running"}),
            ));
        }
        let results: Vec<_> = stats()
            .clients
            .into_iter()
            .filter_map(|(id, s)| {
                let c = config.client(&id)?;
                Some(json!({
                    "clientId": id,
                    "clientName": c.name.as_deref().unwrap_or(&c.id),
                    "organizationId": config.org_id,
                    "requests": s.requests,
                    "status200": s.ok,
                    "status429": s.too_many,
                }))
            })
            .collect();
        return Some(answer::json_response(
            StatusCode::OK,
            &json!({"queryStatus": "Complete", "results": results}),
        ));
    }
    let id = path.strip_prefix("/api/v2/oauth/clients/")?;
    Some(match config.client(id) {
        Some(c) => answer::json_response(
            StatusCode::OK,
            &json!({"id": c.id, "name": c.name.as_deref().unwrap_or(&c.id)}),
        ),
        None => not_found(),
    })
}

fn not_found() -> Response<ProxyBody> {
    answer::error_response(
        StatusCode::NOT_FOUND,
        "not.found",
        "The requested resource was not found",
    )
}
