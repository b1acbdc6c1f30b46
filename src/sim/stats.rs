//! What the simulator saw, per OAuth client: the ground truth tests compare pacer against.

use std::collections::BTreeMap;

use http::StatusCode;
use serde::{Deserialize, Serialize};

/// Counters of everything the simulator received and answered (`GET /sim/stats`).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct SimStats {
    /// Per OAuth client id; requests without a valid client count under `"unknown"`.
    pub clients: BTreeMap<String, ClientStats>,
    /// Sum over all clients.
    pub total: ClientStats,
    /// Highest number of `/api/v2` requests in flight at the same time.
    pub max_inflight: u64,
}

/// Requests received and answers sent for one client.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Requests received (`/api/v2/...` and `/oauth/token`).
    pub requests: u64,
    /// 2xx answers sent.
    pub ok: u64,
    /// 401 answers sent.
    pub unauthorized: u64,
    /// 429 answers sent.
    pub too_many: u64,
    /// Any other answer.
    pub other: u64,
}

impl ClientStats {
    fn answered(&mut self, status: StatusCode) {
        match status {
            s if s.is_success() => self.ok += 1,
            StatusCode::UNAUTHORIZED => self.unauthorized += 1,
            StatusCode::TOO_MANY_REQUESTS => self.too_many += 1,
            _ => self.other += 1,
        }
    }
}

impl SimStats {
    /// Counts a request from `client` as received.
    pub(crate) fn received(&mut self, client: &str) {
        self.entry(client).requests += 1;
        self.total.requests += 1;
    }

    /// Counts the answer sent to `client`.
    pub(crate) fn answered(&mut self, client: &str, status: StatusCode) {
        self.entry(client).answered(status);
        self.total.answered(status);
    }

    fn entry(&mut self, client: &str) -> &mut ClientStats {
        // Keys are known client ids or "unknown", so the map stays small.
        self.clients.entry(client.to_owned()).or_default()
    }
}
