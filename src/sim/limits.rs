//! The org's published limits, as Genesys serves them:
//! `GET /api/v2/organizations/limits/namespaces/{namespace}` (the org's values) and
//! `…/{namespace}/defaults` (Genesys' defaults), from the simulator's own configuration,
//! under the namespace and keys the `genesys` preset reads.

use http::StatusCode;
use serde::Serialize;

use super::config::SimConfig;
use crate::answer::{self, ProxyBody};

/// Path prefix of both endpoints.
pub const PREFIX: &str = "/api/v2/organizations/limits/namespaces/";

/// The namespace the simulated org publishes.
pub const NAMESPACE: &str = "platform.api";

/// Genesys' default for each published per-minute rate.
const DEFAULT_RATE: u64 = 300;

#[derive(Serialize)]
struct Namespace<'a> {
    namespace: &'a str,
    limits: Vec<Entry>,
}

#[derive(Serialize)]
struct Entry {
    key: &'static str,
    value: u64,
}

/// The answer to a GET under [`PREFIX`]: the namespace's limits, 404 for a namespace the
/// org does not publish, 503 while `publish_limits` is off.
pub fn answer(config: &SimConfig, path: &str) -> http::Response<ProxyBody> {
    if !config.publish_limits {
        return answer::error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "service.unavailable",
            "Limits are not available",
        );
    }
    let rest = path.strip_prefix(PREFIX).unwrap_or_default();
    let (namespace, defaults) = match rest.strip_suffix("/defaults") {
        Some(ns) => (ns, true),
        None => (rest, false),
    };
    if namespace != NAMESPACE {
        return answer::error_response(
            StatusCode::NOT_FOUND,
            "not.found",
            "The requested namespace was not found",
        );
    }
    let org = |value: u64| if defaults { DEFAULT_RATE } else { value };
    let limits = vec![
        // The per-client request rate: what a client-credentials token may send.
        Entry {
            key: "client.credentials.token.rate.per.minute",
            value: org(config.client_requests),
        },
        // The same for a user's token under one OAuth client.
        Entry {
            key: "org.app.user.rate.per.minute",
            value: org(config.client_requests),
        },
    ];
    answer::json_response(StatusCode::OK, &Namespace { namespace, limits })
}
