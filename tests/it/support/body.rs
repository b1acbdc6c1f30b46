//! Request and response bodies: empty, fixed, generated on the fly, counted.

use super::{BoxError, TestBody};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use std::pin::Pin;
use std::task::{Context, Poll};

/// An empty body.
pub fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body of the given bytes (sent with `Content-Length`).
pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(super) static FILLER: [u8; 64 * 1024] = [b'p'; 64 * 1024];

/// A body of `len` filler bytes produced on the fly, never held in memory.
/// `exact` bodies announce their length (`Content-Length`); the others go chunked.
pub struct GenBody {
    remaining: u64,
    sent: u64,
    exact: bool,
    on_chunk: Option<Box<dyn FnMut(u64) + Send>>,
}

impl GenBody {
    /// `len` bytes announced with `Content-Length`.
    pub fn exact(len: u64) -> GenBody {
        GenBody {
            remaining: len,
            sent: 0,
            exact: true,
            on_chunk: None,
        }
    }

    /// `len` bytes of unannounced length (chunked on HTTP/1.1).
    pub fn chunked(len: u64) -> GenBody {
        GenBody {
            exact: false,
            ..GenBody::exact(len)
        }
    }

    /// Calls `f` with the number of bytes produced so far, before each chunk.
    pub fn on_chunk(mut self, f: impl FnMut(u64) + Send + 'static) -> GenBody {
        self.on_chunk = Some(Box::new(f));
        self
    }

    /// As a [`TestBody`].
    pub fn boxed(self) -> TestBody {
        BodyExt::boxed_unsync(self)
    }
}

impl Body for GenBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        if let Some(f) = this.on_chunk.as_mut() {
            f(this.sent);
        }
        let n = this.remaining.min(FILLER.len() as u64);
        this.remaining -= n;
        this.sent += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &FILLER[..n as usize],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

/// Reads a body to its end, counting bytes without keeping them; `every` is called with
/// the running total after each frame.
pub async fn count_body<B>(body: B, mut every: impl FnMut(u64)) -> Result<u64, B::Error>
where
    B: Body + Unpin,
{
    let mut body = body;
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += bytes::Buf::remaining(&data) as u64;
            every(n);
        }
    }
    Ok(n)
}
