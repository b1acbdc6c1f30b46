//! Async job slots over real sockets: exporters creating analytics details jobs through
//! pacer, against the simulator (which answers 429 to a creation over its job concurrency)
//! and against a test upstream whose answers the test chooses.

use crate::support::*;
use http::{Method, StatusCode};
use pacer::app::Running;
use pacer::sim::{SimConfig, Simulator};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

const JOBS_PATH: &str = "/api/v2/analytics/conversations/details/jobs";

async fn status(pacer: &Running) -> serde_json::Value {
    let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
    admin.get("/status", &[]).await.json()
}

/// Running jobs of the limit `jobs` by `/status`, over all its keys.
async fn jobs_running(pacer: &Running) -> u64 {
    let s = status(pacer).await;
    s["limits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["limit"] == "jobs")
        .filter_map(|l| l["jobs_running"].as_u64())
        .sum()
}

fn post(client: &TestClient, path: &str, token: Option<&str>, body: &str) -> Request {
    let mut b = client
        .request(Method::POST, path)
        .header("content-type", "application/json");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(full(body.to_owned())).expect("request")
}

type Request = http::Request<TestBody>;

/// 6 exporter workers loop create → poll status → fetch results over 2 job slots: the
/// upstream never refuses a creation and the slots stay busy.
#[tokio::test]
async fn exporters_keep_two_job_slots_busy_without_an_upstream_429() {
    let _slot = slot(Load::Timed).await;
    within_for("job exporters", Duration::from_secs(60), async {
        const JOB: Duration = Duration::from_millis(300);
        const RUN: Duration = Duration::from_secs(3);
        let sim = Simulator::start(
            "127.0.0.1:0".parse().unwrap(),
            SimConfig::from_toml_str(
                "job_concurrency = 2\njob_duration = \"300ms\"\n\
                 client_requests = 100000\norg_requests = 100000\n",
            )
            .unwrap(),
        )
        .await
        .unwrap();
        let url = sim.url();
        let pacer = start_pacer(&format!(
            "[[upstream]]\nname = \"api\"\nurl = \"{url}\"\n\n\
             [[upstream]]\nname = \"login\"\nurl = \"{url}\"\n\n\
             [[route]]\nprefix = \"/api/\"\nupstream = \"api\"\n\n\
             [[route]]\nprefix = \"/oauth/\"\nupstream = \"login\"\n\n\
             {NO_TOKEN_LOOKUPS}\n\
             [queue]\nmax_wait = \"20s\"\n\n\
             [[limit]]\nname = \"jobs\"\nmatch = \"POST /api/v2/analytics/*/details/jobs\"\n\
             scope = \"client\"\njobs = 2\n"
        ))
        .await;
        let client = Arc::new(TestClient::http1(pacer.proxy_addr));
        let token: Arc<str> = Arc::from(token_via(&client, "bulk-client", "bulk-secret").await);
        let start = Instant::now();
        let mut workers = JoinSet::new();
        for w in 0..6 {
            let (client, token) = (client.clone(), token.clone());
            let family = if w % 2 == 0 { "conversations" } else { "users" };
            workers.spawn(async move {
                let jobs = format!("/api/v2/analytics/{family}/details/jobs");
                let mut done = 0u64;
                while start.elapsed() < RUN {
                    let created = client.send(post(&client, &jobs, Some(&token), "{}")).await;
                    assert_eq!(created.status, StatusCode::ACCEPTED, "{}", created.text());
                    let in_run = start.elapsed() <= RUN;
                    let id = created.json()["jobId"].as_str().expect("jobId").to_owned();
                    let job = format!("{jobs}/{id}");
                    loop {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let s = client.send(client.get_as(&job, &token)).await;
                        assert_eq!(s.status, StatusCode::OK, "{}", s.text());
                        if s.json()["state"] == "FULFILLED" {
                            break;
                        }
                    }
                    let results = client
                        .send(client.get_as(&format!("{job}/results"), &token))
                        .await;
                    assert_eq!(results.status, StatusCode::OK, "{}", results.text());
                    done += u64::from(in_run);
                }
                done
            });
        }
        // Midway: both slots busy by /status and the utilization gauge, others waiting.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = status(&pacer).await;
        let entry = s["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["limit"] == "jobs")
            .cloned()
            .unwrap_or_else(|| panic!("no job limit in /status: {s}"));
        assert_eq!(entry["jobs"], 2, "{entry}");
        assert!(entry["jobs_running"].as_u64().unwrap() >= 1, "{entry}");
        let admin = TestClient::http1(pacer.admin_addr.expect("admin listener"));
        let samples = prom_samples(&admin.get("/metrics", &[]).await.text());
        let gauge = |name: &str| {
            samples
                .iter()
                .filter(|s| s.name == name && s.label("limit") == Some("jobs"))
                .map(|s| s.value)
                .sum::<f64>()
        };
        assert!(gauge("pacer_jobs_running") >= 1.0, "pacer_jobs_running");
        assert!(
            gauge("pacer_limit_utilization_ratio") >= 0.5,
            "pacer_limit_utilization_ratio"
        );
        let mut done = 0;
        while let Some(w) = workers.join_next().await {
            done += w.expect("worker");
        }
        let stats = sim.stats();
        assert_eq!(stats.total.too_many, 0, "upstream 429s: {stats:?}");
        let possible = 2 * RUN.as_millis() as u64 / JOB.as_millis() as u64;
        eprintln!("job exporters: {done} jobs of {possible} possible");
        assert!(
            done * 10 >= possible * 8,
            "{done} jobs in {RUN:?} over 2 slots of {JOB:?} jobs (possible {possible})"
        );
        assert!(done <= possible + 2, "{done} jobs: more than 2 ran at once");
        assert_eq!(jobs_running(&pacer).await, 0, "every slot freed at the end");
    })
    .await;
}

/// pacer in front of a test upstream that echoes request bodies, so a creation's answer
/// carries the `jobId` the test sends; one job slot.
async fn one_slot(up: &TestUpstream) -> Running {
    start_pacer(&format!(
        "{}\n[queue]\nmax_wait = \"300ms\"\n\n\
         [[limit]]\nname = \"jobs\"\nmatch = \"POST /api/v2/analytics/*/details/jobs\"\n\
         scope = \"global\"\njobs = 1\n",
        one_route_config("", &up.url(), "")
    ))
    .await
}

#[tokio::test]
async fn a_failed_creation_gives_its_slot_back_and_delete_frees_it() {
    let _slot = slot(Load::Timed).await;
    within("job slots refunded and deleted", async {
        let up = TestUpstream::start().await;
        let pacer = one_slot(&up).await;
        let client = TestClient::http1(pacer.proxy_addr);
        // The upstream refuses the creation: no job, the slot is free again.
        let mut failed = post(&client, JOBS_PATH, None, r#"{"jobId":"nope"}"#);
        failed
            .headers_mut()
            .insert("x-reply-status", "503".parse().unwrap());
        assert_eq!(
            client.send(failed).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(jobs_running(&pacer).await, 0);
        // A 2xx that names no job holds nothing either.
        let idless = client.send(post(&client, JOBS_PATH, None, "{}")).await;
        assert_eq!(idless.status, StatusCode::OK);
        assert_eq!(jobs_running(&pacer).await, 0);
        // A created job holds the slot, and the caller gets its answer unchanged.
        let body = r#"{"jobId":"job-1","state":"QUEUED"}"#;
        let created = client.send(post(&client, JOBS_PATH, None, body)).await;
        assert_eq!(
            (created.status, created.text().as_str()),
            (StatusCode::OK, body)
        );
        assert_eq!(jobs_running(&pacer).await, 1);
        // The next creation waits, then is shed with Retry-After: nothing reaches upstream.
        let before = up.count();
        let shed = client
            .send(post(&client, JOBS_PATH, None, r#"{"jobId":"job-2"}"#))
            .await;
        shed.assert_pacer_error(StatusCode::TOO_MANY_REQUESTS);
        assert!(shed.header("retry-after").is_some());
        assert_eq!(up.count(), before);
        // A refused DELETE keeps the slot; a 2xx DELETE of the job frees it.
        let job = format!("{JOBS_PATH}/job-1");
        let refused = client
            .request(Method::DELETE, &job)
            .header("x-reply-status", "404")
            .body(empty())
            .unwrap();
        assert_eq!(client.send(refused).await.status, StatusCode::NOT_FOUND);
        assert_eq!(jobs_running(&pacer).await, 1);
        let delete = client.request(Method::DELETE, &job).body(empty()).unwrap();
        assert_eq!(client.send(delete).await.status, StatusCode::OK);
        assert_eq!(jobs_running(&pacer).await, 0);
        let next = client
            .send(post(&client, JOBS_PATH, None, r#"{"jobId":"job-3"}"#))
            .await;
        assert_eq!(next.status, StatusCode::OK);
        assert_eq!(jobs_running(&pacer).await, 1);
    })
    .await;
}
