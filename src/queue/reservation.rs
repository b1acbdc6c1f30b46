//! Reservation: room a request holds in every layer it matches. Reservations are RAII: a
//! [`Reservation`] dropped before [`Reservation::commit`] (the caller went away, the request
//! was refused) gives everything back; a [`Permit`] holds concurrency until the response is
//! done. Either wakes the scheduler when it frees room.

use super::JobHold;
use super::PauseKey;
use super::Shared;
use crate::limit::window::Nanos;
use crate::limit::{Headroom, LimitSet, Taken};
use crate::shadow::{Subject, WouldBlock};
use crate::state::Grant;
use std::sync::Arc;
use std::time::Duration;

/// Room reserved for one request in every layer it matches.
pub struct Reservation {
    shared: Arc<Shared>,
    taken: Option<Taken>,
    headroom: Option<Headroom>,
    /// Shadow layers that would have held it back (see [`crate::shadow`]).
    shadow: Vec<WouldBlock>,
    /// Job slots of a job's creation; given back if dropped unkept.
    jobs: Option<JobHold>,
    /// Set by the queue once the request is admitted.
    pub(super) waited: Duration,
}

impl Reservation {
    pub(super) fn new(
        shared: Arc<Shared>,
        grant: Grant,
        jobs: Option<JobHold>,
        waited: Duration,
    ) -> Self {
        Reservation {
            shared,
            taken: Some(grant.taken),
            headroom: grant.headroom,
            shadow: grant.shadow,
            jobs,
            waited,
        }
    }

    /// Notes an upstream pause of `left` that shadow mode did not keep.
    pub(super) fn with_pause(mut self, pause: Option<&PauseKey>, left: Option<Nanos>) -> Self {
        if let (Some((upstream, _)), Some(left)) = (pause, left) {
            self.shadow.push(WouldBlock {
                subject: Subject::Pause(*upstream),
                wait: Some(left),
            });
        }
        self
    }

    /// What shadow limits and pauses would have done with this request: the layers that
    /// had no room, and how long until they would have.
    pub fn shadow(&self) -> &[WouldBlock] {
        &self.shadow
    }

    /// The job slots a job's creation holds, for its answer to keep or give back.
    pub fn take_jobs(&mut self) -> Option<JobHold> {
        self.jobs.take()
    }

    /// How long the request waited in the queue.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// `RateLimit-Policy` and `RateLimit` values for the tightest layer.
    pub fn headers(&self) -> Option<(String, String)> {
        self.headroom
            .as_ref()
            .map(|h| headroom_headers(&self.shared.set, h))
    }

    /// The request is being sent: its sends stay counted; concurrency is held by the
    /// returned permit until the response is done.
    pub fn commit(mut self) -> Permit {
        Permit {
            shared: self.shared.clone(),
            taken: self.taken.take(),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(taken) = self.taken.take() {
            self.shared.backend.refund(&taken);
            self.shared.wake.notify_one();
        }
    }
}

/// Concurrency held by a request in flight; released on drop.
pub struct Permit {
    shared: Arc<Shared>,
    taken: Option<Taken>,
}

impl Permit {
    /// The request was answered without being sent (an identical request's answer, see
    /// [`crate::cache`]): its place in every window is given back, as if never admitted.
    pub fn unsent(&mut self) {
        if let Some(taken) = self.taken.take() {
            self.shared.backend.refund(&taken);
            self.shared.wake.notify_one();
        }
    }

    /// The upstream has begun to answer: count the send from now (see `Ledger::resend`).
    pub fn answered(&self) {
        if let Some(taken) = &self.taken {
            self.shared.backend.answered(taken);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(taken) = self.taken.take() {
            let holds = taken
                .layers
                .iter()
                .any(|l| self.shared.set.specs[l.limit].concurrency.is_some());
            self.shared.backend.release(&taken);
            if holds {
                self.shared.wake.notify_one();
            }
        }
    }
}

/// Header values describing the room left in one layer.
pub fn headroom_headers(set: &LimitSet, h: &Headroom) -> (String, String) {
    let spec = &set.specs[h.limit];
    (
        format!(
            "\"{}\";q={};w={}",
            spec.name,
            h.quota,
            spec.per.as_secs().max(1)
        ),
        format!(
            "\"{}\";r={};t={}",
            spec.name,
            h.remaining,
            ceil_secs(h.reset)
        ),
    )
}

/// Whole seconds, rounded up.
pub(super) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}
