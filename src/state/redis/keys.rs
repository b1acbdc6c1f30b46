//! The names of pacer's Redis keys. Every key carries the `{prefix}` hash tag, so all keys
//! of one admission live in one slot of a Redis Cluster.

use crate::limit::{Demand, KeyPart, LayerKey, LimitSet};
use std::sync::Arc;

/// Names keys under one prefix for one set of limits.
pub(super) struct Keys {
    prefix: String,
    set: Arc<LimitSet>,
}

impl Keys {
    /// Keys under `{prefix}` for the limits of `set`.
    pub fn new(prefix: String, set: Arc<LimitSet>) -> Self {
        Keys { prefix, set }
    }

    /// A layer's rate key (a sorted set of send times) or, with `concurrency`, its cap's
    /// key (a sorted set of leases scored by their expiry).
    pub fn layer(&self, layer: &LayerKey, concurrency: bool) -> String {
        let spec = &self.set.specs[layer.limit];
        let part = match &layer.part {
            KeyPart::Global => "g".to_string(),
            KeyPart::Client(c) => format!("c:{c}"),
            KeyPart::Endpoint(e) => format!("e:{e}"),
            KeyPart::ClientEndpoint(c, e) => format!("ce:{c}|{e}"),
        };
        let kind = if concurrency { "c" } else { "r" };
        format!(
            "{{{}}}:{kind}:{}:{}:{part}",
            self.prefix, layer.limit, spec.name
        )
    }

    /// The keys one admission touches, in script order: (layer, is it the cap's key).
    pub fn admission(&self, demand: &Demand) -> Vec<(LayerKey, bool)> {
        let mut keys = Vec::with_capacity(demand.layers.len());
        for layer in &demand.layers {
            let spec = &self.set.specs[layer.limit];
            if spec.ceilings.is_some() {
                keys.push((layer.clone(), false));
            }
            if spec.concurrency.is_some() {
                keys.push((layer.clone(), true));
            }
        }
        keys
    }

    /// The concurrency keys of `layers`.
    pub fn concurrency(&self, layers: &[LayerKey]) -> Vec<String> {
        layers
            .iter()
            .filter(|l| self.set.specs[l.limit].concurrency.is_some())
            .map(|l| self.layer(l, true))
            .collect()
    }

    /// The rate keys of `layers`.
    pub fn rate(&self, layers: &[LayerKey]) -> Vec<String> {
        layers
            .iter()
            .filter(|l| self.set.specs[l.limit].ceilings.is_some())
            .map(|l| self.layer(l, false))
            .collect()
    }

    /// Sorted set of live replicas, scored by their last heartbeat (ms).
    pub fn replicas(&self) -> String {
        format!("{{{}}}:replicas", self.prefix)
    }

    /// Hash of the clients' shared adaptive states: field `upstream:client`, value
    /// `expiry_ms|state`.
    pub fn adaptive(&self) -> String {
        format!("{{{}}}:adaptive", self.prefix)
    }

    /// Sorted set of the keys critical traffic reached, scored by when (ms, Redis time).
    pub fn critical(&self) -> String {
        format!("{{{}}}:critical", self.prefix)
    }

    /// The key whose existence pauses a caller's upstream.
    pub fn pause(&self, name: &str) -> String {
        format!("{{{}}}:pause:{name}", self.prefix)
    }
}
