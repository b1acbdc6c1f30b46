//! A plain TCP upstream that records the raw bytes of each request.

use super::body::FILLER;
use super::raw::head_len;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// One request as a raw TCP upstream received it, byte for byte.
#[derive(Debug, Clone)]
pub struct RawRecorded {
    /// Which accepted connection it came on (0, 1, ...).
    pub conn: usize,
    /// Every byte of the request (head and framed body) as received.
    pub raw: Vec<u8>,
    /// The request line, without its line ending.
    pub line: String,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body bytes as framed (chunked framing included).
    pub framed_body: Vec<u8>,
    /// The body after removing chunked framing.
    pub body: Vec<u8>,
    /// False when the connection ended (or the framing broke) before the request was whole.
    pub complete: bool,
}

impl RawRecorded {
    /// All values of a header.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The single value of a header (panics when repeated).
    pub fn header(&self, name: &str) -> Option<&str> {
        let all = self.header_all(name);
        assert!(all.len() <= 1, "{name} repeated: {self:?}");
        all.first().copied()
    }
}

/// How a [`RawUpstream`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawMode {
    /// `HTTP/1.1 200 OK`, `content-length: 2`, `ok` after each whole request.
    Ok,
    /// Reads requests, never answers.
    Silent,
    /// After a whole request: a head announcing 1 MiB and 1 KiB of it, then nothing.
    HeadThenStall,
    /// After a whole request: a head announcing 1 MiB and 64 KiB of it, then a TCP reset.
    ResetMidBody,
}

/// The canned answer of [`RawMode::Ok`].
pub const RAW_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// A plain TCP upstream that records the raw bytes of each request. Stops when dropped.
pub struct RawUpstream {
    pub addr: SocketAddr,
    seen: Arc<RawSeen>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct RawSeen {
    records: Mutex<Vec<RawRecorded>>,
    count: watch::Sender<usize>,
    conns: AtomicU64,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    /// An upstream in `mode` on `127.0.0.1:0`.
    pub async fn start(mode: RawMode) -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw upstream");
        let addr = listener.local_addr().expect("raw upstream addr");
        let seen = Arc::new(RawSeen::default());
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let conn = s.conns.fetch_add(1, Ordering::Relaxed) as usize;
                conns.spawn(raw_serve(stream, conn, mode, s.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        RawUpstream { addr, seen, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests recorded so far (whole or cut short).
    pub fn records(&self) -> Vec<RawRecorded> {
        self.seen.records.lock().expect("records lock").clone()
    }

    /// Number of requests recorded so far.
    pub fn count(&self) -> usize {
        *self.seen.count.borrow()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.seen.conns.load(Ordering::Relaxed) as usize
    }

    /// Waits until at least `n` requests have been recorded.
    pub async fn wait_for(&self, n: usize) {
        let mut rx = self.seen.count.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }
}

/// Outcome of parsing one request from the front of a buffer.
enum RawParse {
    /// Need more bytes.
    More,
    /// A whole request of this many bytes.
    Whole(usize, RawRecorded),
    /// The framing is broken: the request so far.
    Broken(RawRecorded),
}

/// Header fields in order, names lower-cased.
type RawHeaders = Vec<(String, String)>;

/// The head's length, its request line and its fields.
fn raw_head(buf: &[u8]) -> Option<(usize, String, RawHeaders)> {
    let end = head_len(buf)?;
    let text = String::from_utf8_lossy(&buf[..end - 4]).into_owned();
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    Some((end, line, headers))
}

/// Decodes strict chunked framing; `Ok(None)` when more bytes are needed.
fn raw_chunked(buf: &[u8]) -> Result<Option<(usize, Vec<u8>)>, ()> {
    let (mut at, mut body) = (0, Vec::new());
    loop {
        let Some(nl) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[at..at + nl]).map_err(|_| ())?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or_default(), 16)
            .map_err(|_| ())?;
        at += nl + 2;
        if size == 0 {
            // Trailers until the empty line.
            loop {
                let Some(nl) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                at += nl + 2;
                if nl == 0 {
                    return Ok(Some((at, body)));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(());
        }
        at += size + 2;
    }
}

fn raw_parse(buf: &[u8], conn: usize) -> RawParse {
    let Some((head, line, headers)) = raw_head(buf) else {
        return RawParse::More;
    };
    let mut rec = RawRecorded {
        conn,
        raw: buf.to_vec(),
        line,
        headers,
        framed_body: buf[head..].to_vec(),
        body: Vec::new(),
        complete: false,
    };
    let chunked = rec
        .header_all("transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("chunked"));
    let len = match (chunked, rec.header_all("content-length").as_slice()) {
        (true, []) => match raw_chunked(&buf[head..]) {
            Ok(Some((n, body))) => {
                rec.body = body;
                Some(n)
            }
            Ok(None) => None,
            Err(()) => return RawParse::Broken(rec),
        },
        (false, []) => Some(0),
        (false, [one]) => match one.parse::<usize>() {
            Ok(n) if buf.len() >= head + n => {
                rec.body = buf[head..head + n].to_vec();
                Some(n)
            }
            Ok(_) => None,
            Err(_) => return RawParse::Broken(rec),
        },
        // Two framings, or several lengths: exactly what an upstream must never receive.
        _ => return RawParse::Broken(rec),
    };
    match len {
        None => RawParse::More,
        Some(n) => {
            let total = head + n;
            rec.raw.truncate(total);
            rec.framed_body.truncate(n);
            rec.complete = true;
            RawParse::Whole(total, rec)
        }
    }
}

async fn raw_serve(mut stream: TcpStream, conn: usize, mode: RawMode, seen: Arc<RawSeen>) {
    let push = |r: RawRecorded| {
        seen.records.lock().expect("records lock").push(r);
        seen.count.send_modify(|c| *c += 1);
    };
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match raw_parse(&buf, conn) {
            RawParse::Whole(n, rec) => {
                buf.drain(..n);
                push(rec);
                match mode {
                    RawMode::Ok => {
                        if stream.write_all(RAW_OK).await.is_err() {
                            return;
                        }
                    }
                    RawMode::Silent => {}
                    RawMode::HeadThenStall | RawMode::ResetMidBody => {
                        let sent = if mode == RawMode::HeadThenStall {
                            1024
                        } else {
                            64 * 1024
                        };
                        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n";
                        let _ = stream.write_all(head).await;
                        let _ = stream.write_all(&FILLER[..sent]).await;
                        let _ = stream.flush().await;
                        if mode == RawMode::ResetMidBody {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            let _ = stream.set_zero_linger();
                            return;
                        }
                        // Hold the connection open, silent, until the peer gives up.
                        let mut sink = [0u8; 1024];
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                        return;
                    }
                }
                continue;
            }
            RawParse::Broken(rec) => {
                push(rec);
                return;
            }
            RawParse::More => {}
        }
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => {
                if !buf.is_empty() {
                    if let RawParse::More = raw_parse(&buf, conn) {
                        let (head, line, headers) = raw_head(&buf).unwrap_or_default();
                        push(RawRecorded {
                            conn,
                            raw: buf.clone(),
                            line,
                            headers,
                            framed_body: buf[head..].to_vec(),
                            body: Vec::new(),
                            complete: false,
                        });
                    }
                }
                return;
            }
        }
    }
}
