//! HTTP/2 abuse over h2c prior knowledge: rapid reset, CONTINUATION floods, framing that
//! disagrees with `content-length`, connection-specific fields and CR/LF in values.
//!
//! Each case ends with the upstream having seen at most well-formed, complete requests
//! (or none), the attacker getting a stream or connection error (or pacer's 4xx), and a
//! normal request on a fresh connection still being served. The `h2` crate drives what a
//! client may legally send; what it refuses to send is written as raw frames.

use crate::support::*;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// pacer in front of `up` on `/api/`, with a concurrency cap so that rapid-reset streams
/// also wait in (and must leave) the admission queue.
async fn pacer_for(up: &TestUpstream) -> pacer::app::Running {
    start_pacer(&format!(
        "{}\n[[limit]]\nname = \"per-client\"\nupstream = \"up\"\nscope = \"client\"\n\
         requests = 1000000\nper = \"60s\"\n\n\
         [[limit]]\nname = \"in-flight\"\nupstream = \"up\"\nscope = \"global\"\nconcurrency = 4\n",
        one_route_config("", &up.url(), "")
    ))
    .await
}

/// A plain GET on a fresh h2c connection is answered 200 by the upstream.
async fn fresh_h2_request_works(pacer: &pacer::app::Running, what: &str) {
    let client = TestClient::h2c(pacer.proxy_addr);
    let r = client.get("/api/v2/after", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "after {what}: {}", r.text());
    assert_eq!(r.version, http::Version::HTTP_2);
}

/// An `h2` client connection to `addr`, its driver spawned.
async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = h2::client::Builder::new()
        // Locally reset streams are forgotten quickly; the attacker does not care.
        .max_concurrent_reset_streams(100_000)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

fn status_json(reply: &Reply) -> serde_json::Value {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

/// Writes HEADERS (+END_STREAM) and RST_STREAM(CANCEL) for `batch` new streams on `raw`,
/// the resets after `pause` (zero: in the same write). Returns how many pairs were written,
/// or `None` once pacer has closed the connection.
async fn reset_batch(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    next_id: &mut u32,
    batch: usize,
    pause: Duration,
) -> Option<usize> {
    let first = *next_id;
    let mut heads = Vec::new();
    let mut resets = Vec::new();
    for i in 0..batch as u32 {
        let id = first + 2 * i;
        let block = request_block(
            &format!("/api/v2/reset/{id}"),
            &[(b"x-reply-delay-ms", b"200")],
        );
        heads.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        resets.extend(frame(RST_STREAM, 0, id, &0x8u32.to_be_bytes()));
    }
    *next_id = first + 2 * batch as u32;
    if pause.is_zero() {
        heads.extend(resets);
        wr.write_all(&heads).await.ok()?;
    } else {
        wr.write_all(&heads).await.ok()?;
        tokio::time::sleep(pause).await;
        wr.write_all(&resets).await.ok()?;
    }
    Some(batch)
}

/// Runs `pairs` HEADERS+RST_STREAM pairs in batches, reconnecting whenever pacer ends the
/// connection. Returns (pairs written, connections used, GOAWAY codes seen).
async fn rapid_reset(
    addr: SocketAddr,
    pairs: usize,
    batch: usize,
    pause: Duration,
) -> (usize, usize, Vec<u32>) {
    let (mut sent, mut connections) = (0, 0);
    let goaways = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    while sent < pairs && connections < 500 {
        connections += 1;
        let raw = Raw::connect(addr).await;
        let (mut rd, mut wr) = raw.stream.into_split();
        // Drain what pacer sends (responses, GOAWAY) so it never blocks on us.
        let reader = {
            let goaways = goaways.clone();
            let mut buf = raw.buf;
            tokio::spawn(async move {
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    while buf.len() >= 9 {
                        let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                        if buf.len() < 9 + len {
                            break;
                        }
                        if buf[3] == GOAWAY {
                            let code = buf
                                .get(13..17)
                                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                            goaways.lock().expect("goaways").push(code);
                        }
                        buf.drain(..9 + len);
                    }
                    match rd.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
        };
        let mut next_id = 1u32;
        while sent < pairs {
            match reset_batch(&mut wr, &mut next_id, batch.min(pairs - sent), pause).await {
                Some(n) => sent += n,
                None => break,
            }
            if reader.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(wr);
        let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    }
    let codes = goaways.lock().expect("goaways").clone();
    (sent, connections, codes)
}

#[tokio::test]
async fn rapid_reset_is_bounded_and_others_are_served() {
    let _slot = slot(Load::Alone).await;
    within("rapid reset", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up).await;
        let admin = TestClient::http1(pacer.admin_addr.expect("admin"));
        let rss_before = vm_rss_bytes().unwrap_or(0);

        // A well-behaved client on its own connection, throughout the attack.
        let bystander = {
            let addr = pacer.proxy_addr;
            tokio::spawn(async move {
                let client = TestClient::h2c(addr);
                let mut served = 0;
                for i in 0..40 {
                    let r = client.get(&format!("/api/v2/bystander/{i}"), &[]).await;
                    assert_eq!(r.status, StatusCode::OK, "bystander: {}", r.text());
                    served += 1;
                }
                served
            })
        };

        let started = Instant::now();
        // Resets in the same write as their HEADERS: streams die before pacer accepts them.
        let (fast, fast_conns, mut codes) =
            rapid_reset(pacer.proxy_addr, 5_000, 100, Duration::ZERO).await;
        // Resets after the streams reached admission: they wait in the queue (concurrency 4)
        // or are in flight upstream when cancelled.
        let (slow, slow_conns, slow_codes) =
            rapid_reset(pacer.proxy_addr, 400, 20, Duration::from_millis(20)).await;
        codes.extend(slow_codes);
        let attack = started.elapsed();
        let sent = fast + slow;
        assert_eq!(bystander.await.expect("bystander task"), 40);

        // Admission state drains back: nothing waits, nothing is left in flight.
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            let s = status_json(&admin.get("/status", &[]).await);
            let queue = &s["queue"];
            let idle = ["critical", "normal", "bulk"].iter().all(|p| queue[p] == 0)
                && s["limits"]
                    .as_array()
                    .is_some_and(|l| l.iter().all(|u| u["inflight"].as_u64().unwrap_or(0) == 0));
            if idle || Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for p in ["critical", "normal", "bulk"] {
            assert_eq!(status["queue"][p], 0, "queue {p} not drained: {status}");
        }
        for l in status["limits"].as_array().expect("limits") {
            assert_eq!(l["inflight"], 0, "in flight after the attack: {status}");
        }
        let keys = status["limiter_keys"].as_u64().expect("limiter_keys");
        assert!(keys <= 8, "limiter keys grew: {status}");

        let upstream_saw = up
            .records()
            .iter()
            .filter(|r| r.uri.starts_with("/api/v2/reset/"))
            .count();
        let rss_after = vm_rss_bytes().unwrap_or(0);
        eprintln!(
            "rapid reset: {fast} HEADERS+RST_STREAM pairs on {fast_conns} connections, then \
             {slow} delayed resets on {slow_conns} connections, in {attack:?}; GOAWAY codes \
             {codes:?}; upstream saw {upstream_saw}; limiter keys {keys}; RSS {} -> {} MiB",
            rss_before >> 20,
            rss_after >> 20
        );
        assert_eq!(sent, 5_400, "the attack did not run to its end");
        // Only streams admitted before their reset may have gone upstream, and the
        // concurrency cap (4) keeps that to a trickle.
        assert!(
            upstream_saw * 10 <= sent,
            "upstream saw {upstream_saw} of {sent} reset requests"
        );
        assert!(
            rss_after.saturating_sub(rss_before) < 64 << 20,
            "RSS grew from {rss_before} to {rss_after}"
        );
        fresh_h2_request_works(&pacer, "rapid reset").await;
    })
    .await;
}

#[tokio::test]
async fn content_length_disagreeing_with_data_never_reaches_upstream() {
    within("content-length mismatch", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up).await;
        // (declared, sent): too little and too much data.
        for (declared, actual) in [(10usize, 5usize), (3, 10), (0, 4)] {
            let mut send = h2_connect(pacer.proxy_addr).await;
            send = send.ready().await.expect("ready");
            let req = Request::builder()
                .method(Method::POST)
                .uri(format!(
                    "http://{}/api/v2/cl/{declared}-{actual}",
                    pacer.proxy_addr
                ))
                .header("content-length", declared.to_string())
                .body(())
                .expect("request");
            let (response, mut stream) = send.send_request(req, false).expect("send headers");
            // Half the data first, so a streaming proxy has started forwarding.
            let half = actual / 2;
            let _ = stream.send_data(Bytes::from(vec![b'x'; half]), false);
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = stream.send_data(Bytes::from(vec![b'y'; actual - half]), true);
            let outcome = tokio::time::timeout(Duration::from_secs(5), response).await;
            eprintln!("content-length {declared}, {actual} bytes sent: {outcome:?}");
            match outcome {
                Ok(Err(e)) => assert!(
                    e.is_reset() || e.is_go_away() || e.is_io(),
                    "{declared}/{actual}: unexpected error {e:?}"
                ),
                Ok(Ok(resp)) => assert!(
                    resp.status().is_client_error() || resp.status().is_server_error(),
                    "{declared}/{actual}: answered {}",
                    resp.status()
                ),
                Err(_) => panic!("{declared}/{actual}: no answer and no reset within 5s"),
            }
            // Give a forwarded request time to arrive, then look at what the upstream got.
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Bodies this small are read whole before forwarding: nothing of a broken one
            // reaches the upstream.
            let path = format!("/api/v2/cl/{declared}-{actual}");
            let reached: Vec<_> = up.records().into_iter().filter(|r| r.uri == path).collect();
            assert!(
                reached.is_empty(),
                "{declared}/{actual}: reached the upstream: {reached:?}"
            );
            fresh_h2_request_works(&pacer, "content-length mismatch").await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// raw frames, for what the `h2` crate refuses to send

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), prefix bits of `first` kept.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// One field as "literal without indexing, new name", no Huffman: any bytes go through.
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

fn request_block(path: &str, extra: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    hpack_literal(&mut b, b":method", b"GET");
    hpack_literal(&mut b, b":scheme", b"http");
    hpack_literal(&mut b, b":path", path.as_bytes());
    hpack_literal(&mut b, b":authority", b"pacer.test");
    for (n, v) in extra {
        hpack_literal(&mut b, n, v);
    }
    b
}

/// What came back for stream 1 on a raw connection.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// A response HEADERS frame; the status when it is one of HPACK's static entries.
    Response(Option<u16>),
    /// The connection closed without either.
    Closed,
    /// Nothing within the wait.
    Silent,
}

/// A raw h2c connection past the SETTINGS exchange.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        stream.write_all(&hello).await.expect("preface");
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
        };
        // Wait for the server's SETTINGS, then acknowledge it.
        loop {
            match raw.next_frame(Duration::from_secs(5)).await {
                Some((SETTINGS, flags, _, _)) if flags & ACK == 0 => break,
                Some(_) => continue,
                None => panic!("no SETTINGS from pacer"),
            }
        }
        raw.stream
            .write_all(&frame(SETTINGS, ACK, 0, &[]))
            .await
            .expect("settings ack");
        raw
    }

    /// The next frame (type, flags, stream, payload), or `None` on close or silence.
    async fn next_frame(&mut self, wait: Duration) -> Option<(u8, u8, u32, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let kind = self.buf[3];
                    let flags = self.buf[4];
                    let stream =
                        u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                            & 0x7fff_ffff;
                    let payload = self.buf[9..9 + len].to_vec();
                    self.buf.drain(..9 + len);
                    return Some((kind, flags, stream, payload));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until stream 1 is answered, reset, the connection goes away, or `wait` passes.
    async fn outcome(&mut self, wait: Duration) -> Outcome {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some((kind, _, stream, payload)) = self.next_frame(left).await else {
                return if tokio::time::Instant::now() >= deadline {
                    Outcome::Silent
                } else {
                    Outcome::Closed
                };
            };
            let code = |at: usize| {
                payload
                    .get(at..at + 4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            };
            match kind {
                RST_STREAM if stream == 1 => return Outcome::Reset(code(0)),
                GOAWAY => return Outcome::GoAway(code(4)),
                HEADERS if stream == 1 => {
                    // Indexed static entries 8..=14 are :status 200 204 206 304 400 404 500.
                    let status = payload.first().and_then(|b| match b & 0x7f {
                        8 => Some(200),
                        9 => Some(204),
                        10 => Some(206),
                        11 => Some(304),
                        12 => Some(400),
                        13 => Some(404),
                        14 => Some(500),
                        _ => None,
                    });
                    return Outcome::Response(status.filter(|_| payload[0] & 0x80 != 0));
                }
                _ => {}
            }
        }
    }
}

/// Sends one request with `extra` fields as raw HPACK and returns what came back.
async fn raw_request(addr: SocketAddr, path: &str, extra: &[(&[u8], &[u8])]) -> Outcome {
    let mut raw = Raw::connect(addr).await;
    let block = request_block(path, extra);
    raw.stream
        .write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
        .await
        .expect("headers");
    raw.outcome(Duration::from_secs(5)).await
}

/// A stream error or a connection error: the request was refused as malformed.
fn is_refused(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::Reset(_) | Outcome::GoAway(_) | Outcome::Closed | Outcome::Response(Some(400))
    )
}

#[tokio::test]
async fn connection_specific_fields_are_malformed_and_not_forwarded() {
    within("connection-specific fields", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up).await;
        // A raw request without abuse is served: the frame writer itself is sound.
        let ok = raw_request(pacer.proxy_addr, "/api/v2/raw-ok", &[]).await;
        assert_eq!(ok, Outcome::Response(Some(200)));
        assert_eq!(up.count(), 1);

        type Fields<'a> = &'a [(&'a [u8], &'a [u8])];
        let cases: &[(&str, Fields)] = &[
            ("connection", &[(b"connection", b"keep-alive")]),
            ("transfer-encoding", &[(b"transfer-encoding", b"chunked")]),
            ("keep-alive", &[(b"keep-alive", b"timeout=5")]),
            ("upgrade", &[(b"upgrade", b"websocket")]),
            ("te", &[(b"te", b"gzip")]),
            ("uppercase name", &[(b"X-Upper", b"1")]),
        ];
        for (what, fields) in cases {
            let o = raw_request(pacer.proxy_addr, &format!("/api/v2/conn/{what}"), fields).await;
            eprintln!("{what}: {o:?}");
            assert!(is_refused(&o), "{what}: {o:?}");
            fresh_h2_request_works(&pacer, what).await;
        }
        let forwarded: Vec<_> = up
            .records()
            .into_iter()
            .filter(|r| r.uri.starts_with("/api/v2/conn/"))
            .collect();
        assert!(forwarded.is_empty(), "forwarded: {forwarded:#?}");
    })
    .await;
}

#[tokio::test]
async fn cr_lf_and_nul_in_field_values_are_rejected() {
    within("CR/LF in values", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up).await;
        let cases: &[(&str, &[u8])] = &[
            ("crlf", b"a\r\nx-injected: 1"),
            ("lf", b"a\nx-injected: 1"),
            ("cr", b"a\rb"),
            ("nul", b"a\0b"),
        ];
        for (what, value) in cases {
            let o = raw_request(
                pacer.proxy_addr,
                &format!("/api/v2/crlf/{what}"),
                &[(b"x-custom", value)],
            )
            .await;
            eprintln!("{what} in a field value: {o:?}");
            assert!(is_refused(&o), "{what}: {o:?}");
            // CR/LF in the path and in the authority, too.
            let mut raw = Raw::connect(pacer.proxy_addr).await;
            let mut block = Vec::new();
            hpack_literal(&mut block, b":method", b"GET");
            hpack_literal(&mut block, b":scheme", b"http");
            hpack_literal(
                &mut block,
                b":path",
                &[b"/api/v2/crlf-path/".as_slice(), value].concat(),
            );
            hpack_literal(
                &mut block,
                b":authority",
                &[b"pacer.test".as_slice(), value].concat(),
            );
            raw.stream
                .write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
                .await
                .expect("headers");
            let o = raw.outcome(Duration::from_secs(5)).await;
            eprintln!("{what} in :path and :authority: {o:?}");
            assert!(is_refused(&o), "{what} in path: {o:?}");
            fresh_h2_request_works(&pacer, what).await;
        }
        let forwarded: Vec<_> = up
            .records()
            .into_iter()
            .filter(|r| r.uri.contains("crlf") || r.headers.contains_key("x-injected"))
            .collect();
        assert!(forwarded.is_empty(), "forwarded: {forwarded:#?}");
    })
    .await;
}

#[tokio::test]
async fn continuation_flood_errors_out_in_bounded_memory() {
    let _slot = slot(Load::Alone).await;
    // Far above any header limit: 4096 CONTINUATION frames of 16 KiB (64 MiB of header block).
    const FRAMES: usize = 4096;
    within("CONTINUATION flood", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up).await;
        let rss_before = vm_rss_bytes().unwrap_or(0);
        let peak = std::sync::Arc::new(Peak::default());

        let mut raw = Raw::connect(pacer.proxy_addr).await;
        let first = request_block("/api/v2/flood", &[]);
        raw.stream
            .write_all(&frame(HEADERS, 0, 1, &first))
            .await
            .expect("headers");
        // Each CONTINUATION carries fresh literal fields; END_HEADERS never comes.
        let value = vec![b'v'; 16 * 1024 - 64];
        let (mut rd, mut wr) = raw.stream.into_split();
        let writer = {
            let peak = peak.clone();
            tokio::spawn(async move {
                let mut written = 0usize;
                for i in 0..FRAMES {
                    let mut block = Vec::new();
                    hpack_literal(&mut block, format!("x-flood-{i}").as_bytes(), &value);
                    let f = frame(CONTINUATION, 0, 1, &block);
                    match tokio::time::timeout(Duration::from_secs(2), wr.write_all(&f)).await {
                        Ok(Ok(())) => written += 1,
                        // Closed by pacer, or pacer stopped reading.
                        _ => break,
                    }
                    if i % 64 == 0 {
                        peak.sample_rss();
                    }
                }
                written
            })
        };
        // pacer must end the connection (GOAWAY and/or close) long before the flood ends.
        let mut buf = raw.buf;
        let mut outcome = Outcome::Silent;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let mut chunk = vec![0u8; 64 * 1024];
        while outcome == Outcome::Silent {
            match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
                Err(_) => break,
                Ok(Ok(0)) | Ok(Err(_)) => outcome = Outcome::Closed,
                Ok(Ok(n)) => {
                    buf.extend_from_slice(&chunk[..n]);
                    while buf.len() >= 9 {
                        let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                        if buf.len() < 9 + len {
                            break;
                        }
                        let kind = buf[3];
                        let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
                        if kind == GOAWAY {
                            let code = buf
                                .get(13..17)
                                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                            outcome = Outcome::GoAway(code);
                        } else if kind == RST_STREAM && stream == 1 {
                            outcome = Outcome::Reset(0);
                        } else if kind == HEADERS && stream == 1 {
                            outcome = Outcome::Response(None);
                        }
                        buf.drain(..9 + len);
                    }
                }
            }
            peak.sample_rss();
        }
        let written = writer.await.expect("writer");
        peak.sample_rss();
        let rss_peak = peak.get().max(rss_before);
        eprintln!(
            "CONTINUATION flood: {written} of {FRAMES} frames written, outcome {outcome:?}, \
             RSS {} -> peak {} MiB",
            rss_before >> 20,
            rss_peak >> 20
        );
        assert!(
            matches!(
                outcome,
                Outcome::GoAway(_) | Outcome::Closed | Outcome::Reset(_)
            ) || {
                // A 431 answer is fine too, as long as the flood was cut off.
                matches!(outcome, Outcome::Response(_)) && written < FRAMES
            },
            "pacer kept accepting the flood: {outcome:?}, {written} frames"
        );
        assert!(written < FRAMES, "all {FRAMES} frames were accepted");
        assert!(
            rss_peak.saturating_sub(rss_before) < 48 << 20,
            "RSS grew from {rss_before} to {rss_peak} during the flood"
        );
        assert_eq!(up.count(), 0, "{:#?}", up.records());
        fresh_h2_request_works(&pacer, "CONTINUATION flood").await;
    })
    .await;
}

#[tokio::test]
async fn oversized_header_block_in_one_frame_is_refused() {
    within("oversized header block", async {
        let up = TestUpstream::start().await;
        let pacer = pacer_for(&up).await;
        let mut raw = Raw::connect(pacer.proxy_addr).await;
        // 200 fields of 1 KiB (200 KiB, above the 64 KiB header list limit), split over
        // frames of at most the default 16 KiB frame size, END_HEADERS on the last.
        let value = vec![b'h'; 1024];
        let mut block = request_block("/api/v2/oversized", &[]);
        for i in 0..200 {
            hpack_literal(&mut block, format!("x-big-{i}").as_bytes(), &value);
        }
        let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
        let mut bytes = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let end_headers = if i + 1 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            let (kind, flags) = if i == 0 {
                (HEADERS, END_STREAM | end_headers)
            } else {
                (CONTINUATION, end_headers)
            };
            bytes.extend(frame(kind, flags, 1, c));
        }
        let _ = raw.stream.write_all(&bytes).await;
        let o = raw.outcome(Duration::from_secs(5)).await;
        eprintln!("oversized header block: {o:?}");
        assert!(
            matches!(
                o,
                Outcome::Reset(_) | Outcome::GoAway(_) | Outcome::Closed | Outcome::Response(_)
            ),
            "{o:?}"
        );
        if let Outcome::Response(Some(s)) = o {
            assert!(s >= 400, "oversized header block answered {s}");
        }
        assert_eq!(up.count(), 0, "{:#?}", up.records());
        fresh_h2_request_works(&pacer, "oversized header block").await;
    })
    .await;
}

#[test]
fn hpack_integers_follow_rfc_7541() {
    let mut out = Vec::new();
    hpack_int(&mut out, 0, 5, 10);
    assert_eq!(out, [10]);
    out.clear();
    hpack_int(&mut out, 0, 5, 1337);
    assert_eq!(out, [31, 154, 10]);
    assert_eq!(frame(DATA, 0, 1, b"ab")[..9], [0, 0, 2, 0, 0, 0, 0, 0, 1]);
}
