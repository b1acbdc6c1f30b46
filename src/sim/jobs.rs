//! Analytics details jobs as Genesys runs them: a creation (`POST …/details/jobs`) starts a
//! job while fewer than `job_concurrency` of the client's jobs run, else answers 429 with
//! `Retry-After`; a job runs for `job_duration`, its status (`GET …/jobs/{jobId}`) goes
//! QUEUED → RUNNING → FULFILLED, its results (`…/results`) exist once fulfilled, and a
//! `DELETE` cancels it (freeing its place).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use http::{Method, Response, StatusCode};
use serde_json::json;

use crate::answer::{self, ProxyBody};
use crate::limit::window::Nanos;

/// Jobs remembered per client (for status and results); the oldest are forgotten first.
const MAX_JOBS_PER_CLIENT: usize = 1000;

struct Job {
    id: String,
    created: Nanos,
    cancelled: bool,
}

/// Every client's jobs. Keys are authenticated client ids, so the map stays small.
#[derive(Default)]
pub(super) struct Jobs {
    clients: HashMap<String, VecDeque<Job>>,
}

/// What a path under `/api/v2/analytics/{conversations|users}/details/jobs` asks for.
enum Call<'a> {
    Create,
    Status(&'a str),
    Results(&'a str),
}

fn parse(path: &str) -> Option<(&str, Call<'_>)> {
    let rest = path.strip_prefix("/api/v2/analytics/")?;
    let (family, rest) = rest.split_once('/')?;
    if family != "conversations" && family != "users" {
        return None;
    }
    let rest = rest.strip_prefix("details/jobs")?;
    let call = match rest.trim_start_matches('/').split('/').collect::<Vec<_>>()[..] {
        [""] => Call::Create,
        [id] => Call::Status(id),
        [id, "results"] => Call::Results(id),
        _ => return None,
    };
    Some((family, call))
}

impl Jobs {
    /// The answer to a jobs call by `client` at `now`; `None` when `path` is no jobs call.
    pub(super) fn answer(
        &mut self,
        client: &str,
        method: &Method,
        path: &str,
        now: Nanos,
        concurrency: u64,
        duration: Duration,
    ) -> Option<Response<ProxyBody>> {
        let (family, call) = parse(path)?;
        let duration = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let jobs = self.clients.entry(client.to_owned()).or_default();
        let running = |j: &&Job| !j.cancelled && now < j.created.saturating_add(duration);
        let resp = match (method, call) {
            (&Method::POST, Call::Create) => {
                let busy: Vec<Nanos> = jobs
                    .iter()
                    .filter(running)
                    .map(|j| j.created.saturating_add(duration).saturating_sub(now))
                    .collect();
                if concurrency > 0 && busy.len() as u64 >= concurrency {
                    let wait = busy.into_iter().min().unwrap_or(0);
                    return Some(answer::too_many_requests(Duration::from_nanos(wait)));
                }
                let id = answer::context_id();
                jobs.push_back(Job {
                    id: id.clone(),
                    created: now,
                    cancelled: false,
                });
                if jobs.len() > MAX_JOBS_PER_CLIENT {
                    jobs.pop_front();
                }
                answer::json_response(
                    StatusCode::ACCEPTED,
                    &json!({"jobId": id, "state": "QUEUED"}),
                )
            }
            (&Method::GET, Call::Status(id)) => match jobs.iter().find(|j| j.id == id) {
                Some(j) => answer::json_response(
                    StatusCode::OK,
                    &json!({"id": j.id, "state": state(j, now, duration)}),
                ),
                None => not_found(),
            },
            (&Method::DELETE, Call::Status(id)) => match jobs.iter_mut().find(|j| j.id == id) {
                Some(j) => {
                    j.cancelled = true;
                    let mut resp = Response::new(answer::full(bytes::Bytes::new()));
                    *resp.status_mut() = StatusCode::ACCEPTED;
                    resp
                }
                None => not_found(),
            },
            (&Method::GET, Call::Results(id)) => match jobs.iter().find(|j| j.id == id) {
                Some(j) if state(j, now, duration) == "FULFILLED" => {
                    let records = if family == "users" {
                        json!({"userDetails": [{"userId": j.id}], "totalHits": 1})
                    } else {
                        json!({"conversations": [{"conversationId": j.id}], "totalHits": 1})
                    };
                    answer::json_response(StatusCode::OK, &records)
                }
                Some(_) => answer::error_response(
                    StatusCode::BAD_REQUEST,
                    "analytics.job.not.fulfilled",
                    "The job's results are not available: it has not been fulfilled",
                ),
                None => not_found(),
            },
            _ => answer::error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method.not.allowed",
                "Method not allowed",
            ),
        };
        Some(resp)
    }

    /// Forgets every job (`POST /sim/reset`).
    pub(super) fn reset(&mut self) {
        self.clients.clear();
    }
}

fn state(j: &Job, now: Nanos, duration: Nanos) -> &'static str {
    let age = now.saturating_sub(j.created);
    if j.cancelled {
        "CANCELLED"
    } else if age >= duration {
        "FULFILLED"
    } else if age < duration / 4 {
        "QUEUED"
    } else {
        "RUNNING"
    }
}

fn not_found() -> Response<ProxyBody> {
    answer::error_response(
        StatusCode::NOT_FOUND,
        "not.found",
        "The requested job was not found",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Nanos = 1_000_000_000;

    fn body(resp: Response<ProxyBody>) -> (StatusCode, serde_json::Value) {
        use http_body_util::BodyExt;
        let status = resp.status();
        let bytes = futures_util::FutureExt::now_or_never(resp.into_body().collect())
            .and_then(Result::ok)
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    #[test]
    fn jobs_run_for_their_duration_and_cap_each_client() {
        let mut jobs = Jobs::default();
        let d = Duration::from_secs(10);
        let path = "/api/v2/analytics/conversations/details/jobs";
        let mut call = |who: &str, m: Method, p: &str, now| {
            body(jobs.answer(who, &m, p, now, 2, d).expect("a jobs call"))
        };
        let (s, a) = call("c", Method::POST, path, 0);
        assert_eq!(
            (s, a["state"].as_str()),
            (StatusCode::ACCEPTED, Some("QUEUED"))
        );
        let a = a["jobId"].as_str().unwrap().to_owned();
        let (_, b) = call(
            "c",
            Method::POST,
            "/api/v2/analytics/users/details/jobs",
            SEC,
        );
        let b = b["jobId"].as_str().unwrap().to_owned();
        assert_eq!(
            call("c", Method::POST, path, 2 * SEC).0,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            call("other", Method::POST, path, 2 * SEC).0,
            StatusCode::ACCEPTED
        );
        let status = format!("{path}/{a}");
        assert_eq!(
            call("c", Method::GET, &status, 5 * SEC).1["state"],
            "RUNNING"
        );
        let results = format!("{status}/results");
        assert_eq!(
            call("c", Method::GET, &results, 5 * SEC).0,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            call("c", Method::GET, &status, 10 * SEC).1["state"],
            "FULFILLED"
        );
        assert_eq!(call("c", Method::GET, &results, 10 * SEC).0, StatusCode::OK);
        // `a` is done: room for one more. A cancelled job frees its place as well.
        assert_eq!(
            call("c", Method::POST, path, 10 * SEC).0,
            StatusCode::ACCEPTED
        );
        assert_eq!(
            call("c", Method::POST, path, 10 * SEC).0,
            StatusCode::TOO_MANY_REQUESTS
        );
        let b_path = format!("/api/v2/analytics/users/details/jobs/{b}");
        assert_eq!(
            call("c", Method::DELETE, &b_path, 10 * SEC).0,
            StatusCode::ACCEPTED
        );
        assert_eq!(
            call("c", Method::GET, &b_path, 10 * SEC).1["state"],
            "CANCELLED"
        );
        assert_eq!(
            call("c", Method::POST, path, 10 * SEC).0,
            StatusCode::ACCEPTED
        );
        assert_eq!(
            call("c", Method::GET, &format!("{path}/nope"), 0).0,
            StatusCode::NOT_FOUND
        );
        assert!(jobs
            .answer(
                "c",
                &Method::GET,
                "/api/v2/analytics/conversations/details/query",
                0,
                2,
                d
            )
            .is_none());
    }
}
