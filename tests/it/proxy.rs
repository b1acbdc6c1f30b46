//! Black-box tests of the proxy path over real sockets: pacer on `127.0.0.1:0` in front of
//! a recording upstream, driven by real HTTP clients and raw TCP.

use crate::support::*;
use bytes::Bytes;
use http::{Method, StatusCode, Version};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Quiet time after which a raw exchange stops waiting for more bytes.
const QUIET: Duration = Duration::from_secs(3);

/// pacer in front of one plain upstream, route `/api/`.
async fn pacer_for(up: &TestUpstream, server: &str, upstream: &str) -> pacer::app::Running {
    start_pacer(&one_route_config(server, &up.url(), upstream)).await
}

#[tokio::test]
async fn methods_queries_headers_and_bodies_pass_unchanged() {
    within("passthrough", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "", "").await;
        let client = TestClient::http1(pacer.proxy_addr);

        let cases = [
            (Method::GET, 200u16, ""),
            (Method::POST, 201, "{\"name\":\"ivr\",\"é\":[1,2,3]}"),
            (Method::PUT, 202, "plain text body\nwith two lines"),
            (Method::DELETE, 204, ""),
            (Method::PATCH, 200, "[{\"op\":\"replace\"}]"),
            (Method::OPTIONS, 200, ""),
        ];
        for (i, (method, status, body)) in cases.iter().cloned().enumerate() {
            let path = format!("/api/v2/users/{i}?pageSize=25&q=a%20b&expand=x,y&x=1&x=2");
            let req = client
                .request(method.clone(), &path)
                .header("authorization", "Bearer abc.DEF-123")
                .header("x-custom-a", "Value With  Spaces")
                .header("x-multi", "one")
                .header("x-multi", "two")
                .header("content-type", "application/json; charset=UTF-8")
                .header("x-reply-status", status.to_string())
                .header("x-reply-header", "x-resp-one: alpha")
                .header("x-reply-header", "set-cookie: a=1; Path=/")
                .header("x-reply-header", "set-cookie: b=2")
                .body(full(body.to_string()))
                .unwrap();
            let reply = client.send(req).await;

            assert_eq!(reply.status.as_u16(), status, "{method}: {}", reply.text());
            assert_eq!(reply.header("x-resp-one"), Some("alpha"), "{method}");
            assert_eq!(
                reply.header_all("set-cookie"),
                ["a=1; Path=/", "b=2"],
                "{method}"
            );
            assert_eq!(reply.body, Bytes::from(body), "{method}");

            up.wait_for(i + 1).await;
            let seen = up.records().pop().unwrap();
            assert_eq!(seen.method, method);
            assert_eq!(seen.uri, path);
            assert_eq!(
                seen.header("authorization").as_deref(),
                Some("Bearer abc.DEF-123")
            );
            assert_eq!(
                seen.header("x-custom-a").as_deref(),
                Some("Value With  Spaces")
            );
            assert_eq!(seen.header_all("x-multi"), ["one", "two"]);
            assert_eq!(
                seen.header("content-type").as_deref(),
                Some("application/json; charset=UTF-8")
            );
            assert_eq!(seen.body, Bytes::from(body), "{method}");
            assert_eq!(seen.body_len, body.len() as u64);
            assert!(seen.body_complete);
            if !body.is_empty() {
                assert_eq!(seen.header("content-length"), Some(body.len().to_string()));
            }
            assert_eq!(seen.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
            assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
            // The upstream is asked for by its own authority, not the client's Host.
            assert_eq!(seen.host, Some(up.addr.to_string()));
        }
        assert_eq!(up.count(), cases.len(), "{:#?}", up.records());

        // HEAD: the upstream's Content-Length comes back, with no body.
        let req = client
            .request(Method::HEAD, "/api/v2/users/head")
            .header("x-reply-header", "content-length: 1234")
            .body(empty())
            .unwrap();
        let reply = client.send(req).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("content-length"), Some("1234"));
        assert!(reply.body.is_empty());
        assert_eq!(up.records().pop().unwrap().method, Method::HEAD);
        // The connection is still usable after a HEAD.
        assert_eq!(
            client.get("/api/after-head", &[]).await.status,
            StatusCode::OK
        );
    })
    .await;
}

#[tokio::test]
async fn strip_prefix_and_upstream_base_path() {
    within("strip_prefix", async {
        let up = TestUpstream::start().await;
        let pacer = start_pacer(&format!(
            "[[upstream]]\nname = \"up\"\nurl = \"{url}/base/\"\n\n\
             [[upstream]]\nname = \"other\"\nurl = \"{url}\"\n\n\
             [[route]]\nprefix = \"/ivr/\"\nupstream = \"up\"\nstrip_prefix = true\n\n\
             [[route]]\nprefix = \"/\"\nupstream = \"other\"\n\n{NO_TOKEN_LOOKUPS}",
            url = up.url()
        ))
        .await;
        let client = TestClient::http1(pacer.proxy_addr);
        for (sent, expected) in [
            ("/ivr/api/v2/x?a=1", "/base/api/v2/x?a=1"),
            ("/ivr", "/base/"),
            ("/ivrx/y", "/ivrx/y"),
            ("/api/v2/z", "/api/v2/z"),
        ] {
            assert_eq!(client.get(sent, &[]).await.status, StatusCode::OK, "{sent}");
            assert_eq!(up.records().pop().unwrap().uri, expected, "{sent}");
        }
    })
    .await;
}

#[tokio::test]
async fn expect_100_continue() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within("100-continue", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "max_body_bytes = 1024", "").await;

        // Accepted: the client hears 100 Continue, sends the body, gets the answer.
        let mut s = tokio::net::TcpStream::connect(pacer.proxy_addr).await.unwrap();
        s.write_all(b"POST /api/expect HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(QUIET, s.read(&mut buf)).await.expect("100 Continue").unwrap();
            assert!(n > 0, "closed before 100 Continue");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 100 Continue\r\n"), "{}", String::from_utf8_lossy(&got));
        s.write_all(b"hello").await.unwrap();
        let mut rest = Vec::new();
        while !String::from_utf8_lossy(&rest).ends_with("hello") {
            let n = tokio::time::timeout(QUIET, s.read(&mut buf)).await.expect("final answer").unwrap();
            assert!(n > 0, "closed before the answer: {}", String::from_utf8_lossy(&rest));
            rest.extend_from_slice(&buf[..n]);
        }
        assert!(rest.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&rest));
        assert_eq!(up.only().body, Bytes::from("hello"));

        // Refused by Content-Length: 413 at once, without 100 Continue.
        let req = b"POST /api/expect HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n";
        let reply = raw_exchange(pacer.proxy_addr, req, false, QUIET).await;
        assert_eq!(reply.status(), Some(413), "{}", String::from_utf8_lossy(&reply.bytes));
        assert_eq!(up.count(), 1);
    })
    .await;
}

#[tokio::test]
async fn hop_by_hop_fields_are_removed_both_ways() {
    within("hop-by-hop", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "", "").await;

        let request = "GET /api/hop HTTP/1.1\r\n\
            Host: pacer.test\r\n\
            Connection: x-custom, keep-alive\r\n\
            X-Custom: secret\r\n\
            Keep-Alive: timeout=5\r\n\
            Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
            Proxy-Connection: keep-alive\r\n\
            TE: gzip\r\n\
            Upgrade: websocket\r\n\
            X-Forwarded-For: 6.6.6.6\r\n\
            X-Real-IP: 6.6.6.6\r\n\
            X-Kept: yes\r\n\
            X-Reply-Header: connection: x-up-secret\r\n\
            X-Reply-Header: x-up-secret: 1\r\n\
            X-Reply-Header: keep-alive: timeout=9\r\n\
            X-Reply-Header: proxy-authenticate: Basic realm=x\r\n\
            X-Reply-Header: x-up-kept: 1\r\n\
            \r\n";
        let reply = raw_exchange(pacer.proxy_addr, request.as_bytes(), false, QUIET).await;
        assert_eq!(
            reply.status(),
            Some(200),
            "{}",
            String::from_utf8_lossy(&reply.bytes)
        );

        let seen = up.only();
        for name in [
            "connection",
            "x-custom",
            "keep-alive",
            "proxy-authorization",
            "proxy-connection",
            "te",
            "upgrade",
            "x-real-ip",
        ] {
            assert!(
                seen.header(name).is_none(),
                "{name} reached the upstream: {:?}",
                seen.headers
            );
        }
        assert_eq!(seen.header("x-kept").as_deref(), Some("yes"));
        // No trusted proxies: the client's own X-Forwarded-For is replaced by the peer.
        assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.1"]);

        // Hop-by-hop fields of the upstream's answer stay on the upstream's hop.
        assert_eq!(reply.header("x-up-kept").as_deref(), Some("1"));
        for name in ["x-up-secret", "keep-alive", "proxy-authenticate"] {
            assert!(
                reply.header(name).is_none(),
                "{name} came back: {}",
                String::from_utf8_lossy(&reply.bytes)
            );
        }
        assert!(
            !reply
                .header("connection")
                .unwrap_or_default()
                .contains("x-up-secret"),
            "{}",
            String::from_utf8_lossy(&reply.bytes)
        );

        // `Connection` must not be able to remove the forwarding fields pacer sets.
        let request = "GET /api/xff HTTP/1.1\r\n\
            Host: pacer.test\r\n\
            Connection: x-forwarded-for, x-forwarded-proto\r\n\
            X-Forwarded-For: 6.6.6.6\r\n\
            \r\n";
        let reply = raw_exchange(pacer.proxy_addr, request.as_bytes(), false, QUIET).await;
        assert_eq!(reply.status(), Some(200));
        let seen = up.records().pop().unwrap();
        assert_eq!(seen.uri, "/api/xff");
        assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.1"]);
        assert_eq!(seen.header("x-forwarded-proto").as_deref(), Some("http"));
    })
    .await;
}

#[tokio::test]
async fn streams_100_mib_up_and_down_in_bounded_memory() {
    let _slot = slot(Load::Alone).await;
    const SIZE: u64 = 100 * 1024 * 1024;
    const SAMPLE_EVERY: u64 = 4 * 1024 * 1024;
    within("100 MiB", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "max_body_bytes = 209715200", "").await;
        let client = TestClient::http1(pacer.proxy_addr);
        // Warm up the connections and pools before the baseline.
        assert_eq!(client.get("/api/warm", &[]).await.status, StatusCode::OK);

        let base = vm_rss_bytes().expect("VmRSS");
        let peak = Arc::new(Peak::default());
        peak.sample_rss();

        // Upload: chunked, produced on the fly.
        let p = peak.clone();
        let body = GenBody::chunked(SIZE).on_chunk(move |sent| {
            if sent % SAMPLE_EVERY == 0 {
                p.sample_rss();
            }
        });
        let req = client
            .request(Method::POST, "/api/upload")
            .body(body.boxed())
            .unwrap();
        let reply = client.send(req).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(
            reply.header("x-received-bytes"),
            Some(SIZE.to_string().as_str())
        );
        let seen = up.records().pop().unwrap();
        assert_eq!(
            (seen.uri.as_str(), seen.body_len, seen.body_complete),
            ("/api/upload", SIZE, true)
        );

        // Download: counted as it streams.
        let req = client
            .request(Method::GET, "/api/download")
            .header("x-reply-download", SIZE.to_string())
            .body(empty())
            .unwrap();
        let body = client.download(req, SIZE).await;
        let mut next_sample = 0;
        let got = count_body(body, |n| {
            if n >= next_sample {
                peak.sample_rss();
                next_sample += SAMPLE_EVERY;
            }
        })
        .await
        .expect("download body");
        assert_eq!(got, SIZE);
        peak.sample_rss();

        let growth = peak.get().saturating_sub(base);
        assert!(
            growth < 60 * 1024 * 1024,
            "resident memory grew by {} MiB while streaming 100 MiB each way",
            growth / (1024 * 1024)
        );
    })
    .await;
}

#[tokio::test]
async fn http10_client_is_served() {
    within("HTTP/1.0", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "", "").await;
        let req = b"POST /api/old HTTP/1.0\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
        let reply = raw_exchange(pacer.proxy_addr, req, false, QUIET).await;
        assert!(reply.bytes.starts_with(b"HTTP/1."), "{reply:?}");
        assert_eq!(reply.status(), Some(200), "{reply:?}");
        assert_eq!(reply.body(), b"abc");
        let seen = up.only();
        assert_eq!((seen.uri.as_str(), seen.body_len), ("/api/old", 3));
    })
    .await;
}

#[tokio::test]
async fn unknown_route_is_404_json() {
    within("404", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "", "").await;
        let client = TestClient::http1(pacer.proxy_addr);
        for path in ["/other", "/", "/apix/v2", "/oauth/token"] {
            let reply = client.get(path, &[]).await;
            reply.assert_pacer_error(StatusCode::NOT_FOUND);
        }
        assert_eq!(up.count(), 0);
    })
    .await;
}

#[tokio::test]
async fn body_over_content_length_limit_is_413() {
    within("413 by Content-Length", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "max_body_bytes = 1024", "").await;
        let client = TestClient::http1(pacer.proxy_addr);

        let req = client
            .request(Method::POST, "/api/x")
            .body(full(vec![b'a'; 1025]))
            .unwrap();
        client
            .send(req)
            .await
            .assert_pacer_error(StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(up.count(), 0);

        let req = client
            .request(Method::POST, "/api/x")
            .body(full(vec![b'a'; 1024]))
            .unwrap();
        assert_eq!(client.send(req).await.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn chunked_body_over_limit_is_413() {
    within("413 chunked", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "max_body_bytes = 1024", "").await;
        let client = TestClient::http1(pacer.proxy_addr);

        let req = client
            .request(Method::POST, "/api/x")
            .body(GenBody::chunked(8 * 1024).boxed())
            .unwrap();
        client
            .send(req)
            .await
            .assert_pacer_error(StatusCode::PAYLOAD_TOO_LARGE);
        // Whatever reached the upstream is cut short, never the whole body.
        assert!(up
            .records()
            .iter()
            .all(|r| !r.body_complete || r.body_len <= 1024));

        let client = TestClient::http1(pacer.proxy_addr);
        let req = client
            .request(Method::POST, "/api/x")
            .body(GenBody::chunked(1000).boxed())
            .unwrap();
        let reply = client.send(req).await;
        assert_eq!((reply.status, reply.body.len()), (StatusCode::OK, 1000));
    })
    .await;
}

#[tokio::test]
async fn oversized_request_head_is_431_or_414() {
    within("431", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "", "").await;
        let client = TestClient::http1(pacer.proxy_addr);

        let big = "a".repeat(40 * 1024);
        client
            .get("/api/x", &[("x-big", &big)])
            .await
            .assert_pacer_error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

        // Over max_headers (64 by default): pacer's own JSON 431 up to hyper's 100 fields...
        let names: Vec<String> = (0..150).map(|i| format!("x-field-{i}")).collect();
        let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
        client
            .get("/api/x", &many[..80])
            .await
            .assert_pacer_error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        // ...and hyper's own 431 beyond them, on a connection of its own (hyper closes it).
        let flood = TestClient::http1(pacer.proxy_addr);
        assert_eq!(
            flood.get("/api/x", &many).await.status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );

        let long = format!("/api/{}", "a".repeat(9 * 1024));
        client
            .get(&long, &[])
            .await
            .assert_pacer_error(StatusCode::URI_TOO_LONG);
        assert_eq!(up.count(), 0);

        assert_eq!(
            client.get("/api/x", &many[..50]).await.status,
            StatusCode::OK
        );
    })
    .await;
}

#[tokio::test]
async fn closed_upstream_port_is_502() {
    within("502 dead port", async {
        let url = format!("http://{}", dead_addr());
        let pacer = start_pacer(&one_route_config("", &url, "connect_timeout = \"2s\"")).await;
        let client = TestClient::http1(pacer.proxy_addr);
        client
            .get("/api/x", &[])
            .await
            .assert_pacer_error(StatusCode::BAD_GATEWAY);
    })
    .await;
}

#[tokio::test]
async fn upstream_closing_without_answer_is_502() {
    within("502 closed", async {
        let up = TestUpstream::start_closing().await;
        let pacer = pacer_for(&up, "", "").await;
        let client = TestClient::http1(pacer.proxy_addr);
        client
            .get("/api/x", &[])
            .await
            .assert_pacer_error(StatusCode::BAD_GATEWAY);
        assert!(up.count() >= 1);
        assert_eq!(up.records()[0].uri, "/api/x");
    })
    .await;
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let _slot = slot(Load::Timed).await;
    within("504", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "", "timeout = \"300ms\"").await;
        let client = TestClient::http1(pacer.proxy_addr);
        // Without the timeout the upstream would answer 200 after 5 s: the 504 is pacer's.
        client
            .get("/api/slow", &[("x-reply-delay-ms", "5000")])
            .await
            .assert_pacer_error(StatusCode::GATEWAY_TIMEOUT);
        // A fast answer on the same route still works.
        assert_eq!(client.get("/api/fast", &[]).await.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn h2c_inbound_to_http1_upstream() {
    within("h2c", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "", "").await;
        let client = TestClient::h2c(pacer.proxy_addr);

        let reply = client.get("/api/v2/h2?x=1", &[("x-custom", "v")]).await;
        assert_eq!(
            (reply.status, reply.version),
            (StatusCode::OK, Version::HTTP_2)
        );
        let req = client
            .request(Method::POST, "/api/v2/h2")
            .header("x-reply-status", "201")
            .body(full("over h2"))
            .unwrap();
        let reply = client.send(req).await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (StatusCode::CREATED, "over h2")
        );

        let seen = up.records();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            (seen[0].uri.as_str(), seen[0].version),
            ("/api/v2/h2?x=1", Version::HTTP_11)
        );
        assert_eq!(seen[0].header("x-custom").as_deref(), Some("v"));
        assert_eq!(
            (seen[1].method.clone(), seen[1].body.clone()),
            (Method::POST, Bytes::from("over h2"))
        );
    })
    .await;
}

#[tokio::test]
async fn https_upstream_trusted_by_ca_file() {
    within("https upstream", async {
        let certs = TestCerts::new();
        let up = TestUpstream::start_tls(&certs).await;
        let ca = format!("ca_file = '{}'", certs.ca_pem.display());
        // Reached by name (`/api/`) and by IP address (`/ip/`); the certificate has both.
        let config = format!(
            "{}\n[[upstream]]\nname = \"by-ip\"\nurl = \"{}\"\n{ca}\n\n\
             [[route]]\nprefix = \"/ip/\"\nupstream = \"by-ip\"\nstrip_prefix = true\n",
            one_route_config("", &up.url_localhost(), &ca),
            up.url()
        );
        let pacer = start_pacer(&config).await;
        let client = TestClient::http1(pacer.proxy_addr);

        let req = client
            .request(Method::POST, "/api/secure?q=1")
            .body(full("tls body"))
            .unwrap();
        let reply = client.send(req).await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (StatusCode::OK, "tls body"),
            "{reply:?}"
        );
        let seen = up.only();
        assert_eq!((seen.uri.as_str(), seen.body_len), ("/api/secure?q=1", 8));
        assert_eq!(seen.body, Bytes::from("tls body"));
        // The pooled client negotiates h2 by ALPN when the upstream offers it.
        assert_eq!(seen.version, Version::HTTP_2);
        assert_eq!(seen.host, Some(format!("localhost:{}", up.addr.port())));

        let reply = client.get("/ip/api/by-ip", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(up.records().pop().unwrap().uri, "/api/by-ip");
    })
    .await;
}

#[tokio::test]
async fn https_upstream_without_ca_file_is_502() {
    within("https upstream untrusted", async {
        let certs = TestCerts::new();
        let up = TestUpstream::start_tls(&certs).await;
        let pacer = start_pacer(&one_route_config("", &up.url_localhost(), "")).await;
        let client = TestClient::http1(pacer.proxy_addr);
        client
            .get("/api/secure", &[])
            .await
            .assert_pacer_error(StatusCode::BAD_GATEWAY);
        assert_eq!(up.count(), 0);
    })
    .await;
}

#[tokio::test]
async fn inbound_tls() {
    within("inbound TLS", async {
        let certs = TestCerts::new();
        let up = TestUpstream::start().await;
        let tls = format!(
            "tls = {{ cert = '{}', key = '{}' }}",
            certs.cert_pem.display(),
            certs.key_pem.display()
        );
        let pacer = pacer_for(&up, &tls, "").await;
        let client = TestClient::https(pacer.proxy_addr, &certs);

        let reply = client.get("/api/tls", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        let req = client
            .request(Method::PUT, "/api/tls")
            .body(full("put over tls"))
            .unwrap();
        let reply = client.send(req).await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (StatusCode::OK, "put over tls")
        );

        let seen = up.records();
        assert_eq!(seen.len(), 2);
        assert!(seen
            .iter()
            .all(|r| r.header("x-forwarded-proto").as_deref() == Some("https")));

        // Plain HTTP on the TLS port gets nothing forwarded.
        let plain = raw_exchange(
            pacer.proxy_addr,
            b"GET /api/tls HTTP/1.1\r\nHost: x\r\n\r\n",
            true,
            QUIET,
        )
        .await;
        assert_ne!(plain.status(), Some(200));
        assert_eq!(up.count(), 2);
    })
    .await;
}

/// pacer with a catch-all route, so that anything not refused would be forwarded.
async fn catch_all_pacer(up: &TestUpstream) -> pacer::app::Running {
    start_pacer(&format!(
        "[[upstream]]\nname = \"up\"\nurl = \"{}\"\n\n[[route]]\nprefix = \"/\"\nupstream = \"up\"\n\n{NO_TOKEN_LOOKUPS}",
        up.url()
    ))
    .await
}

#[tokio::test]
async fn absolute_form_is_400_and_not_forwarded() {
    within("absolute-form", async {
        let up = TestUpstream::start().await;
        let pacer = catch_all_pacer(&up).await;
        for target in [
            "http://example.com/",
            "http://example.com/api/v2/x",
            "https://127.0.0.1:1/x",
        ] {
            let req = format!("GET {target} HTTP/1.1\r\nHost: example.com\r\n\r\n");
            let reply = raw_exchange(pacer.proxy_addr, req.as_bytes(), false, QUIET).await;
            assert_eq!(
                reply.status(),
                Some(400),
                "{target}: {}",
                String::from_utf8_lossy(&reply.bytes)
            );
            let v: serde_json::Value = serde_json::from_slice(reply.body()).expect("JSON body");
            assert_eq!(v["status"], 400);
        }
        assert_eq!(up.count(), 0);
    })
    .await;
}

#[tokio::test]
async fn connect_is_refused_and_not_forwarded() {
    within("CONNECT", async {
        let up = TestUpstream::start().await;
        let pacer = catch_all_pacer(&up).await;
        let req = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
        let reply = raw_exchange(pacer.proxy_addr, req, false, QUIET).await;
        match reply.status() {
            Some(405) => {}
            None => assert!(reply.closed && reply.bytes.is_empty(), "{reply:?}"),
            Some(s) => panic!(
                "CONNECT answered {s}: {}",
                String::from_utf8_lossy(&reply.bytes)
            ),
        }
        assert_eq!(up.count(), 0);
    })
    .await;
}

#[tokio::test]
async fn path_variants_reach_upstream_normalized() {
    within("path normalization", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "", "").await;
        let variants = [
            ("/api/../api/v2/x", "/api/v2/x"),
            ("//api/v2/x", "/api/v2/x"),
            ("/api/./v2//x", "/api/v2/x"),
            ("/api/v2/%78", "/api/v2/x"),
            ("//api/v2/x?a=1&b=%2F", "/api/v2/x?a=1&b=%2F"),
        ];
        for (i, (sent, expected)) in variants.iter().enumerate() {
            let req = format!("GET {sent} HTTP/1.1\r\nHost: pacer.test\r\n\r\n");
            let reply = raw_exchange(pacer.proxy_addr, req.as_bytes(), false, QUIET).await;
            assert_eq!(
                reply.status(),
                Some(200),
                "{sent}: {}",
                String::from_utf8_lossy(&reply.bytes)
            );
            assert_eq!(up.count(), i + 1);
            assert_eq!(up.records().pop().unwrap().uri, *expected, "{sent}");
        }

        for bad in ["/api/v2%2Fx", "/api/v2/%2f..%2fx", "/api/%5cx", "/api/%zz"] {
            let req = format!("GET {bad} HTTP/1.1\r\nHost: pacer.test\r\n\r\n");
            let reply = raw_exchange(pacer.proxy_addr, req.as_bytes(), false, QUIET).await;
            assert_eq!(
                reply.status(),
                Some(400),
                "{bad}: {}",
                String::from_utf8_lossy(&reply.bytes)
            );
        }
        assert_eq!(up.count(), variants.len());
    })
    .await;
}

#[tokio::test]
async fn in_flight_request_completes_during_shutdown() {
    let _slot = slot(Load::Timed).await;
    within("graceful shutdown", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "shutdown_grace = \"10s\"", "").await;
        let addr = pacer.proxy_addr;
        let client = TestClient::http1(addr);

        let slow = tokio::spawn(async move {
            let req = client
                .request(Method::POST, "/api/slow")
                .header("x-reply-delay-ms", "800")
                .body(full("in flight"))
                .unwrap();
            client.send(req).await
        });
        // The request is at the upstream: now shut down.
        up.wait_for(1).await;
        let started = Instant::now();
        let shutdown = tokio::spawn(pacer.shutdown());

        let reply = slow.await.expect("client task");
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (StatusCode::OK, "in flight")
        );
        shutdown.await.expect("shutdown task");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "shutdown took {:?}",
            started.elapsed()
        );

        // Nothing new is accepted afterwards.
        let after = TestClient::http1(addr);
        let req = after
            .request(Method::GET, "/api/late")
            .body(empty())
            .unwrap();
        let late = tokio::time::timeout(Duration::from_secs(3), async {
            match after.send_streaming_result(req).await {
                Ok(resp) => Some(resp.status()),
                Err(_) => None,
            }
        })
        .await
        .expect("late request settles");
        assert!(
            late.is_none() || late == Some(StatusCode::SERVICE_UNAVAILABLE),
            "{late:?}"
        );
        assert_eq!(up.count(), 1);
    })
    .await;
}

#[tokio::test]
async fn draining_answers_503_with_retry_after() {
    let _slot = slot(Load::Timed).await;
    within("draining", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "", "").await;
        let client = TestClient::http1(pacer.proxy_addr);
        assert_eq!(client.get("/api/before", &[]).await.status, StatusCode::OK);

        pacer.proxy().start_draining();
        let reply = client.get("/api/during", &[]).await;
        reply.assert_pacer_error(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(up.count(), 1);
    })
    .await;
}

#[tokio::test]
async fn garbage_on_the_socket_does_not_break_the_listener() {
    within("garbage", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up, "", "").await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x9ac3);
        let random: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
        let huge_line = format!("GET /api/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
        let garbage: Vec<(&str, Vec<u8>)> = vec![
            ("random bytes", random),
            ("invalid request line", b"HELLO WORLD\r\n\r\n".to_vec()),
            ("bad version", b"GET /api/x HTTP/9.9\r\nHost: x\r\n\r\n".to_vec()),
            ("no target", b"GET\r\n\r\n".to_vec()),
            ("huge request line", huge_line.into_bytes()),
            ("NUL in header", b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n".to_vec()),
            ("space before colon", b"GET /api/x HTTP/1.1\r\nHost : x\r\n\r\n".to_vec()),
            ("two content-lengths", b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec()),
        ];
        let client = TestClient::http1(pacer.proxy_addr);
        for (what, bytes) in &garbage {
            let reply = raw_exchange(pacer.proxy_addr, bytes, true, QUIET).await;
            match reply.status() {
                Some(s) => assert!((400..500).contains(&s), "{what}: answered {s}"),
                None => assert!(reply.closed, "{what}: neither answered nor closed: {reply:?}"),
            }
            let ok = client.get("/api/after", &[]).await;
            assert_eq!(ok.status, StatusCode::OK, "{what}: the next request failed");
        }
        assert_eq!(up.count(), garbage.len(), "{:#?}", up.records());

        // Content-Length with chunked framing: RFC 9112 allows refusing it or going by the
        // chunked framing alone (then closing); forwarded, it must be re-framed, so the
        // upstream never sees the conflicting Content-Length.
        let smuggle = b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
            Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
        let reply = raw_exchange(pacer.proxy_addr, smuggle, false, QUIET).await;
        match reply.status() {
            Some(200) => assert_eq!(reply.header("connection").as_deref(), Some("close"), "{reply:?}"),
            Some(s) => assert!((400..500).contains(&s), "CL+TE answered {s}"),
            None => assert!(reply.closed, "CL+TE: neither answered nor closed"),
        }
        for r in up.records().iter().skip(garbage.len()) {
            assert_eq!((r.uri.as_str(), r.body_len), ("/api/x", 0), "{r:?}");
            // Re-framed by the body read: its real length, never the conflicting one.
            assert_eq!(r.header_all("content-length"), ["0"], "{r:?}");
            assert!(r.header("transfer-encoding").is_none(), "{r:?}");
        }
        assert!(up.records().iter().all(|r| r.uri != "/api/smuggled"));
    })
    .await;
}

/// A request whose connection could not be made never reached the upstream: an idempotent
/// one without a body is tried again (within the timeout and a budget); others get 502.
#[tokio::test]
async fn failed_connections_are_retried_for_idempotent_requests_only() {
    let _slot = slot(Load::Timed).await;
    within("connect retry", async {
        let (dead, socket) = reserved_addr();
        let pacer = start_pacer(&one_route_config(
            "",
            &format!("http://{dead}"),
            "timeout = \"3s\"",
        ))
        .await;
        let client = TestClient::http1(pacer.proxy_addr);
        // The upstream comes up 20 ms from now, while both requests below fail to connect.
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            tokio::time::sleep(Duration::from_millis(20)).await;
            let listener = socket.listen(64).unwrap();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            }
        });
        let post = client
            .request(Method::POST, "/api/x")
            .body(full("payload"))
            .unwrap();
        client
            .send(post)
            .await
            .assert_pacer_error(StatusCode::BAD_GATEWAY);
        let reply = client.get("/api/x", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        server.abort();
        pacer.shutdown().await;
    })
    .await;
}
