//! Time limits on bodies and sockets: a body that moves no bytes for too long or outlives
//! the request deadline fails, and a peer that stops reading is caught below TLS.

use super::*;

/// Time limits of request and response bodies.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Longest wait for the next body bytes.
    pub idle: Duration,
    /// The whole exchange.
    pub deadline: Duration,
}

/// A body stalled or ran past the request deadline.
#[derive(Debug, thiserror::Error)]
pub enum BodyTimeout {
    #[error("no body bytes for {0:?}")]
    Idle(Duration),
    #[error("request deadline of {0:?} passed")]
    Deadline(Duration),
}

/// The client's request body broke: bad framing, or the connection closed mid-body.
#[derive(Debug, thiserror::Error)]
#[error("request body from the client broke: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// A body that fails with [`BodyTimeout`] when it moves no bytes for `idle` while being
/// read, or once the exchange's deadline has passed. Dropping it (hyper does on error)
/// drops the inner body, which aborts the other side.
pub struct TimedBody {
    inner: ProxyBody,
    limits: BodyLimits,
    deadline: Instant,
    idle: Pin<Box<Sleep>>,
    idle_armed: bool,
    overdue: Pin<Box<Sleep>>,
    done: bool,
    _watched: Option<Overdue>,
}

impl TimedBody {
    pub(super) fn new(
        inner: ProxyBody,
        limits: BodyLimits,
        deadline: Instant,
        watched: Option<Overdue>,
    ) -> Self {
        TimedBody {
            inner,
            limits,
            deadline,
            idle: Box::pin(tokio::time::sleep(limits.idle)),
            idle_armed: false,
            overdue: Box::pin(tokio::time::sleep_until(deadline)),
            done: false,
            _watched: watched,
        }
    }

    fn fail(&mut self, e: BodyTimeout) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        // Checked before reading, so that a steady trickle cannot outlive the deadline.
        if Instant::now() >= this.deadline {
            return this.fail(BodyTimeout::Deadline(this.limits.deadline));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle_armed = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(end) => {
                this.done = true;
                Poll::Ready(end)
            }
            Poll::Pending => {
                // The idle clock runs only while someone waits for bytes: time spent
                // queued before the body is first read is not the client's idleness.
                if !this.idle_armed {
                    this.idle_armed = true;
                    let at = Instant::now() + this.limits.idle;
                    this.idle.as_mut().reset(at);
                }
                if this.idle.as_mut().poll(cx).is_ready() {
                    return this.fail(BodyTimeout::Idle(this.limits.idle));
                }
                if this.overdue.as_mut().poll(cx).is_ready() {
                    return this.fail(BodyTimeout::Deadline(this.limits.deadline));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A socket whose writes fail once they make no progress for `limit`: a peer that stops
/// reading cannot hold a connection, and the answer buffered for it, forever.
pub(super) struct StallGuard<I> {
    io: I,
    limit: Duration,
    stall: Pin<Box<Sleep>>,
    armed: bool,
}

impl<I> StallGuard<I> {
    pub(super) fn new(io: I, limit: Duration) -> Self {
        StallGuard {
            io,
            limit,
            stall: Box::pin(tokio::time::sleep(limit)),
            armed: false,
        }
    }

    fn check<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.armed = false;
            return polled;
        }
        if !self.armed {
            self.armed = true;
            let at = Instant::now() + self.limit;
            self.stall.as_mut().reset(at);
        }
        if self.stall.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stopped reading",
            )));
        }
        Poll::Pending
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for StallGuard<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for StallGuard<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.check(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.check(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.check(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.check(polled, cx)
    }
}
