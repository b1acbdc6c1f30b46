//! Async job slots at run time: the [`JobBook`] behind a lock, on the queue's clock, and
//! the [`JobHold`] an admitted creation carries until its answer says whether a job runs.
//!
//! Job slots are kept in this process whatever the counter backend: with Redis each
//! replica admits its own `jobs` (`check-config` and startup say so). Every change that
//! frees a slot wakes the scheduler, and a timer wakes it when the next slot's `job_ttl`
//! passes, so waiting creations never depend on polling.

use super::Shared;
use crate::limit::jobs::{JobBook, JobKey, JobTicket};
use crate::limit::window::Nanos;
use crate::limit::{Blocked, Demand, LayerKey};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// The job book of one admission controller.
pub(super) struct JobSlots {
    book: Mutex<JobBook>,
    /// The deadline a wake-up timer is already set for.
    timer: Mutex<Option<Nanos>>,
}

impl JobSlots {
    pub(super) fn new(max_keys: usize) -> Self {
        JobSlots {
            book: Mutex::new(JobBook::new(max_keys)),
            timer: Mutex::new(None),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, JobBook> {
        // Plain bookkeeping, consistent per call: after a panic elsewhere keep using it.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Shared {
    /// Takes the job slots `demand` needs (see [`JobBook::try_take`]); a creation that
    /// cannot have them waits for a finish, a refund, or the next `job_ttl` to pass.
    pub(super) fn take_jobs(
        self: &Arc<Self>,
        demand: &Demand,
        ahead: &[u64],
    ) -> Result<Option<JobHold>, Blocked> {
        if !self.has_jobs {
            return Ok(None);
        }
        let now = self.clock.now();
        let ahead_of = |l: &LayerKey| {
            let i = demand.layers.iter().position(|x| x == l);
            i.and_then(|i| ahead.get(i).copied()).unwrap_or(0)
        };
        let taken = self.jobs.lock().try_take(&self.set, now, demand, &ahead_of);
        match taken {
            Ok(ticket) => Ok(ticket.map(|t| JobHold {
                shared: self.clone(),
                ticket: Some(t),
            })),
            Err(b) => {
                self.wake_at_next_deadline();
                Err(b)
            }
        }
    }

    /// Makes sure the scheduler looks again when the next slot frees itself.
    fn wake_at_next_deadline(self: &Arc<Self>) {
        let Some(deadline) = self.jobs.lock().next_deadline() else {
            return;
        };
        {
            let mut timer = self.jobs.timer.lock().unwrap_or_else(|p| p.into_inner());
            if timer.is_some_and(|t| t <= deadline) {
                return;
            }
            *timer = Some(deadline);
        }
        let at = self.clock.instant(deadline);
        let weak: Weak<Shared> = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            if let Some(shared) = weak.upgrade() {
                let mut timer = shared.jobs.timer.lock().unwrap_or_else(|p| p.into_inner());
                if *timer == Some(deadline) {
                    *timer = None;
                }
                drop(timer);
                shared.wake.notify_one();
            }
        });
    }

    /// Wakes the scheduler when slots were freed.
    fn freed(&self, done: bool) {
        if done {
            self.wake.notify_one();
        }
    }
}

/// The job slots an admitted creation holds until its answer is read: [`JobHold::keep`]
/// them under the job's id, or drop the hold to give them back.
pub struct JobHold {
    shared: Arc<Shared>,
    ticket: Option<JobTicket>,
}

impl JobHold {
    /// The upstream created `job`: its slots stay until it finishes or its `job_ttl` passes.
    pub fn keep(mut self, job: JobKey) {
        if let Some(ticket) = self.ticket.take() {
            self.shared.jobs.lock().keep(ticket, job);
        }
    }
}

impl JobHold {
    /// Gives the slots back without waking the scheduler: the hold never left
    /// [`Shared::take`], which found no room elsewhere.
    pub(super) fn untake(mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.shared.jobs.lock().refund(ticket);
        }
    }
}

impl Drop for JobHold {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.shared.jobs.lock().refund(ticket);
            self.shared.freed(true);
        }
    }
}

impl super::Admission {
    /// True when `job` holds job slots here (its status and `DELETE` answers matter).
    pub fn holds_job(&self, job: &JobKey) -> bool {
        self.shared.has_jobs && self.shared.jobs.lock().holds(job)
    }

    /// `job` was seen finishing (a final status, a `DELETE`): its slots are free.
    pub fn job_finished(&self, job: &JobKey) -> bool {
        let done = self.shared.has_jobs && self.shared.jobs.lock().finish(job);
        self.shared.freed(done);
        done
    }

    /// Running jobs of every job-limit key that has any.
    pub fn jobs_usage(&self) -> Vec<(LayerKey, u64)> {
        if !self.shared.has_jobs {
            return Vec::new();
        }
        let now = self.shared.clock.now();
        let mut book = self.shared.jobs.lock();
        book.sweep(now);
        book.usage()
    }
}

#[cfg(test)]
mod tests;
