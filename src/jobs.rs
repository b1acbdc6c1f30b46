//! What the learning phase reads for async job slots: a job's creation answer keeps its
//! slot under the job's id (a 2xx with `jobId`) or gives it back; a status answer with a
//! final `state`, or a 2xx `DELETE` of the job, frees it.
//!
//! Only the answers that matter are read, at most [`MAX_JOB_ANSWER_BYTES`] of them, and
//! the caller still gets every byte, trailer and error of the upstream's body unchanged.

use crate::answer::{BoxError, ProxyBody};
use crate::limit::jobs::JobKey;
use crate::queue::{Admission, JobHold};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::Deserialize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Largest creation or status answer read for a job's id or state; a longer one is passed
/// on unread (a creation's slot is then given back: no id, no job to follow).
pub const MAX_JOB_ANSWER_BYTES: usize = 64 * 1024;

/// Longest job id followed; Genesys' are UUIDs.
const MAX_JOB_ID: usize = 128;

/// States after which a job holds no slot.
const FINAL_STATES: [&str; 4] = ["FULFILLED", "FAILED", "CANCELLED", "EXPIRED"];

/// Learns from one answer what it says about job slots, and passes it on. `hold` is the
/// slots of a job's creation, if the request was one.
pub async fn watch(
    admission: &Admission,
    upstream: usize,
    method: &Method,
    path: &str,
    hold: Option<JobHold>,
    resp: Response<ProxyBody>,
) -> Response<ProxyBody> {
    if let Some(hold) = hold {
        if !resp.status().is_success() {
            // Dropping the hold gives the slots back: the upstream started no job.
            return resp;
        }
        let (parts, body) = resp.into_parts();
        let (read, body) = peek(body, MAX_JOB_ANSWER_BYTES).await;
        match read.as_deref().and_then(created_job) {
            Some(id) => hold.keep((upstream, Arc::from(id))),
            None => {
                tracing::debug!(path, "job creation answered without a readable jobId");
                drop(hold);
            }
        }
        return Response::from_parts(parts, body);
    }
    let Some(job) = followed_job(admission, upstream, method, path) else {
        return resp;
    };
    if !resp.status().is_success() {
        return resp;
    }
    if method == Method::DELETE {
        admission.job_finished(&job);
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let (read, body) = peek(body, MAX_JOB_ANSWER_BYTES).await;
    if read.as_deref().is_some_and(is_final) {
        admission.job_finished(&job);
    }
    Response::from_parts(parts, body)
}

/// The job a `GET` or `DELETE` of `…/jobs/{jobId}` names, when it holds a slot here.
fn followed_job(
    admission: &Admission,
    upstream: usize,
    method: &Method,
    path: &str,
) -> Option<JobKey> {
    if method != Method::GET && method != Method::DELETE {
        return None;
    }
    let (parent, id) = path.trim_end_matches('/').rsplit_once('/')?;
    if !parent.ends_with("/jobs") || !valid_id(id) {
        return None;
    }
    let job = (upstream, Arc::from(id));
    admission.holds_job(&job).then_some(job)
}

/// A job id pacer follows: short, and only characters ids are made of.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_JOB_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The `jobId` of a creation answer, if it names a valid one.
pub fn created_job(body: &[u8]) -> Option<&str> {
    #[derive(Deserialize)]
    struct Created<'a> {
        #[serde(rename = "jobId", borrow)]
        job_id: Option<&'a str>,
    }
    let created: Created = serde_json::from_slice(body).ok()?;
    created.job_id.filter(|id| valid_id(id))
}

/// True when a status answer's `state` is final (any case).
pub fn is_final(body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Status {
        state: Option<String>,
    }
    serde_json::from_slice::<Status>(body)
        .ok()
        .and_then(|s| s.state)
        .is_some_and(|s| FINAL_STATES.iter().any(|f| s.eq_ignore_ascii_case(f)))
}

/// Reads `body` up to its end if that comes within `max` bytes. Returns the bytes when it
/// did, and a body that gives the caller exactly what the upstream sent: the bytes read,
/// then the rest, its trailers, or its error.
pub async fn peek(mut body: ProxyBody, max: usize) -> (Option<Bytes>, ProxyBody) {
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            None => {
                let bytes = buf.freeze();
                return (Some(bytes.clone()), Replay::new(bytes, Rest::Done).boxed());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    buf.extend_from_slice(&data);
                    if buf.len() > max {
                        return (None, Replay::new(buf.freeze(), Rest::Body(body)).boxed());
                    }
                }
                Err(frame) => {
                    // Trailers end a body.
                    let rest = Rest::Trailers(frame.into_trailers().ok());
                    let bytes = buf.freeze();
                    return (Some(bytes.clone()), Replay::new(bytes, rest).boxed());
                }
            },
            Some(Err(e)) => {
                return (
                    None,
                    Replay::new(buf.freeze(), Rest::Error(Some(e))).boxed(),
                );
            }
        }
    }
}

/// What follows the bytes [`peek`] read.
enum Rest {
    Body(ProxyBody),
    Trailers(Option<HeaderMap>),
    Error(Option<BoxError>),
    Done,
}

/// The bytes read, then the [`Rest`].
struct Replay {
    head: Option<Bytes>,
    rest: Rest,
}

impl Replay {
    fn new(head: Bytes, rest: Rest) -> Self {
        Replay {
            head: (!head.is_empty()).then_some(head),
            rest,
        }
    }

    fn boxed(self) -> ProxyBody {
        BodyExt::boxed_unsync(self)
    }
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        match &mut self.rest {
            Rest::Body(b) => Pin::new(b).poll_frame(cx),
            Rest::Trailers(t) => Poll::Ready(t.take().map(|t| Ok(Frame::trailers(t)))),
            Rest::Error(e) => Poll::Ready(e.take().map(Err)),
            Rest::Done => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none()
            && match &self.rest {
                Rest::Body(b) => b.is_end_stream(),
                Rest::Trailers(t) => t.is_none(),
                Rest::Error(e) => e.is_none(),
                Rest::Done => true,
            }
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        match &self.rest {
            Rest::Body(b) => {
                let inner = b.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower().saturating_add(head));
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper.saturating_add(head));
                }
                hint
            }
            _ => SizeHint::with_exact(head),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answer::full;

    #[test]
    fn job_ids_and_states_are_read_defensively() {
        assert_eq!(
            created_job(br#"{"jobId":"a-1","state":"QUEUED"}"#),
            Some("a-1")
        );
        for bad in [
            &br#"{"jobId":""}"#[..],
            br#"{"jobId":"../x"}"#,
            br#"{"jobId":7}"#,
            br#"{"id":"a"}"#,
            b"not json",
        ] {
            assert_eq!(created_job(bad), None);
        }
        let long = format!(r#"{{"jobId":"{}"}}"#, "a".repeat(MAX_JOB_ID + 1));
        assert_eq!(created_job(long.as_bytes()), None);
        assert!(is_final(br#"{"id":"a","state":"fulfilled"}"#));
        assert!(is_final(br#"{"state":"EXPIRED"}"#));
        assert!(!is_final(br#"{"state":"RUNNING"}"#));
        assert!(!is_final(br#"{"state":"QUEUED"}"#));
        assert!(!is_final(br#"{"state":1}"#));
        assert!(!is_final(b""));
    }

    #[tokio::test]
    async fn peek_reads_small_bodies_and_passes_long_ones_on_unchanged() {
        let (read, body) = peek(full("small"), 16).await;
        assert_eq!(read.as_deref(), Some(&b"small"[..]));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "small");
        let long = "x".repeat(100);
        let chunks = futures_util::stream::iter(
            long.as_bytes()
                .chunks(10)
                .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::copy_from_slice(c))))
                .collect::<Vec<_>>(),
        );
        let body = http_body_util::StreamBody::new(chunks).boxed_unsync();
        let (read, body) = peek(body, 16).await;
        assert_eq!(read, None);
        assert_eq!(body.collect().await.unwrap().to_bytes(), long);
        let broken = futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"ab"))),
            Err("upstream went away".into()),
        ]);
        let (read, body) = peek(http_body_util::StreamBody::new(broken).boxed_unsync(), 16).await;
        assert_eq!(read, None);
        assert!(
            body.collect().await.is_err(),
            "the error reaches the caller"
        );
    }
}
