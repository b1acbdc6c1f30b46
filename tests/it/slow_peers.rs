//! Slow and silent peers on both sides: each is cut off by its timeout with a clear
//! answer or a closed connection, never a hang, while a second client keeps being served.
//!
//! Over real sockets these tests prove that a limit is applied (pacer waited at least the
//! timeout, then ended the exchange) with generous hang bounds; that each limit fires at
//! exactly its configured moment is proved under paused time in `src/server/tests.rs`.

use crate::support::*;
use http::{Method, StatusCode};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// pacer with the peer under test behind `/api/` (upstream `bad`) and a well-behaved
/// upstream behind `/ok/`; one-second header and body timeouts unless `server` says
/// otherwise.
async fn pacer_with(
    server: &str,
    bad_url: &str,
    bad_upstream: &str,
    good: &TestUpstream,
) -> pacer::app::Running {
    let mut keys = String::from(server);
    for (key, value) in [
        ("header_read_timeout", "\"1s\""),
        ("body_idle_timeout", "\"1s\""),
    ] {
        if !server.contains(key) {
            keys.push_str(&format!("\n{key} = {value}"));
        }
    }
    start_pacer(&format!(
        "[server]\n{keys}\n\n\
         [[upstream]]\nname = \"bad\"\nurl = \"{bad_url}\"\n{bad_upstream}\n\n\
         [[upstream]]\nname = \"good\"\nurl = \"{}\"\n\n\
         [[route]]\nprefix = \"/api/\"\nupstream = \"bad\"\n\n\
         [[route]]\nprefix = \"/ok/\"\nupstream = \"good\"\n\n{NO_TOKEN_LOOKUPS}",
        good.url()
    ))
    .await
}

/// Reads until the peer closes (`Ok(bytes)`) or `limit` passes (`Err(bytes)`).
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let until = Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(until.into(), s.read(&mut buf)).await {
            Err(_) => return Err(got),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// How long a test waits for pacer to end an exchange before calling it a hang: far
/// above every timeout configured here, so that a loaded machine cannot reach it.
const HANG: Duration = Duration::from_secs(10);

fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[..bytes.len().min(2000)]).into_owned()
}

#[tokio::test]
async fn silent_client_is_closed_after_header_read_timeout() {
    let _slot = slot(Load::Timed).await;
    within("silent client", async {
        let good = TestUpstream::start().await;
        let pacer = pacer_with("", &good.url(), "", &good).await;
        let bystander = Bystander::start(pacer.proxy_addr, "/ok/ping");

        let started = Instant::now();
        let mut s = TcpStream::connect(pacer.proxy_addr).await.expect("connect");
        let got = read_until_closed(&mut s, HANG).await;
        let took = started.elapsed();
        assert!(got.is_ok(), "still open after {HANG:?}");
        assert!(took >= Duration::from_millis(900), "closed after {took:?}");
        bystander.assert_served().await;
        // Only the bystander's requests reached an upstream.
        assert!(good.records().iter().all(|r| r.uri == "/ok/ping"));
    })
    .await;
}

#[tokio::test]
async fn trickled_headers_are_cut_off_by_header_read_timeout() {
    let _slot = slot(Load::Timed).await;
    within("slowloris", async {
        let good = TestUpstream::start().await;
        let bad = RawUpstream::start(RawMode::Ok).await;
        let pacer = pacer_with("", &bad.url(), "", &good).await;
        let bystander = Bystander::start(pacer.proxy_addr, "/ok/ping");

        let head = format!(
            "GET /api/slow HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(40)
        );
        let started = Instant::now();
        let s = TcpStream::connect(pacer.proxy_addr).await.expect("connect");
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut sent = 0;
            for b in head.as_bytes() {
                if wr.write_all(&[*b]).await.is_err() {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (sent, head.len())
        });
        let mut buf = [0u8; 4096];
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(HANG, async {
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let took = started.elapsed();
        assert!(
            closed.is_ok(),
            "still open after {HANG:?}: {}",
            show(&answer)
        );
        assert!(took >= Duration::from_millis(900), "closed after {took:?}");
        // Whatever came back is no success.
        assert!(
            response_statuses(&answer).iter().all(|s| *s >= 400),
            "{}",
            show(&answer)
        );
        let (sent, total) = writer.await.expect("writer");
        assert!(sent < total, "the whole head went through ({sent} bytes)");
        assert_eq!(bad.count(), 0, "{:?}", bad.records());
        bystander.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn slow_upload_is_aborted_after_body_idle_timeout() {
    let _slot = slot(Load::Timed).await;
    within("slow upload", async {
        let good = TestUpstream::start().await;
        let bad = RawUpstream::start(RawMode::Ok).await;
        let pacer = pacer_with("", &bad.url(), "", &good).await;
        let bystander = Bystander::start(pacer.proxy_addr, "/ok/ping");

        let started = Instant::now();
        let s = TcpStream::connect(pacer.proxy_addr).await.expect("connect");
        let (mut rd, mut wr) = s.into_split();
        wr.write_all(
            b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789",
        )
        .await
        .expect("write head");
        // One more byte every 1.5s: slower than the 1s body idle timeout.
        let writer = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                if wr.write_all(b"x").await.is_err() {
                    break;
                }
            }
        });
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = tokio::time::timeout(HANG, async {
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        let took = started.elapsed();
        writer.abort();
        assert!(
            closed.is_ok(),
            "still open after {HANG:?}: {}",
            show(&answer)
        );
        assert!(took >= Duration::from_millis(900), "closed after {took:?}");
        // The client is still there to read it: pacer's own 408.
        let statuses = response_statuses(&answer);
        assert_eq!(statuses, [408], "{}", show(&answer));
        assert!(
            show(&answer).contains("\"status\":408"),
            "{}",
            show(&answer)
        );

        // The body was read whole before anything else (it is under buffer_body_bytes):
        // the upstream never saw the request.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(bad.connections(), 0, "{:?}", bad.records());
        bystander.assert_served().await;
    })
    .await;
}

/// Downloads 200 MiB through pacer on a raw socket and stops reading after the first MiB
/// for `stall_for`, by when pacer must have given up on the connection: what it had
/// buffered then arrives, and the connection ends early. Returns the bytes read and how
/// much this process's resident memory grew while the client stalled.
async fn stalled_download(pacer: &pacer::app::Running, stall_for: Duration) -> (u64, u64) {
    const SIZE: u64 = 200 * 1024 * 1024;
    let mut s = TcpStream::connect(pacer.proxy_addr).await.expect("connect");
    let req = format!("GET /api/download HTTP/1.1\r\nHost: x\r\nX-Reply-Download: {SIZE}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let base = vm_rss_bytes().expect("VmRSS");
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0u64;
    while read < 1024 * 1024 {
        let n = s.read(&mut buf).await.expect("read the first MiB");
        assert!(n > 0, "closed early");
        read += n as u64;
    }
    // Stalled: nothing is read; memory must stay flat.
    let peak = Peak::default();
    let until = Instant::now() + stall_for;
    while Instant::now() < until {
        peak.sample_rss();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let growth = peak.get().saturating_sub(base);
    // Now drain: only what was buffered before pacer gave up arrives, then the end.
    let rest = read_until_closed(&mut s, HANG)
        .await
        .map_err(|r| r.len())
        .expect("pacer did not close the stalled download");
    read += rest.len() as u64;
    assert!(read < SIZE / 2, "{read} bytes went through");
    (read, growth)
}

#[tokio::test]
async fn slow_reader_is_bounded_in_memory_and_ended_by_request_deadline() {
    let _slot = slot(Load::Alone).await;
    within("slow reader, deadline", async {
        let good = TestUpstream::start().await;
        // The body idle timeout is long: only the deadline can end the stalled answer.
        let pacer = pacer_with(
            "body_idle_timeout = \"30s\"\nrequest_deadline = \"3s\"",
            &good.url(),
            "",
            &good,
        )
        .await;
        let bystander = Bystander::start(pacer.proxy_addr, "/ok/ping");
        // Deadline 3s, plus one second for a body that is never polled again.
        let (_, growth) = stalled_download(&pacer, Duration::from_millis(4500)).await;
        assert!(
            growth < 50 * 1024 * 1024,
            "resident memory grew by {} MiB with a stalled 200 MiB download",
            growth / (1024 * 1024)
        );
        bystander.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn reader_that_stops_is_cut_off_after_body_idle_timeout() {
    let _slot = slot(Load::Timed).await;
    within("slow reader, idle", async {
        let good = TestUpstream::start().await;
        let pacer = pacer_with("", &good.url(), "", &good).await;
        let bystander = Bystander::start(pacer.proxy_addr, "/ok/ping");
        // No write progress for 1s closes the connection.
        let (_, growth) = stalled_download(&pacer, Duration::from_millis(2500)).await;
        assert!(growth < 50 * 1024 * 1024, "grew by {growth} bytes");
        bystander.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn upstream_that_never_answers_is_504() {
    let _slot = slot(Load::Timed).await;
    within("silent upstream", async {
        let good = TestUpstream::start().await;
        let bad = RawUpstream::start(RawMode::Silent).await;
        let pacer = pacer_with("", &bad.url(), "timeout = \"1s\"", &good).await;
        let bystander = Bystander::start(pacer.proxy_addr, "/ok/ping");
        let client = TestClient::http1(pacer.proxy_addr);
        let started = Instant::now();
        client
            .get("/api/never", &[])
            .await
            .assert_pacer_error(StatusCode::GATEWAY_TIMEOUT);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert_eq!(bad.count(), 1);
        bystander.assert_served().await;
    })
    .await;
}

/// Sends `GET /api/...` and reads the answer's body: it must end with an error, never
/// cleanly and never hang.
async fn body_must_break(pacer: &pacer::app::Running, path: &str) {
    let client = TestClient::http1(pacer.proxy_addr);
    let req = client
        .request(Method::GET, path)
        .body(empty())
        .expect("request");
    let body = client.download(req, 1024 * 1024).await;
    let got = tokio::time::timeout(HANG, count_body(body, |_| {}))
        .await
        .expect("the body hung");
    if let Ok(n) = got {
        panic!("the body ended cleanly after {n} bytes");
    }
}

#[tokio::test]
async fn upstream_stalling_mid_body_breaks_the_clients_body() {
    let _slot = slot(Load::Timed).await;
    within("upstream stalls", async {
        let good = TestUpstream::start().await;
        let bad = RawUpstream::start(RawMode::HeadThenStall).await;
        let pacer = pacer_with("", &bad.url(), "", &good).await;
        let bystander = Bystander::start(pacer.proxy_addr, "/ok/ping");
        body_must_break(&pacer, "/api/stall").await;
        bystander.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn upstream_reset_mid_body_breaks_the_clients_body() {
    let _slot = slot(Load::Timed).await;
    within("upstream resets", async {
        let good = TestUpstream::start().await;
        let bad = RawUpstream::start(RawMode::ResetMidBody).await;
        let pacer = pacer_with("", &bad.url(), "", &good).await;
        let bystander = Bystander::start(pacer.proxy_addr, "/ok/ping");
        body_must_break(&pacer, "/api/reset").await;
        bystander.assert_served().await;
    })
    .await;
}

#[tokio::test]
async fn old_connection_finishes_its_request_then_closes() {
    let _slot = slot(Load::Timed).await;
    within("max_connection_age", async {
        let good = TestUpstream::start().await;
        let pacer = pacer_with("max_connection_age = \"1s\"", &good.url(), "", &good).await;
        let mut s = TcpStream::connect(pacer.proxy_addr).await.expect("connect");
        let started = Instant::now();
        // In flight when the connection comes of age: it still completes.
        s.write_all(b"GET /api/slow HTTP/1.1\r\nHost: x\r\nX-Reply-Delay-Ms: 1500\r\n\r\n")
            .await
            .expect("write");
        let got = read_until_closed(&mut s, HANG)
            .await
            .expect("the old connection was never closed");
        let took = started.elapsed();
        assert_eq!(response_statuses(&got), [200], "{}", show(&got));
        assert!(took >= Duration::from_millis(1400), "{took:?}");

        // An idle keep-alive connection is closed once it is old.
        let mut s = TcpStream::connect(pacer.proxy_addr).await.expect("connect");
        s.write_all(b"GET /api/one HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let got = read_until_closed(&mut s, HANG)
            .await
            .expect("the idle old connection was never closed");
        assert_eq!(response_statuses(&got), [200], "{}", show(&got));
    })
    .await;
}

#[tokio::test]
async fn h2_client_learns_max_concurrent_streams() {
    within("h2 settings", async {
        let good = TestUpstream::start().await;
        let pacer = pacer_with("http2_max_concurrent_streams = 7", &good.url(), "", &good).await;
        let tcp = TcpStream::connect(pacer.proxy_addr).await.expect("connect");
        let (mut send, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        // A first request makes sure the server's SETTINGS have been applied.
        let req = http::Request::get("http://x/ok/ping")
            .body(())
            .expect("request");
        let (resp, _) = send.send_request(req, true).expect("send");
        assert_eq!(resp.await.expect("answer").status(), StatusCode::OK);
        assert_eq!(send.current_max_send_streams(), 7);
    })
    .await;
}
