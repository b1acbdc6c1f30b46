//! The connection and body time limits under paused time: each fires at exactly the
//! configured moment, whatever the machine's speed, over in-memory pipes.

use super::*;
use crate::answer::full;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// A body fed chunk by chunk through a channel; it ends when the sender is dropped.
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

const IDLE: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(3);

/// A [`TimedBody`] over a channel (idle 1 s, deadline 3 s from now) and its sender.
fn timed() -> (TimedBody, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel(16);
    let limits = BodyLimits {
        idle: IDLE,
        deadline: DEADLINE,
    };
    let body = TimedBody::new(
        ChanBody(rx).boxed_unsync(),
        limits,
        Instant::now() + DEADLINE,
        None,
    );
    (body, tx)
}

/// Reads the next frame; `Err` carries the body's error as a [`BodyTimeout`].
async fn next(body: &mut TimedBody) -> Option<Result<Bytes, BodyTimeout>> {
    match body.frame().await? {
        Ok(frame) => Some(Ok(frame.into_data().unwrap_or_default())),
        Err(e) => match e.downcast::<BodyTimeout>() {
            Ok(t) => Some(Err(*t)),
            Err(other) => panic!("not a body timeout: {other}"),
        },
    }
}

#[tokio::test(start_paused = true)]
async fn silent_body_fails_exactly_after_the_idle_timeout_and_then_ends() {
    let (mut body, _tx) = timed();
    let started = Instant::now();
    assert!(matches!(next(&mut body).await, Some(Err(BodyTimeout::Idle(d))) if d == IDLE));
    assert_eq!(started.elapsed(), IDLE);
    // Failed once; afterwards it is over.
    assert!(next(&mut body).await.is_none());
    assert!(body.is_end_stream());
}

#[tokio::test(start_paused = true)]
async fn time_before_the_body_is_first_read_is_not_idleness() {
    let (mut body, tx) = timed();
    // Queued for longer than the idle timeout, but within the deadline: nobody read yet.
    tokio::time::sleep(IDLE * 3 / 2).await;
    let sender = tokio::spawn(async move {
        tokio::time::sleep(IDLE * 3 / 10).await;
        tx.send(Bytes::from_static(b"late but in time"))
            .await
            .map_err(|_| "receiver gone")?;
        Ok::<_, &str>(tx)
    });
    let got = next(&mut body).await;
    assert!(
        matches!(&got, Some(Ok(b)) if b.as_ref() == b"late but in time"),
        "{got:?}"
    );
    // The sender is still there (not dropped) and silent: idle again from this read (at
    // 1.8 s, so idle at 2.8 s, before the 3 s deadline).
    let _tx = sender.await.expect("sender task").expect("send");
    let read_again = Instant::now();
    assert!(matches!(
        next(&mut body).await,
        Some(Err(BodyTimeout::Idle(_)))
    ));
    assert_eq!(read_again.elapsed(), IDLE);
}

#[tokio::test(start_paused = true)]
async fn a_steady_trickle_cannot_outlive_the_deadline() {
    let (mut body, tx) = timed();
    let started = Instant::now();
    // A chunk every half idle timeout: never idle, forever.
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(IDLE / 2).await;
            if tx.send(Bytes::from_static(b"x")).await.is_err() {
                break;
            }
        }
    });
    let mut chunks = 0;
    let err = loop {
        match next(&mut body).await {
            Some(Ok(_)) => chunks += 1,
            Some(Err(e)) => break e,
            None => panic!("the body ended cleanly"),
        }
    };
    trickle.abort();
    assert!(
        matches!(err, BodyTimeout::Deadline(d) if d == DEADLINE),
        "{err:?}"
    );
    assert_eq!(started.elapsed(), DEADLINE);
    // Chunks at 0.5 s … 2.5 s went through; the one due at 3 s meets the deadline.
    assert!((5..=6).contains(&chunks), "{chunks} chunks");
}

#[tokio::test(start_paused = true)]
async fn a_body_read_to_its_end_is_not_failed() {
    let (mut body, tx) = timed();
    tx.send(Bytes::from_static(b"all")).await.expect("send");
    drop(tx);
    assert!(matches!(next(&mut body).await, Some(Ok(b)) if b.as_ref() == b"all"));
    assert!(next(&mut body).await.is_none());
    // Long after the deadline, an ended body stays ended.
    tokio::time::sleep(DEADLINE * 2).await;
    assert!(next(&mut body).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn writes_to_a_peer_that_stopped_reading_fail_exactly_after_the_limit() {
    let (ours, _peer) = tokio::io::duplex(64);
    let mut guarded = StallGuard::new(ours, IDLE);
    let started = Instant::now();
    let err = guarded
        .write_all(&[7u8; 1024])
        .await
        .expect_err("a stalled write succeeded");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert_eq!(started.elapsed(), IDLE);
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_that_keeps_reading_is_not_cut_off() {
    let (ours, mut peer) = tokio::io::duplex(64);
    let mut guarded = StallGuard::new(ours, IDLE);
    // The peer drains 64 bytes every 0.9 s: slow, but never stalled for the limit.
    let reader = tokio::spawn(async move {
        let mut got = 0;
        let mut buf = [0u8; 64];
        while got < 1024 {
            tokio::time::sleep(IDLE * 9 / 10).await;
            match peer.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    });
    let started = Instant::now();
    guarded.write_all(&[7u8; 1024]).await.expect("write");
    guarded.flush().await.expect("flush");
    assert_eq!(reader.await.expect("reader"), 1024);
    // 16 pipe-fulls, each waited for: far longer than the limit in all.
    assert!(started.elapsed() >= IDLE * 10, "{:?}", started.elapsed());
}

/// Settings with these timeouts; the rest as for the admin listener.
fn settings(header_read: Duration, max_age: Duration) -> ConnSettings {
    ConnSettings {
        header_read_timeout: header_read,
        max_connection_age: max_age,
        ..ConnSettings::admin()
    }
}

/// Serves one connection over an in-memory pipe with `settings`; the handler answers
/// `200 ok` after the delay a request names in `x-delay-ms`. Returns the client's end and
/// the connection's task.
fn serve_pipe(
    settings: ConnSettings,
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<Result<(), BoxError>>,
    watch::Sender<bool>,
) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (stop, shutdown) = watch::channel(false);
    let forced = shutdown.clone();
    let handler = |req: Request<ProxyBody>, _info: ConnInfo| async move {
        let delay = req
            .headers()
            .get("x-delay-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let mut resp = Response::new(full("ok"));
        *resp.status_mut() = StatusCode::OK;
        resp
    };
    let info = ConnInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 1)),
        tls: false,
    };
    let task = tokio::spawn(async move {
        let builder = settings.builder();
        let conn = ConnCtx {
            builder: &builder,
            settings: &settings,
            shutdown,
            forced,
        };
        conn.run(server, handler, info).await
    });
    (client, task, stop)
}

/// Reads until the server closes; what it sent.
async fn read_to_close(client: &mut tokio::io::DuplexStream) -> String {
    let mut got = Vec::new();
    let _ = client.read_to_end(&mut got).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_exactly_after_the_header_read_timeout() {
    let (mut client, task, _stop) = serve_pipe(settings(IDLE, Duration::from_secs(600)));
    let started = Instant::now();
    let got = read_to_close(&mut client).await;
    assert_eq!(started.elapsed(), IDLE);
    assert_eq!(got, "", "nothing is answered to a client that said nothing");
    let ended = task.await.expect("connection task");
    assert!(ended.is_err(), "the connection ended without an error");
}

#[tokio::test(start_paused = true)]
async fn a_client_sending_its_head_in_time_is_served_past_the_header_read_timeout() {
    let (mut client, task, _stop) = serve_pipe(settings(IDLE, Duration::from_secs(600)));
    tokio::time::sleep(IDLE / 2).await;
    // The answer takes longer than the header read timeout; the head came in time.
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Delay-Ms: 2000\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let got = read_to_close(&mut client).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("ok"), "{got}");
    assert!(task.await.expect("connection task").is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_old_connection_finishes_its_request_then_closes() {
    let age = IDLE;
    let (mut client, task, _stop) = serve_pipe(settings(Duration::from_secs(10), age));
    let started = Instant::now();
    // In flight when the connection comes of age (at 1 s): answered at 1.5 s, then closed.
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Delay-Ms: 1500\r\n\r\n")
        .await
        .expect("write");
    let got = read_to_close(&mut client).await;
    assert_eq!(started.elapsed(), Duration::from_millis(1500));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(got.matches("HTTP/1.1").count(), 1, "{got}");
    assert!(task.await.expect("connection task").is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_is_closed_when_it_comes_of_age() {
    let age = Duration::from_secs(5);
    let (mut client, task, _stop) = serve_pipe(settings(Duration::from_secs(10), age));
    let started = Instant::now();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let got = read_to_close(&mut client).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(started.elapsed(), age);
    assert!(task.await.expect("connection task").is_ok());
}
