//! No credential ever reaches a log line or a metric: a real flow (simulator + pacer,
//! tokens issued through pacer, Basic credentials, an unseen token resolved with
//! `tokens/me`, a route with an inbound key, a credential route with pacer's own token)
//! runs with every log record at TRACE captured,
//! then the captured text, `/metrics` and `/status` are searched for every secret used.
//!
//! pacer runs as its own process (`pacer run`, `PACER_LOG=trace`) and its whole stdout
//! (the access log) and stderr (every tracing record) are searched. A subscriber scoped to
//! one thread of this test process would race the other tests: tracing caches per callsite
//! whether anyone listens, and a callsite first reached on another test's thread while the
//! scoped subscriber was the only one registered is cached as "never" for good.

use crate::support::*;
use base64::Engine as _;
use http::{Method, StatusCode};
use pacer::sim::{SimConfig, Simulator};

const CLIENT_ID: &str = "secrets-client";
const CLIENT_SECRET: &str = "S3cr3t-Client-Secret-7f1d9a";
const OTHER_ID: &str = "direct-client";
const OTHER_SECRET: &str = "Other-Secret-b84c20e6";
const WRONG_SECRET: &str = "Wrong-Secret-55aa01";
const INBOUND_KEY: &str = "inbound-KEY-9c2e5b3f";
const WRONG_KEY: &str = "wrong-inbound-KEY-e1f2";
const FORGED_TOKEN: &str = "forgedTokenNeverIssued0123456789abcdef";
const KEY_VAR: &str = "PACER_SECRETS_TEST_INBOUND_KEY";
const CLIENT_SECRET_VAR: &str = "PACER_SECRETS_TEST_CLIENT_SECRET";

fn basic(id: &str, secret: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    format!("Basic {b64}")
}

async fn token_through(client: &TestClient, authorization: Option<&str>, form: &str) -> Reply {
    let mut req = client
        .request(Method::POST, "/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    client
        .send(req.body(full(form.to_string())).expect("request"))
        .await
}

fn access_token(reply: &Reply) -> String {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// Where `needle` first occurs in `haystack`, with some context, for the failure message.
fn leak_context(haystack: &str, needle: &str) -> Option<String> {
    let i = haystack.find(needle)?;
    let start = haystack[..i].rfind('\n').map_or(0, |n| n + 1);
    let end = haystack[i..].find('\n').map_or(haystack.len(), |n| i + n);
    Some(haystack[start..end].to_string())
}

#[tokio::test]
async fn no_secret_reaches_logs_or_metrics() {
    let _slot = slot(Load::Timed).await;

    let (logs, metrics, status, secrets) = within("secrets flow", async {
        let sim_config = SimConfig::from_toml_str(&format!(
            "window = \"60s\"\nclient_requests = 1000\norg_requests = 10000\n\
             [[client]]\nid = \"{CLIENT_ID}\"\nsecret = \"{CLIENT_SECRET}\"\n\
             [[client]]\nid = \"{OTHER_ID}\"\nsecret = \"{OTHER_SECRET}\"\n"
        ))
        .expect("simulator config");
        let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), sim_config)
            .await
            .expect("simulator starts");
        let url = sim.url();
        // Records what pacer sends on the credential route: the token pacer fetched.
        let rec = TestUpstream::start().await;
        let rec_url = rec.url();
        let pacer = PacerProcess::start(
            "secrets",
            |port, admin| {
                format!(
                    "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nshutdown_grace = \"1s\"\n\n\
                     [[upstream]]\nname = \"api\"\nurl = \"{url}\"\n\n\
                     [[upstream]]\nname = \"login\"\nurl = \"{url}\"\n\n\
                     [[route]]\nprefix = \"/\"\nupstream = \"api\"\n\n\
                     [[route]]\nprefix = \"/oauth/\"\nupstream = \"login\"\n\n\
                     [[route]]\nprefix = \"/crm/\"\nupstream = \"api\"\nstrip_prefix = true\n\
                     identity = [\"basic-user\"]\n\
                     inbound_auth = {{ header = \"x-pacer-key\", keys = [\"${{{KEY_VAR}}}\"] }}\n\n\
                     [[upstream]]\nname = \"rec\"\nurl = \"{rec_url}\"\n\n\
                     [[credential]]\nname = \"own\"\nupstream = \"login\"\nclient_id = \"{CLIENT_ID}\"\n\
                     client_secret = \"${{{CLIENT_SECRET_VAR}}}\"\n\n\
                     [[route]]\nprefix = \"/cred/\"\nupstream = \"rec\"\nstrip_prefix = true\n\
                     credential = \"own\"\n\
                     inbound_auth = {{ header = \"x-pacer-key\", keys = [\"${{{KEY_VAR}}}\"] }}\n\n\
                     [identity]\ntokens_me = true\n\n\
                     [[client]]\nid = \"{CLIENT_ID}\"\nname = \"secrets\"\n\n\
                     [[limit]]\nname = \"per-client\"\nupstream = \"api\"\nscope = \"client\"\n\
                     requests = 1000\nper = \"60s\"\n"
                )
            },
            &[
                (KEY_VAR, INBOUND_KEY),
                (CLIENT_SECRET_VAR, CLIENT_SECRET),
                ("PACER_LOG", "trace"),
            ],
        )
        .await;
        let h1 = TestClient::http1(pacer.addr);
        let h2 = TestClient::h2c(pacer.addr);

        // Tokens issued through pacer: Basic credentials, and credentials in the form body.
        let t_basic = access_token(
            &token_through(
                &h1,
                Some(&basic(CLIENT_ID, CLIENT_SECRET)),
                "grant_type=client_credentials",
            )
            .await,
        );
        let t_form = access_token(
            &token_through(
                &h2,
                None,
                &format!(
                    "grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"
                ),
            )
            .await,
        );
        // A wrong secret is still a secret.
        let refused = token_through(
            &h1,
            Some(&basic(CLIENT_ID, WRONG_SECRET)),
            "grant_type=client_credentials",
        )
        .await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.text());

        // A token pacer never saw issued: resolved through tokens/me.
        let direct = TestClient::http1(sim.addr());
        let t_direct = access_token(
            &token_through(
                &direct,
                Some(&basic(OTHER_ID, OTHER_SECRET)),
                "grant_type=client_credentials",
            )
            .await,
        );

        for (client, token) in [(&h1, &t_basic), (&h2, &t_form), (&h1, &t_direct)] {
            let auth = format!("Bearer {token}");
            let r = client
                .get("/api/v2/users/me", &[("authorization", &auth)])
                .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        }
        let forged = h2
            .get(
                "/api/v2/users/me",
                &[("authorization", &format!("Bearer {FORGED_TOKEN}"))],
            )
            .await;
        assert_eq!(forged.status, StatusCode::UNAUTHORIZED, "{}", forged.text());

        // The inbound-key route: the right key is let through (and stripped), a wrong one is 401.
        let basic_header = basic(CLIENT_ID, CLIENT_SECRET);
        let through = h1
            .get(
                "/crm/api/v2/users",
                &[("x-pacer-key", INBOUND_KEY), ("authorization", &basic_header)],
            )
            .await;
        assert_ne!(through.status, StatusCode::FORBIDDEN, "{}", through.text());
        assert!(
            through.header("x-pacer-reason").is_none(),
            "{}",
            through.text()
        );
        let wrong = h2
            .get(
                "/crm/api/v2/users",
                &[("x-pacer-key", WRONG_KEY), ("authorization", &basic_header)],
            )
            .await;
        wrong.assert_pacer_error(StatusCode::UNAUTHORIZED);

        // The credential route: pacer's own token goes upstream in place of the caller's.
        let cred = h2
            .get(
                "/cred/api/v2/users",
                &[("x-pacer-key", INBOUND_KEY), ("authorization", "Bearer caller")],
            )
            .await;
        assert_eq!(cred.status, StatusCode::OK, "{}", cred.text());
        let t_own = rec
            .only()
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer ").map(str::to_string))
            .expect("pacer's bearer token upstream");
        assert_ne!(t_own, "caller");

        let admin = TestClient::http1(pacer.admin);
        let metrics = admin.get("/metrics", &[]).await.text();
        let status = admin.get("/status", &[]).await.text();
        // Idle keep-alive connections hold a graceful shutdown until its grace (1 s here).
        drop((h1, h2, direct, admin));
        let (stdout, stderr) = pacer.stop();
        sim.shutdown().await;

        let b64 = |id: &str, s: &str| {
            base64::engine::general_purpose::STANDARD.encode(format!("{id}:{s}"))
        };
        let secrets: Vec<(&'static str, String)> = vec![
            ("client secret", CLIENT_SECRET.into()),
            ("other client secret", OTHER_SECRET.into()),
            ("wrong secret", WRONG_SECRET.into()),
            ("Basic credential", b64(CLIENT_ID, CLIENT_SECRET)),
            ("other Basic credential", b64(OTHER_ID, OTHER_SECRET)),
            ("wrong Basic credential", b64(CLIENT_ID, WRONG_SECRET)),
            ("inbound key", INBOUND_KEY.into()),
            ("wrong inbound key", WRONG_KEY.into()),
            ("token issued for Basic", t_basic),
            ("token issued for form", t_form),
            ("token issued directly", t_direct),
            ("forged token", FORGED_TOKEN.into()),
            ("token pacer fetched for a credential", t_own),
        ];
        (format!("{stdout}{stderr}"), metrics, status, secrets)
    })
    .await;

    // The capture works: pacer's own records, hyper's trace records and access lines.
    assert!(
        logs.contains("pacer listening"),
        "capture is empty?\n{logs}"
    );
    assert!(logs.contains("TRACE"), "no TRACE records captured");
    assert!(
        logs.contains("\"endpoint\":\"GET /api/v2/users/me\""),
        "no access lines captured"
    );
    assert!(metrics.contains("pacer_requests_total"), "{metrics}");

    let report = format!(
        "captured {} bytes of logs ({} lines), {} bytes of /metrics, {} bytes of /status; {} secrets searched",
        logs.len(),
        logs.lines().count(),
        metrics.len(),
        status.len(),
        secrets.len()
    );
    eprintln!("{report}");
    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        // The whole secret, and its first 16 characters (a truncated log would still leak).
        let mut needles = vec![secret.as_str()];
        if secret.len() >= 24 {
            needles.push(&secret[..16]);
        }
        for needle in needles {
            for (place, text) in [
                ("logs", &logs),
                ("/metrics", &metrics),
                ("/status", &status),
            ] {
                if let Some(line) = leak_context(text, needle) {
                    leaks.push(format!("{what} ({needle}) in {place}: {line}"));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}
