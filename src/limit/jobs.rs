//! Async job slots: the pure book of the jobs running under each `jobs = N` key.
//!
//! A creation takes a slot in every job limit it matches at admission
//! ([`JobBook::try_take`]), all or nothing. The slot is kept under the job's id once the
//! upstream's answer names one ([`JobBook::keep`]) or given back ([`JobBook::refund`]), and
//! freed when the job is seen finishing ([`JobBook::finish`]) or its `job_ttl` passes.
//! Time is passed in; there is no clock and no lock here ([`crate::queue::jobs`] adds them).

use super::window::Nanos;
use super::{BlockKind, Blocked, Demand, LayerKey, LimitSet};
use std::collections::HashMap;
use std::sync::Arc;

/// A job as the upstream names it: the upstream's index and the job's id.
pub type JobKey = (usize, Arc<str>);

/// The slots one admitted creation holds until they are kept or refunded.
#[derive(Debug, PartialEq, Eq)]
pub struct JobTicket(u64);

#[derive(Debug)]
struct Entry {
    layers: Vec<LayerKey>,
    /// When the slots free themselves: the shortest `job_ttl` of its layers after taking.
    deadline: Nanos,
    job: Option<JobKey>,
}

/// Running jobs per key. Bounded: a key holds at most its limit's `jobs` slots, and at
/// most `max_keys` keys hold any.
#[derive(Debug)]
pub struct JobBook {
    entries: HashMap<u64, Entry>,
    per_key: HashMap<LayerKey, Vec<u64>>,
    by_job: HashMap<JobKey, u64>,
    max_keys: usize,
    seq: u64,
}

impl JobBook {
    /// An empty book holding slots under at most `max_keys` keys.
    pub fn new(max_keys: usize) -> Self {
        JobBook {
            entries: HashMap::new(),
            per_key: HashMap::new(),
            by_job: HashMap::new(),
            max_keys: max_keys.max(1),
            seq: 0,
        }
    }

    /// Takes a slot in every job layer of `demand`, or says which one is full. `ahead`
    /// counts the creations waiting before this one on a layer. `Ok(None)`: the demand
    /// matches no job limit.
    pub fn try_take(
        &mut self,
        set: &LimitSet,
        now: Nanos,
        demand: &Demand,
        ahead: &dyn Fn(&LayerKey) -> u64,
    ) -> Result<Option<JobTicket>, Blocked> {
        let mut layers = Vec::new();
        let mut deadline = Nanos::MAX;
        for layer in &demand.layers {
            let spec = &set.specs[layer.limit];
            let Some(cap) = spec.jobs else { continue };
            self.expire(layer, now);
            let new_key = !self.per_key.contains_key(layer);
            if new_key && self.per_key.len() >= self.max_keys {
                self.sweep(now);
            }
            let full_book = new_key && self.per_key.len() >= self.max_keys;
            if full_book || self.running(layer).saturating_add(ahead(layer)) >= cap {
                return Err(Blocked {
                    kind: BlockKind::Layer(layer.clone()),
                    wait: None,
                });
            }
            layers.push(layer.clone());
            deadline = deadline.min(now.saturating_add(spec.job_ttl));
        }
        if layers.is_empty() {
            return Ok(None);
        }
        self.seq += 1;
        let id = self.seq;
        for layer in &layers {
            self.per_key.entry(layer.clone()).or_default().push(id);
        }
        self.entries.insert(
            id,
            Entry {
                layers,
                deadline,
                job: None,
            },
        );
        Ok(Some(JobTicket(id)))
    }

    /// The creation was answered with a job id: its slots stay until the job finishes.
    /// False when they expired meanwhile. An id the book already holds is a job the
    /// upstream reports again: its older slots are freed.
    pub fn keep(&mut self, ticket: JobTicket, job: JobKey) -> bool {
        if !self.entries.contains_key(&ticket.0) {
            return false;
        }
        if let Some(old) = self.by_job.insert(job.clone(), ticket.0) {
            if old != ticket.0 {
                self.remove(old);
            }
        }
        if let Some(e) = self.entries.get_mut(&ticket.0) {
            e.job = Some(job);
        }
        true
    }

    /// The creation failed (or its answer was lost): its slots are free again.
    pub fn refund(&mut self, ticket: JobTicket) {
        self.remove(ticket.0);
    }

    /// True when `job` holds slots.
    pub fn holds(&self, job: &JobKey) -> bool {
        self.by_job.contains_key(job)
    }

    /// The job finished or was deleted: its slots are free. False when it held none.
    pub fn finish(&mut self, job: &JobKey) -> bool {
        match self.by_job.remove(job) {
            Some(id) => {
                self.remove(id);
                true
            }
            None => false,
        }
    }

    /// Jobs running under `layer`.
    pub fn running(&self, layer: &LayerKey) -> u64 {
        self.per_key.get(layer).map_or(0, |ids| ids.len() as u64)
    }

    /// Time from `now` until the first slot of `layer` frees itself (its `job_ttl`).
    pub fn opens_in(&self, layer: &LayerKey, now: Nanos) -> Option<Nanos> {
        self.per_key
            .get(layer)?
            .iter()
            .filter_map(|id| self.entries.get(id))
            .map(|e| e.deadline.saturating_sub(now))
            .min()
    }

    /// When the next slot of any key frees itself.
    pub fn next_deadline(&self) -> Option<Nanos> {
        self.entries.values().map(|e| e.deadline).min()
    }

    /// Frees every slot whose `job_ttl` has passed; returns the slots left.
    pub fn sweep(&mut self, now: Nanos) -> usize {
        let expired: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            self.remove(id);
        }
        self.entries.len()
    }

    /// Running jobs of every key that has any.
    pub fn usage(&self) -> Vec<(LayerKey, u64)> {
        self.per_key
            .iter()
            .map(|(k, ids)| (k.clone(), ids.len() as u64))
            .collect()
    }

    /// True when `layer` holds a slot.
    pub fn has(&self, layer: &LayerKey) -> bool {
        self.per_key.contains_key(layer)
    }

    /// Keys holding slots.
    pub fn key_count(&self) -> usize {
        self.per_key.len()
    }

    fn expire(&mut self, layer: &LayerKey, now: Nanos) {
        let expired: Vec<u64> = self
            .per_key
            .get(layer)
            .into_iter()
            .flatten()
            .filter(|id| self.entries.get(id).is_none_or(|e| e.deadline <= now))
            .copied()
            .collect();
        for id in expired {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        for layer in &entry.layers {
            if let Some(ids) = self.per_key.get_mut(layer) {
                ids.retain(|&x| x != id);
                if ids.is_empty() {
                    self.per_key.remove(layer);
                }
            }
        }
        if let Some(job) = entry.job {
            if self.by_job.get(&job) == Some(&id) {
                self.by_job.remove(&job);
            }
        }
    }
}

#[cfg(test)]
mod tests;
