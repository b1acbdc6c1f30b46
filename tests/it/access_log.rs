//! The access log of the real binary: `pacer run` writes one line per request on stdout
//! (tracing stays on stderr), for every kind of answer, with the request id it echoes and
//! forwards, and never a token, an inbound key or a query value.

use crate::support::*;
use http::StatusCode;
use serde_json::Value;
use std::net::SocketAddr;

const TOKEN: &str = "AccessLogBearerToken0123456789abcdef";
const KEY: &str = "access-log-inbound-KEY-4d7e1a";
const WRONG_KEY: &str = "access-log-wrong-KEY-9b3c";
const QUERY_VALUE: &str = "query-value-5e8f2c";
const USER_ID: &str = "0f8e6c2a-1b3d-4e5f-8a7b-9c0d1e2f3a4b";
const KEY_VAR: &str = "PACER_ACCESS_LOG_TEST_KEY";

fn config(port: u16, admin: u16, upstream: &str, dead: SocketAddr) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\n\
         [log]\nformat = \"json\"\n\n\
         [[upstream]]\nname = \"api\"\nurl = \"{upstream}\"\n\n\
         [[upstream]]\nname = \"dead\"\nurl = \"http://{dead}\"\n\n\
         [[route]]\nprefix = \"/api/\"\nupstream = \"api\"\n\n\
         [[route]]\nprefix = \"/keyed/\"\nupstream = \"api\"\n\
         inbound_auth = {{ header = \"x-pacer-key\", keys = [\"${{{KEY_VAR}}}\"] }}\n\n\
         [[route]]\nprefix = \"/dead/\"\nupstream = \"dead\"\n\n\
         [identity]\ntokens_me = false\n\n\
         [[limit]]\nname = \"paced\"\nupstream = \"api\"\nmatch = \"GET /api/v2/paced\"\n\
         requests = 1\nper = \"1s\"\n\n\
         [[limit]]\nname = \"scarce\"\nupstream = \"api\"\nmatch = \"GET /api/v2/scarce\"\n\
         requests = 1\nper = \"10m\"\n"
    )
}

/// `pacer run` on [`config`] in front of `upstream`, with `PACER_LOG_FORMAT` when given.
async fn start(upstream: &TestUpstream, format: Option<&str>) -> PacerProcess {
    let url = upstream.url();
    let mut env = vec![(KEY_VAR, KEY), ("PACER_LOG", "debug")];
    if let Some(f) = format {
        env.push(("PACER_LOG_FORMAT", f));
    }
    PacerProcess::start(
        "access-log",
        |port, admin| config(port, admin, &url, dead_addr()),
        &env,
    )
    .await
}

/// A request with a bearer token, a query value and its own request id.
async fn get(client: &TestClient, path: &str, id: &str, extra: &[(&str, &str)]) -> Reply {
    let auth = format!("Bearer {TOKEN}");
    let mut headers = vec![("authorization", auth.as_str()), ("x-request-id", id)];
    headers.extend_from_slice(extra);
    let sep = if path.contains('?') { '&' } else { '?' };
    let reply = client
        .get(&format!("{path}{sep}secret={QUERY_VALUE}"), &headers)
        .await;
    assert_eq!(reply.header("x-request-id"), Some(id), "request id echoed");
    reply
}

/// The JSON line of the request with this id.
fn line_of<'a>(lines: &'a [Value], id: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["request_id"] == id)
        .unwrap_or_else(|| panic!("no access line for {id}: {lines:#?}"))
}

fn assert_secret_free(text: &str) {
    for secret in [TOKEN, KEY, WRONG_KEY, QUERY_VALUE, USER_ID] {
        assert!(!text.contains(secret), "{secret:?} in:\n{text}");
    }
}

/// Pacer's own answer: its `contextId` is the line's `correlation_id`.
fn assert_own_answer(line: &Value, reply: &Reply) {
    assert_eq!(line["correlation_id"], reply.json()["contextId"], "{line}");
    assert_eq!(line["queue_wait_ms"], Value::Null, "{line}");
    assert_eq!(line["upstream_ms"], Value::Null, "{line}");
}

#[tokio::test]
async fn json_lines_for_every_kind_of_answer_on_stdout() {
    let _slot = slot(Load::Timed).await;
    within("access log", async {
        let upstream = TestUpstream::start().await;
        let pacer = start(&upstream, None).await;
        let client = TestClient::http1(pacer.addr);

        // Forwarded, with a correlation id from the upstream and a body both ways.
        let fwd = get(
            &client,
            &format!("/api/v2/users/{USER_ID}"),
            "req-forwarded",
            &[
                ("x-pacer-app", "billing-sync"),
                ("x-reply-header", "inin-correlation-id: upstream-corr-1"),
                // Only pacer's own answers give a reason.
                ("x-reply-header", "x-pacer-reason: spoofed"),
            ],
        )
        .await;
        assert_eq!(fwd.status, StatusCode::OK);
        assert_eq!(
            upstream.only().header("x-request-id").as_deref(),
            Some("req-forwarded"),
            "request id forwarded upstream"
        );
        // Queued, then forwarded: one request a second on this endpoint.
        for id in ["req-paced-1", "req-paced-2"] {
            assert_eq!(
                get(&client, "/api/v2/paced", id, &[]).await.status,
                StatusCode::OK
            );
        }
        // Shed: one request in ten minutes, and the second would wait past max_wait.
        let first = get(&client, "/api/v2/scarce", "req-scarce-1", &[]).await;
        assert_eq!(first.status, StatusCode::OK);
        let shed = get(&client, "/api/v2/scarce", "req-shed", &[]).await;
        assert_eq!(shed.status, StatusCode::TOO_MANY_REQUESTS);
        // Rejected: a wrong inbound key, and no route.
        let unauth = get(
            &client,
            "/keyed/x",
            "req-401",
            &[("x-pacer-key", WRONG_KEY)],
        )
        .await;
        assert_eq!(unauth.status, StatusCode::UNAUTHORIZED);
        let keyed = get(&client, "/keyed/x", "req-keyed", &[("x-pacer-key", KEY)]).await;
        assert_eq!(keyed.status, StatusCode::OK);
        let lost = get(&client, &format!("/nowhere/{USER_ID}"), "req-404", &[]).await;
        assert_eq!(lost.status, StatusCode::NOT_FOUND);
        // Upstream error: nothing listens there.
        let bad = get(&client, "/dead/x", "req-502", &[]).await;
        assert_eq!(bad.status, StatusCode::BAD_GATEWAY);
        // A caller's id that is not plain is replaced, not logged.
        let odd = client
            .get("/api/v2/odd", &[("x-request-id", "has space \"quoted\"")])
            .await;
        let made = odd.header("x-request-id").unwrap().to_string();
        assert_eq!(made.len(), 36, "{made}");

        let lines: Vec<Value> = pacer
            .stdout_lines(10)
            .await
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 10, "{lines:#?}");
        for l in &lines {
            let time = l["time"].as_str().unwrap();
            assert!(
                time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
                "{l}"
            );
            assert!(l["total_ms"].as_f64().unwrap() >= 0.0, "{l}");
            assert_eq!(l["method"], "GET", "{l}");
        }

        let l = line_of(&lines, "req-forwarded");
        assert_eq!(l["endpoint"], "GET /api/v2/users/{id}", "{l}");
        assert_eq!(l["route"], "/api/", "{l}");
        assert_eq!(l["upstream"], "api", "{l}");
        assert_eq!(l["client"], "unknown", "{l}");
        assert_eq!(l["app"], "billing-sync", "{l}");
        assert_eq!(l["priority"], "normal", "{l}");
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["outcome"], "forwarded", "{l}");
        assert_eq!(l["reason"], Value::Null, "{l}");
        assert_eq!(l["correlation_id"], "upstream-corr-1", "{l}");
        assert!(l["queue_wait_ms"].as_f64().is_some(), "{l}");
        assert!(l["upstream_ms"].as_f64().unwrap() > 0.0, "{l}");
        assert_eq!(l["bytes_in"], 0, "{l}");
        assert_eq!(l["bytes_out"], fwd.body.len(), "{l}");

        let waited = line_of(&lines, "req-paced-2");
        assert_eq!(waited["outcome"], "forwarded", "{waited}");
        assert_eq!(waited["endpoint"], "GET /api/v2/paced", "{waited}");
        assert!(
            waited["queue_wait_ms"].as_f64().unwrap() > 100.0,
            "the second request waited for the next second: {waited}"
        );

        let l = line_of(&lines, "req-shed");
        assert_eq!(l["status"], 429, "{l}");
        assert_eq!(l["outcome"], "shed", "{l}");
        assert_eq!(l["reason"], "wait_too_long", "{l}");
        assert_eq!(l["reason"], shed.header("x-pacer-reason").unwrap(), "{l}");
        assert_eq!(l["endpoint"], "GET /api/v2/scarce", "{l}");
        assert_own_answer(l, &shed);
        assert_eq!(l["bytes_out"], shed.body.len(), "{l}");

        let l = line_of(&lines, "req-401");
        assert_eq!(l["status"], 401, "{l}");
        assert_eq!(l["outcome"], "rejected", "{l}");
        assert_eq!(l["route"], "/keyed/", "{l}");
        assert_eq!(l["upstream"], "api", "{l}");
        assert_eq!(l["endpoint"], "none", "{l}");
        assert_own_answer(l, &unauth);
        assert_eq!(line_of(&lines, "req-keyed")["status"], 200);

        let l = line_of(&lines, "req-404");
        assert_eq!(l["status"], 404, "{l}");
        assert_eq!(l["outcome"], "rejected", "{l}");
        assert_eq!(l["route"], "none", "{l}");
        assert_eq!(l["upstream"], "none", "{l}");
        assert_own_answer(l, &lost);

        let l = line_of(&lines, "req-502");
        assert_eq!(l["status"], 502, "{l}");
        assert_eq!(l["outcome"], "error", "{l}");
        assert_eq!(l["upstream"], "dead", "{l}");
        assert_eq!(l["route"], "/dead/", "{l}");
        assert!(l["upstream_ms"].as_f64().is_some(), "{l}");
        assert_eq!(l["correlation_id"], bad.json()["contextId"], "{l}");

        line_of(&lines, &made);

        // Pacer's own refusals, by route prefix and status.
        let metrics = TestClient::http1(pacer.admin)
            .get("/metrics", &[])
            .await
            .text();
        for series in [
            "pacer_rejected_total{upstream=\"api\",route=\"/keyed/\",status=\"401\"} 1",
            "pacer_rejected_total{upstream=\"none\",route=\"none\",status=\"404\"} 1",
        ] {
            assert!(metrics.contains(series), "{series} not in:\n{metrics}");
        }
        // Sheds and upstream errors are not refusals.
        for l in metrics
            .lines()
            .filter(|l| l.starts_with("pacer_rejected_total{"))
        {
            assert!(
                !l.contains("status=\"429\"") && !l.contains("status=\"502\""),
                "{l}"
            );
        }
        assert_secret_free(&metrics);

        let (stdout, stderr) = pacer.stop();
        assert_secret_free(&stdout);
        assert_secret_free(&stderr);
        // Only access lines on stdout; tracing (here at debug) on stderr.
        assert!(stderr.contains("pacer listening"), "{stderr}");
        assert!(!stdout.contains("pacer listening"), "{stdout}");
    })
    .await;
}

#[tokio::test]
async fn pacer_log_format_text_overrides_the_file() {
    let _slot = slot(Load::Timed).await;
    within("text access log", async {
        let upstream = TestUpstream::start().await;
        let pacer = start(&upstream, Some("text")).await;
        let client = TestClient::http1(pacer.addr);
        let reply = get(&client, &format!("/api/v2/users/{USER_ID}"), "text-1", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        let lost = get(&client, "/nowhere", "text-2", &[]).await;
        assert_eq!(lost.status, StatusCode::NOT_FOUND);
        let lines = pacer.stdout_lines(2).await;
        let ok = lines
            .iter()
            .find(|l| l.contains("request_id=text-1"))
            .unwrap();
        assert!(ok.starts_with("time="), "{ok}");
        for field in [
            " method=GET ",
            " endpoint=\"GET /api/v2/users/{id}\" ",
            " route=/api/ ",
            " upstream=api ",
            " client=unknown ",
            " priority=normal ",
            " status=200 outcome=forwarded reason=- ",
            " bytes_in=0 ",
        ] {
            assert!(ok.contains(field), "{field:?} not in {ok}");
        }
        let refused = lines
            .iter()
            .find(|l| l.contains("request_id=text-2"))
            .unwrap();
        assert!(
            refused.contains(" status=404 outcome=rejected "),
            "{refused}"
        );
        assert!(serde_json::from_str::<Value>(ok).is_err(), "{ok}");
        let (stdout, _) = pacer.stop();
        assert_secret_free(&stdout);
    })
    .await;
}
