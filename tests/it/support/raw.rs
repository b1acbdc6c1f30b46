//! Raw sockets: bytes written as they are, answers read back and split into heads.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What came back on a raw connection.
#[derive(Debug)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    /// The peer closed (or reset) the connection.
    pub closed: bool,
}

impl RawReply {
    /// The status code of the first response, if one arrived.
    pub fn status(&self) -> Option<u16> {
        let text = std::str::from_utf8(self.bytes.get(..self.head_len()?)?).ok()?;
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }

    /// Length of the response head including the blank line.
    pub fn head_len(&self) -> Option<usize> {
        head_len(&self.bytes)
    }

    /// A header of the first response (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        header_in(&self.bytes[..self.head_len()?], name)
    }

    /// The bytes after the first response head.
    pub fn body(&self) -> &[u8] {
        self.head_len().map_or(&[][..], |n| &self.bytes[n..])
    }
}

pub(super) fn head_len(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

fn header_in(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// True once `bytes` hold one whole response (by `Content-Length`, chunked end or a
/// bodiless status).
fn response_complete(bytes: &[u8]) -> bool {
    let Some(n) = head_len(bytes) else {
        return false;
    };
    let head = &bytes[..n];
    let status = RawReply {
        bytes: bytes.to_vec(),
        closed: false,
    }
    .status();
    if matches!(status, Some(100..=199 | 204 | 304)) {
        return true;
    }
    if let Some(len) = header_in(head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        return bytes.len() >= n + len;
    }
    if header_in(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return bytes.ends_with(b"0\r\n\r\n");
    }
    false
}

/// Writes `request` on a new connection (write errors are ignored: the server may close
/// early), optionally half-closes, and reads until one whole response has arrived, the
/// peer closes, or `quiet` passes without data.
pub async fn raw_exchange(
    addr: SocketAddr,
    request: &[u8],
    half_close: bool,
    quiet: Duration,
) -> RawReply {
    raw_io(addr, request, half_close, quiet, true).await
}

/// Writes `request` on a new connection, optionally half-closes, and reads everything
/// until the peer closes or `quiet` passes without data.
pub async fn raw_read_all(
    addr: SocketAddr,
    request: &[u8],
    half_close: bool,
    quiet: Duration,
) -> RawReply {
    raw_io(addr, request, half_close, quiet, false).await
}

async fn raw_io(
    addr: SocketAddr,
    request: &[u8],
    half_close: bool,
    quiet: Duration,
    one_response: bool,
) -> RawReply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = stream.split();
    let write = async {
        let _ = wr.write_all(request).await;
        if half_close {
            let _ = wr.shutdown().await;
        }
    };
    let mut bytes = Vec::new();
    let mut closed = false;
    let read = async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tokio::time::timeout(quiet, rd.read(&mut chunk)).await {
                Err(_) => break,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(n)) => {
                    bytes.extend_from_slice(&chunk[..n]);
                    if one_response && response_complete(&bytes) {
                        break;
                    }
                }
            }
        }
    };
    // Read while writing, so a server that answers early cannot dead-lock a large write.
    tokio::join!(write, read);
    RawReply { bytes, closed }
}

/// Status codes of every response head in `bytes`, in order.
pub fn response_statuses(bytes: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(bytes);
    text.match_indices("HTTP/1.")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}
