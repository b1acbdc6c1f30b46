//! Request bodies read whole before anything is spent on them: a body of at most
//! `[server] buffer_body_bytes` is collected here and forwarded with a `Content-Length`, so
//! a request takes a `tokens/me` look-up, quota and an upstream connection only once it is
//! complete. A broken body is answered 400 and a stalled one 408, with nothing sent
//! upstream. Larger bodies stream: the bytes already read go first, then the rest.

use crate::answer::{full, BoxError, ProxyBody};
use crate::error::{ErrorKind, ProxyError};
use crate::route::Allowed;
use crate::server::{BodyTimeout, ClientBodyError};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, BodyStream, StreamBody};

/// Reads request bodies of at most `[server] buffer_body_bytes` whole before the phases
/// that spend anything on a request.
pub struct BufferBody {
    /// 0 streams every body.
    limit: u64,
}

impl BufferBody {
    /// Reads bodies of at most `limit` bytes whole.
    pub fn new(limit: u64) -> Self {
        BufferBody { limit }
    }

    /// Reads the request's body whole when it is small enough; a broken body is 400 and a
    /// stalled one 408.
    pub async fn read(&self, mut a: Allowed) -> Result<Allowed, ProxyError> {
        let req = a.request_mut();
        let body = req.body();
        // No body, buffering off, or a declared length above the limit: nothing to wait for.
        if self.limit == 0 || body.is_end_stream() || body.size_hint().lower() > self.limit {
            return Ok(a);
        }
        let limit = usize::try_from(self.limit).unwrap_or(usize::MAX);
        let taken = std::mem::replace(req.body_mut(), full(Bytes::new()));
        let body = match read_up_to(taken, limit).await {
            Ok(Read::Whole(data, None)) => {
                // Re-framed by its real length: whatever framing the client used (and
                // any conflicting Content-Length next to it) stays on this hop.
                let method = req.method().clone();
                set_length(req.headers_mut(), &method, data.len());
                full(data)
            }
            Ok(Read::Whole(data, Some(trailers))) => {
                // Trailers need chunked framing: the body goes on as it came.
                replay(vec![Frame::data(data), Frame::trailers(trailers)], None)
            }
            Ok(Read::Larger(read, rest)) => {
                replay(read.into_iter().map(Frame::data).collect(), Some(rest))
            }
            Err(e) => return Err(body_error(e.as_ref())),
        };
        *req.body_mut() = body;
        Ok(a)
    }
}

/// What reading a body up to the limit found.
enum Read {
    /// The body ended within the limit (with its trailers, if any).
    Whole(Bytes, Option<HeaderMap>),
    /// The body goes on past the limit: the chunks read so far, and the rest of it.
    Larger(Vec<Bytes>, ProxyBody),
}

/// Reads `body` until it ends, fails, or has gone past `limit` bytes.
async fn read_up_to(mut body: ProxyBody, limit: usize) -> Result<Read, BoxError> {
    // Chunks as they came, joined only when there are several: a body that arrives in one
    // frame (the usual small request) is forwarded without a copy.
    let (mut chunks, mut len) = (Vec::new(), 0usize);
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                len = len.saturating_add(data.len());
                chunks.push(data);
                if len > limit {
                    return Ok(Read::Larger(chunks, body));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    let whole = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => {
            let mut buf = BytesMut::with_capacity(len);
            chunks.iter().for_each(|c| buf.extend_from_slice(c));
            buf.freeze()
        }
    };
    Ok(Read::Whole(whole, trailers))
}

/// A body of `frames` already read, followed by what is left of `rest`.
fn replay(frames: Vec<Frame<Bytes>>, rest: Option<ProxyBody>) -> ProxyBody {
    use futures_util::StreamExt;
    let read = futures_util::stream::iter(
        frames
            .into_iter()
            .filter(|f| f.data_ref().is_none_or(|d| !d.is_empty()))
            .map(Ok::<_, BoxError>),
    );
    let rest = futures_util::stream::iter(rest).flat_map(BodyStream::new);
    StreamBody::new(read.chain(rest)).boxed_unsync()
}

/// Frames a whole body by its length. An empty body of a method that expects none goes
/// without `Content-Length`, as RFC 9110 §8.6 asks of user agents.
fn set_length(headers: &mut HeaderMap, method: &Method, len: usize) {
    headers.remove(header::TRANSFER_ENCODING);
    let expects_none = [
        Method::GET,
        Method::HEAD,
        Method::DELETE,
        Method::OPTIONS,
        Method::TRACE,
    ];
    if len == 0 && expects_none.contains(method) {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

/// The answer to a request whose body could not be read: 408 when it stalled or ran past
/// the deadline, 413 past `max_body_bytes`, else 400 (bad framing, cut short).
fn body_error(err: &(dyn std::error::Error + 'static)) -> ProxyError {
    client_body_error(err).unwrap_or_else(|| {
        ProxyError::new(
            ErrorKind::BadRequest("request body is malformed or incomplete"),
            err.to_string(),
        )
    })
}

/// The answer owed to the caller when `err` (or an error it wraps) is the caller's own
/// body failing: over `max_body_bytes` (413), stalled (408), cut short or malformed (400).
/// `None` when the cause lies elsewhere.
pub(crate) fn client_body_error(err: &(dyn std::error::Error + 'static)) -> Option<ProxyError> {
    let mut source = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return Some(ProxyError::new(
                ErrorKind::PayloadTooLarge,
                "request body over max_body_bytes",
            ));
        }
        if let Some(t) = e.downcast_ref::<BodyTimeout>() {
            return Some(ProxyError::new(ErrorKind::RequestTimeout, t.to_string()));
        }
        if let Some(b) = e.downcast_ref::<ClientBodyError>() {
            return Some(ProxyError::new(
                ErrorKind::BadRequest("request body is malformed or incomplete"),
                b.to_string(),
            ));
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let Ok(Read::Whole(data, None)) = read_up_to(chunks(&[b"hel", b"lo"]), 5).await else {
            panic!("not read whole");
        };
        assert_eq!(&data[..], b"hello");
    }

    #[tokio::test]
    async fn a_larger_body_goes_on_with_what_was_read_first() {
        let Ok(Read::Larger(read, rest)) =
            read_up_to(chunks(&[b"hel", b"lo", b" wor", b"ld"]), 4).await
        else {
            panic!("not found larger");
        };
        let frames = read.into_iter().map(Frame::data).collect();
        let body = replay(frames, Some(rest)).collect().await.expect("body");
        assert_eq!(&body.to_bytes()[..], b"hello world");
    }

    #[test]
    fn whole_bodies_are_framed_by_their_length() {
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        set_length(&mut h, &Method::POST, 0);
        assert_eq!(
            (h.get("content-length"), h.get("transfer-encoding")),
            (Some(&HeaderValue::from(0)), None)
        );
        set_length(&mut h, &Method::GET, 0);
        assert!(h.is_empty(), "{h:?}");
        set_length(&mut h, &Method::GET, 3);
        assert_eq!(h.get("content-length"), Some(&HeaderValue::from(3)));
    }

    #[tokio::test]
    async fn trailers_are_kept() {
        let mut t = HeaderMap::new();
        t.insert("x-checksum", HeaderValue::from_static("abc"));
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hi"))),
            Ok(Frame::trailers(t.clone())),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        let Ok(Read::Whole(data, Some(trailers))) = read_up_to(body, 100).await else {
            panic!("trailers lost");
        };
        let again = replay(vec![Frame::data(data), Frame::trailers(trailers)], None)
            .collect()
            .await
            .expect("body");
        assert_eq!(again.trailers(), Some(&t));
        assert_eq!(&again.to_bytes()[..], b"hi");
    }

    #[tokio::test]
    async fn a_broken_body_is_400_and_a_stalled_one_408() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"he"))),
            Err(Box::new(BodyTimeout::Idle(std::time::Duration::from_secs(
                1,
            )))),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        let Err(e) = read_up_to(body, 100).await else {
            panic!("a failed body was read");
        };
        assert_eq!(*body_error(e.as_ref()).kind(), ErrorKind::RequestTimeout);
        let other: BoxError = "framing".into();
        assert!(matches!(
            body_error(other.as_ref()).kind(),
            ErrorKind::BadRequest(_)
        ));
    }
}
