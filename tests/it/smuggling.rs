//! Request smuggling and broken bodies, over raw sockets: for every ambiguous or broken
//! framing, the upstream sees exactly one well-formed request (checked byte for byte by a
//! raw recording upstream) or nothing at all, and the client gets one normal answer or a
//! 400 and a closed connection — never two requests upstream from one payload, never part
//! of one. Bodies up to `buffer_body_bytes` are read whole before admission; larger ones
//! stream.

use crate::support::*;
use http::StatusCode;
use std::time::Duration;

/// Quiet time after which a raw exchange stops waiting for more bytes.
const QUIET: Duration = Duration::from_secs(2);

/// Time given to anything still on its way to the upstream before counting.
const SETTLE: Duration = Duration::from_millis(300);

/// What must come of one payload.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Exactly one request reaches the upstream with this framed body and body, framed by
    /// this `Content-Length` whatever framing the client used (bodies this small are read
    /// whole before they are forwarded), and the client gets exactly one 200.
    Forwarded {
        length: usize,
        framed: &'static [u8],
        body: &'static [u8],
    },
    /// Nothing of the request reaches the upstream; the client gets a 400 and the
    /// connection is closed.
    Refused,
}

/// One smuggling attempt: `{P}` in the payload is replaced by the case's own path.
struct Case {
    name: &'static str,
    method: &'static str,
    payload: &'static str,
    expect: Expect,
    /// The client closes its sending side after the payload (the body is cut short).
    /// Otherwise the exchange ends when pacer closes or after [`QUIET`].
    eof: bool,
}

const HIDDEN: &str = "GET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

fn cases() -> Vec<Case> {
    use Expect::*;
    vec![
        Case {
            name: "cl-te",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
            // Chunked framing wins, the Content-Length is dropped (the body read whole goes
            // on with its real length), the stray `G` never becomes a request: the
            // connection is closed after the answer.
            expect: Forwarded { length: 0, framed: b"", body: b"" },
            eof: false,
        },
        Case {
            name: "te-cl",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
            expect: Forwarded {
                length: 8,
                framed: b"SMUGGLED",
                body: b"SMUGGLED",
            },
            eof: false,
        },
        Case {
            name: "cl-cl-differing",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "cl-cl-equal",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            expect: Forwarded { length: 5, framed: b"hello", body: b"hello" },
            eof: false,
        },
        Case {
            name: "cl-list",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "cl-plus",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "te-xchunked",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "te-leading-whitespace",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  \tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            expect: Forwarded {
                length: 5,
                framed: b"hello",
                body: b"hello",
            },
            eof: false,
        },
        Case {
            name: "te-obs-fold",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "te-space-before-colon",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "te-duplicate-chunked",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            expect: Forwarded {
                length: 5,
                framed: b"hello",
                body: b"hello",
            },
            eof: false,
        },
        Case {
            name: "te-chunked-then-identity",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "te-chunked-vt",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\x0b\r\n\r\n0\r\n\r\n",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "te-mixed-case",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: ChUnKeD\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            expect: Forwarded {
                length: 5,
                framed: b"hello",
                body: b"hello",
            },
            eof: false,
        },
        Case {
            name: "te-http10",
            method: "POST",
            payload: "POST {P} HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "bare-lf-head",
            method: "POST",
            payload: "POST {P} HTTP/1.1\nHost: x\nContent-Length: 5\n\nhello",
            expect: Forwarded { length: 5, framed: b"hello", body: b"hello" },
            eof: false,
        },
        Case {
            name: "bare-lf-chunks",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "chunk-extension-lf",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;a=\"x\ny\"\r\nhello\r\n0\r\n\r\n",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "pipelined-in-body",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 39\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
            expect: Forwarded {
                length: 39,
                framed: HIDDEN.as_bytes(),
                body: HIDDEN.as_bytes(),
            },
            eof: false,
        },
        Case {
            name: "pipelined-in-chunk",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n27\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n",
            expect: Forwarded {
                length: 39,
                framed: HIDDEN.as_bytes(),
                body: HIDDEN.as_bytes(),
            },
            eof: false,
        },
        Case {
            name: "chunks-with-extension",
            method: "PUT",
            payload: "PUT {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            expect: Forwarded { length: 11, framed: b"hello world", body: b"hello world" },
            eof: false,
        },
        // Broken bodies: answered by pacer, nothing of them reaches the upstream.
        Case {
            name: "te-cl-truncated",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",
            expect: Refused,
            eof: true,
        },
        Case {
            name: "chunk-size-not-hex",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "truncated-chunked",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            expect: Refused,
            eof: true,
        },
        Case {
            name: "bad-chunk-crlf",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXY0\r\n\r\n",
            expect: Refused,
            eof: false,
        },
        Case {
            name: "content-length-short",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello",
            expect: Refused,
            eof: true,
        },
    ]
}

/// pacer in front of `up` on `/api/`, with one concurrency slot for everything and a
/// short queue wait, so that a leaked reservation shows as a 429.
async fn pacer_for(up: &RawUpstream) -> pacer::app::Running {
    let config = format!(
        "{}\n[[limit]]\nname = \"one-at-a-time\"\nscope = \"global\"\nconcurrency = 1\n\n\
         [queue]\nmax_wait = \"1s\"\n",
        one_route_config("body_idle_timeout = \"1s\"", &up.url(), "")
    );
    start_pacer(&config).await
}

fn path_of(case: &Case) -> String {
    format!("/api/{}", case.name)
}

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks one case against what the client and the upstream saw.
fn check(case: &Case, reply: &RawReply, records: &[RawRecorded], upstream: std::net::SocketAddr) {
    let path = path_of(case);
    let line = format!("{} {path} HTTP/1.1", case.method);
    let mine: Vec<&RawRecorded> = records
        .iter()
        .filter(|r| r.line.split(' ').nth(1) == Some(path.as_str()))
        .collect();
    let statuses = response_statuses(&reply.bytes);
    match case.expect {
        Expect::Forwarded {
            length,
            framed,
            body,
        } => {
            assert_eq!(statuses, [200], "{}: {}", case.name, show(&reply.bytes));
            assert!(reply.bytes.ends_with(b"\r\n\r\nok"), "{}", case.name);
            assert_eq!(mine.len(), 1, "{}: {mine:#?}", case.name);
            let r = mine[0];
            assert!(r.complete, "{}: {r:?}", case.name);
            assert_eq!(r.line, line, "{}", case.name);
            assert_eq!(
                r.header_all("content-length"),
                [length.to_string().as_str()],
                "{}: {r:?}",
                case.name
            );
            assert!(r.header_all("transfer-encoding").is_empty(), "{r:?}");
            assert_eq!(show(&r.framed_body), show(framed), "{}", case.name);
            assert_eq!(show(&r.body), show(body), "{}", case.name);
            assert_eq!(r.header("x-forwarded-for"), Some("127.0.0.1"), "{r:?}");
            assert_eq!(r.header("host"), Some(upstream.to_string().as_str()));
        }
        Expect::Refused => {
            assert_eq!(statuses, [400], "{}: {}", case.name, show(&reply.bytes));
            assert!(reply.closed, "{}: connection left open", case.name);
            assert!(
                mine.is_empty(),
                "{}: the request reached the upstream: {mine:#?}",
                case.name
            );
        }
    }
}

#[tokio::test]
async fn smuggling_table() {
    within("smuggling table", async {
        let up = RawUpstream::start(RawMode::Ok).await;
        let pacer = pacer_for(&up).await;
        let cases = cases();

        // One connection per case, all at once.
        let mut replies = tokio::task::JoinSet::new();
        for (i, case) in cases.iter().enumerate() {
            let payload = case.payload.replace("{P}", &path_of(case));
            let (addr, eof) = (pacer.proxy_addr, case.eof);
            replies.spawn(
                async move { (i, raw_read_all(addr, payload.as_bytes(), eof, QUIET).await) },
            );
        }
        let mut by_case: Vec<Option<RawReply>> = cases.iter().map(|_| None).collect();
        while let Some(r) = replies.join_next().await {
            let (i, reply) = r.expect("exchange task");
            by_case[i] = Some(reply);
        }
        tokio::time::sleep(SETTLE).await;
        let records = up.records();

        let mut failures = Vec::new();
        for (case, reply) in cases.iter().zip(by_case) {
            let reply = reply.expect("every case ran");
            let checked = std::panic::catch_unwind(|| check(case, &reply, &records, up.addr));
            if let Err(e) = checked {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: {why}", case.name));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n---\n"));

        // Nothing hidden in a payload ever became a request of its own.
        let whole: Vec<&RawRecorded> = records.iter().filter(|r| r.complete).collect();
        assert!(
            whole.iter().all(|r| !r.line.contains("smuggled")),
            "{whole:#?}"
        );
        let forwarded = cases
            .iter()
            .filter(|c| matches!(c.expect, Expect::Forwarded { .. }))
            .count();
        assert_eq!(whole.len(), forwarded, "{whole:#?}");

        // pacer still serves, and no concurrency slot leaked: one slot and a 1s queue
        // would shed this with 429 otherwise.
        let client = TestClient::http1(pacer.proxy_addr);
        assert_eq!(client.get("/api/after", &[]).await.status, StatusCode::OK);
    })
    .await;
}

/// Checks a raw reply is pacer's own JSON error with `status`.
fn assert_raw_pacer_error(what: &str, reply: &RawReply, status: u16) {
    assert_eq!(
        reply.status(),
        Some(status),
        "{what}: {}",
        show(&reply.bytes)
    );
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json"),
        "{what}: {}",
        show(&reply.bytes)
    );
    let v: serde_json::Value = serde_json::from_slice(reply.body())
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", show(&reply.bytes)));
    assert_eq!(v["status"], status, "{what}: {v}");
    assert!(v["contextId"].is_string(), "{what}: {v}");
}

/// A body that breaks or never completes is answered by pacer before admission: nothing of
/// it reaches a strict upstream and it takes no quota — with a limit of one request an
/// hour, the same caller's next whole request is still admitted (and the one after shed).
#[tokio::test]
async fn broken_or_unfinished_bodies_reach_nothing_and_take_no_quota() {
    let _slot = slot(Load::Timed).await;
    within("unfinished bodies", async {
        let up = RawUpstream::start(RawMode::Ok).await;
        let config = format!(
            "{}\n[[limit]]\nname = \"one-an-hour\"\nscope = \"client\"\nrequests = 1\nper = \"1h\"\n\n\
             [queue]\nmax_wait = \"1s\"\ncritical_reserve = 0.0\n",
            one_route_config("body_idle_timeout = \"1s\"", &up.url(), "")
        );
        let pacer = start_pacer(&config).await;
        let head = |framing: &str| {
            format!("POST /api/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer caller-1\r\n{framing}\r\n\r\n")
        };
        let body35 = "x".repeat(35);

        // Content-Length 40, 35 bytes, then the client closes its side: answered 400 if
        // the answer can still reach it, else the connection is closed.
        let cut = format!("{}{body35}", head("Content-Length: 40"));
        // Generous quiet times: each exchange ends as soon as its answer is whole or the
        // connection closes.
        let patience = Duration::from_secs(10);
        let reply = raw_exchange(pacer.proxy_addr, cut.as_bytes(), true, patience).await;
        eprintln!(
            "cut short: status {:?}, closed {}",
            reply.status(),
            reply.closed
        );
        match reply.status() {
            Some(_) => assert_raw_pacer_error("cut short", &reply, 400),
            None => assert!(reply.closed, "cut short: {reply:?}"),
        }

        // A bad chunk (no CRLF after its data): 400 at once.
        let bad = format!(
            "{}5\r\nhelloXY0\r\n\r\n",
            head("Transfer-Encoding: chunked")
        );
        let reply = raw_exchange(pacer.proxy_addr, bad.as_bytes(), false, patience).await;
        assert_raw_pacer_error("bad chunk", &reply, 400);

        // Content-Length 40, 35 bytes, then silence: 408 once body_idle_timeout (1s) passes.
        let stalled = format!("{}{body35}", head("Content-Length: 40"));
        let started = std::time::Instant::now();
        let reply = raw_exchange(pacer.proxy_addr, stalled.as_bytes(), false, patience).await;
        let took = started.elapsed();
        assert_raw_pacer_error("stalled", &reply, 408);
        assert!(took >= Duration::from_millis(900), "408 after only {took:?}");
        eprintln!("stalled body answered 408 after {took:?}");

        // Nothing reached the upstream, and the hour's one request is still there.
        tokio::time::sleep(SETTLE).await;
        assert_eq!(up.connections(), 0, "{:#?}", up.records());
        let client = TestClient::http1(pacer.proxy_addr);
        let auth = [("authorization", "Bearer caller-1")];
        let next = client.get("/api/next", &auth).await;
        assert_eq!(next.status, StatusCode::OK, "{}", next.text());
        let over = client.get("/api/over", &auth).await;
        over.assert_pacer_error(StatusCode::TOO_MANY_REQUESTS);
        let records = up.records();
        assert_eq!(records.len(), 1, "{records:#?}");
        assert!(records[0].line.starts_with("GET /api/next "), "{records:#?}");
    })
    .await;
}

/// Bodies above `buffer_body_bytes` stream as they come, whether the size is declared or
/// found while reading: the upstream request starts before the client has sent it all,
/// and the upstream receives every byte.
#[tokio::test]
async fn bodies_above_buffer_body_bytes_stream() {
    use tokio::io::AsyncWriteExt;
    within("large bodies stream", async {
        let first = vec![b'a'; 2000];
        let rest = vec![b'b'; 3000];
        let chunk = |data: &[u8]| {
            let mut c = format!("{:x}\r\n", data.len()).into_bytes();
            c.extend_from_slice(data);
            c.extend_from_slice(b"\r\n");
            c
        };
        // Found larger while reading (chunked), and declared larger (Content-Length).
        for framing in ["Transfer-Encoding: chunked", "Content-Length: 5000"] {
            let up = RawUpstream::start(RawMode::Ok).await;
            let pacer = start_pacer(&one_route_config(
                "buffer_body_bytes = 1024\nbody_idle_timeout = \"10s\"",
                &up.url(),
                "",
            ))
            .await;
            let chunked = framing.starts_with("Transfer");
            let frame = |data: &[u8]| if chunked { chunk(data) } else { data.to_vec() };
            let mut s = tokio::net::TcpStream::connect(pacer.proxy_addr)
                .await
                .expect("connect");
            let mut payload =
                format!("POST /api/big HTTP/1.1\r\nHost: x\r\n{framing}\r\n\r\n").into_bytes();
            payload.extend_from_slice(&frame(&first));
            s.write_all(&payload).await.expect("write head");
            // More than the limit has been sent: the request goes upstream without the rest.
            let mut waited = Duration::ZERO;
            while up.connections() == 0 {
                assert!(
                    waited < Duration::from_secs(10),
                    "{framing}: upstream not reached before the body ended"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
                waited += Duration::from_millis(20);
            }
            assert_eq!(up.count(), 0, "{framing}: recorded before the body ended");
            let mut tail = frame(&rest);
            if chunked {
                tail.extend_from_slice(b"0\r\n\r\n");
            }
            s.write_all(&tail).await.expect("write rest");
            let reply = raw_read_one(&mut s).await;
            assert_eq!(
                response_statuses(&reply),
                [200],
                "{framing}: {}",
                show(&reply)
            );
            up.wait_for(1).await;
            let records = up.records();
            assert_eq!(records.len(), 1, "{framing}: {records:#?}");
            let r = &records[0];
            assert!(r.complete, "{framing}: {r:?}");
            assert!(r.line.starts_with("POST /api/big "), "{r:?}");
            assert_eq!(r.body.len(), 5000, "{framing}");
            assert!(r.body[..2000].iter().all(|b| *b == b'a'), "{framing}");
            assert!(r.body[2000..].iter().all(|b| *b == b'b'), "{framing}");
            if chunked {
                assert_eq!(r.header_all("transfer-encoding"), ["chunked"], "{r:?}");
            } else {
                assert_eq!(r.header_all("content-length"), ["5000"], "{r:?}");
            }
        }
    })
    .await;
}

/// Reads from `s` until a whole [`RAW_OK`] answer has come through, the peer closes, or
/// 10 s pass without data.
async fn raw_read_one(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\r\n\r\nok") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    got
}

/// A broken body above `buffer_body_bytes` (streamed, so already on its way) aborts the
/// upstream request: the upstream sees it cut short on a connection that is then closed,
/// never reused, and the reservation is returned.
#[tokio::test]
async fn broken_streamed_body_aborts_upstream_request_and_frees_its_slot() {
    let _slot = slot(Load::Timed).await;
    within("broken streamed body", async {
        let up = RawUpstream::start(RawMode::Ok).await;
        let pacer = pacer_for(&up).await;
        let client = TestClient::http1(pacer.proxy_addr);
        assert_eq!(client.get("/api/warm", &[]).await.status, StatusCode::OK);

        // The client announces more than buffer_body_bytes (64 KiB), sends 5 bytes and
        // closes: by then the request is on its way upstream (pooled connection 0).
        let mut s = tokio::net::TcpStream::connect(pacer.proxy_addr)
            .await
            .expect("connect");
        use tokio::io::AsyncWriteExt;
        s.write_all(b"POST /api/cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nhello")
            .await
            .expect("write");
        up.wait_for(2).await;
        drop(s);
        tokio::time::sleep(SETTLE).await;

        let records = up.records();
        let cut = records
            .iter()
            .find(|r| r.line.starts_with("POST /api/cut "))
            .expect("the cut request reached the upstream");
        assert!(!cut.complete, "{cut:?}");
        assert_eq!(cut.header("content-length"), Some("100000"));
        assert_eq!(show(&cut.framed_body), "hello");
        // A second request is admitted (its slot came back: with `concurrency = 1` and
        // `max_wait = 1s` a slot still held would shed it) and goes on a fresh upstream
        // connection: the aborted one is not reused.
        let reply = client.get("/api/next", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let next = up
            .records()
            .into_iter()
            .find(|r| r.line.starts_with("GET /api/next "))
            .expect("next request");
        assert!(next.complete);
        assert_ne!(next.conn, cut.conn, "aborted upstream connection reused");
    })
    .await;
}
