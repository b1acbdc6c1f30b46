//! Callers' tallies: what each caller of a load test sent and what came back.

use super::{TestBody, TestClient};
use http::StatusCode;
use http_body_util::BodyExt;

/// What one caller (or app) saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub sent: u64,
    pub ok: u64,
    /// pacer's own 429s (with `x-pacer-reason`).
    pub shed: u64,
    /// 429s without `x-pacer-reason`: the upstream's, passed on.
    pub upstream_429: u64,
    pub other: u64,
    pub transport_errors: u64,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.ok += o.ok;
        self.shed += o.shed;
        self.upstream_429 += o.upstream_429;
        self.other += o.other;
        self.transport_errors += o.transport_errors;
    }

    pub fn answers(&self) -> u64 {
        self.ok + self.shed + self.upstream_429 + self.other
    }
}

/// Sends one request, reads the whole answer and counts it. Returns the shed answer's
/// `Retry-After` (or `Some(0)` for an upstream 429) so the caller can back off.
pub async fn send_counted(
    client: &TestClient,
    req: http::Request<TestBody>,
    t: &mut Tally,
) -> Option<(u64, Option<String>)> {
    t.sent += 1;
    let resp = match client.send_streaming_result(req).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("transport error: {e:?}");
            t.transport_errors += 1;
            return None;
        }
    };
    let (parts, body) = resp.into_parts();
    if let Err(e) = body.collect().await {
        eprintln!("body error: {e:?}");
        t.transport_errors += 1;
        return None;
    }
    match parts.status {
        s if s.is_success() => {
            t.ok += 1;
            None
        }
        StatusCode::TOO_MANY_REQUESTS => {
            let reason = parts
                .headers
                .get("x-pacer-reason")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let ra = parts
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if reason.is_some() {
                t.shed += 1;
            } else {
                t.upstream_429 += 1;
            }
            Some((ra, reason))
        }
        s => {
            eprintln!("unexpected status {s}");
            t.other += 1;
            None
        }
    }
}
