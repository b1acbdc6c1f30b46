//! Request smuggling and broken bodies, over raw sockets: for every ambiguous or broken
//! framing, the upstream sees exactly one well-formed request (checked byte for byte by a
//! raw recording upstream) or nothing whole, and the client gets one normal answer or a
//! 400 and a closed connection — never two requests upstream from one payload.

mod common;

use common::*;
use http::StatusCode;
use std::time::Duration;

/// Quiet time after which a raw exchange stops waiting for more bytes.
const QUIET: Duration = Duration::from_secs(2);

/// Time given to anything still on its way to the upstream before counting.
const SETTLE: Duration = Duration::from_millis(300);

/// How the forwarded request must be framed.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(usize),
    Chunked,
}

/// What must come of one payload.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Exactly one request reaches the upstream with this framing, framed body and body,
    /// and the client gets exactly one 200.
    Forwarded {
        framing: Framing,
        framed: &'static [u8],
        body: &'static [u8],
    },
    /// Nothing whole reaches the upstream; the client gets a 400 and the connection is
    /// closed.
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
    use Framing::*;
    vec![
        Case {
            name: "cl-te",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
            // Chunked framing wins, the Content-Length is dropped, the stray `G` never
            // becomes a request: the connection is closed after the answer.
            expect: Forwarded { framing: Chunked, framed: b"0\r\n\r\n", body: b"" },
            eof: false,
        },
        Case {
            name: "te-cl",
            method: "POST",
            payload: "POST {P} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
            expect: Forwarded {
                framing: Chunked,
                framed: b"8\r\nSMUGGLED\r\n0\r\n\r\n",
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
            expect: Forwarded { framing: Length(5), framed: b"hello", body: b"hello" },
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
                framing: Chunked,
                framed: b"5\r\nhello\r\n0\r\n\r\n",
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
                framing: Chunked,
                framed: b"5\r\nhello\r\n0\r\n\r\n",
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
                framing: Chunked,
                framed: b"5\r\nhello\r\n0\r\n\r\n",
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
            expect: Forwarded { framing: Length(5), framed: b"hello", body: b"hello" },
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
                framing: Length(39),
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
                framing: Chunked,
                framed: b"27\r\nGET /api/smuggled HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n",
                body: HIDDEN.as_bytes(),
            },
            eof: false,
        },
        // Broken bodies: the upstream request is aborted, never completed as if whole.
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
            framing,
            framed,
            body,
        } => {
            assert_eq!(statuses, [200], "{}: {}", case.name, show(&reply.bytes));
            assert!(reply.bytes.ends_with(b"\r\n\r\nok"), "{}", case.name);
            assert_eq!(mine.len(), 1, "{}: {mine:#?}", case.name);
            let r = mine[0];
            assert!(r.complete, "{}: {r:?}", case.name);
            assert_eq!(r.line, line, "{}", case.name);
            match framing {
                Framing::Length(n) => {
                    assert_eq!(
                        r.header_all("content-length"),
                        [n.to_string().as_str()],
                        "{}: {r:?}",
                        case.name
                    );
                    assert!(r.header_all("transfer-encoding").is_empty(), "{r:?}");
                }
                Framing::Chunked => {
                    assert_eq!(r.header_all("transfer-encoding"), ["chunked"], "{r:?}");
                    assert!(r.header_all("content-length").is_empty(), "{r:?}");
                }
            }
            assert_eq!(show(&r.framed_body), show(framed), "{}", case.name);
            assert_eq!(show(&r.body), show(body), "{}", case.name);
            assert_eq!(r.header("x-forwarded-for"), Some("127.0.0.1"), "{r:?}");
            assert_eq!(r.header("host"), Some(upstream.to_string().as_str()));
        }
        Expect::Refused => {
            assert_eq!(statuses, [400], "{}: {}", case.name, show(&reply.bytes));
            assert!(reply.closed, "{}: connection left open", case.name);
            assert!(
                mine.iter().all(|r| !r.complete),
                "{}: a whole request reached the upstream: {mine:#?}",
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

/// A broken body aborts the upstream request: the upstream sees it cut short on a
/// connection that is then closed, never reused, and the reservation is returned.
#[tokio::test]
async fn broken_body_aborts_upstream_request_and_frees_its_slot() {
    within("broken body", async {
        let up = RawUpstream::start(RawMode::Ok).await;
        let pacer = pacer_for(&up).await;
        let client = TestClient::http1(pacer.proxy_addr);
        assert_eq!(client.get("/api/warm", &[]).await.status, StatusCode::OK);

        // The client announces 64 bytes, sends 5 and closes: by then the request is on
        // its way upstream (pooled connection 0).
        let mut s = tokio::net::TcpStream::connect(pacer.proxy_addr)
            .await
            .expect("connect");
        use tokio::io::AsyncWriteExt;
        s.write_all(b"POST /api/cut HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\n\r\nhello")
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
        assert_eq!(cut.header("content-length"), Some("64"));
        assert_eq!(show(&cut.framed_body), "hello");

        // A second request is admitted at once (its slot came back) and goes on a fresh
        // upstream connection: the aborted one is not reused.
        let started = std::time::Instant::now();
        let reply = client.get("/api/next", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert!(started.elapsed() < Duration::from_millis(900));
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
