//! The simulator's limit state: pure, time comes in as `now`, decisions come out.
//!
//! It plays the upstream's *exact* sliding count: a request is admitted only if every
//! limit that matches it has room, and only then recorded in all of them, so a 429'd
//! request counts nowhere. It counts with its own [`Timestamps`], not pacer's limiter
//! code, so that each checks the other.

use std::collections::HashMap;
use std::time::Duration;

use rand::distributions::{Alphanumeric, DistString};

use super::config::{Scope, SimConfig};
use super::count::Timestamps;
use super::stats::SimStats;
use crate::limit::window::Nanos;

/// Waiting out a full concurrency cap: Genesys answers it with a plain 429.
const CONCURRENCY_WAIT: Nanos = 1_000_000_000;

/// Length of an issued access token.
const TOKEN_LEN: usize = 48;

/// Tokens kept before expired ones are swept out.
const TOKEN_SWEEP_MIN: usize = 1024;

/// Limit state of one simulated org.
#[derive(Debug)]
pub(crate) struct Core {
    window: Nanos,
    token_ttl: Nanos,
    client_requests: u64,
    org_requests: u64,
    token_requests: u64,
    client_concurrency: u64,
    clients: HashMap<String, ClientState>,
    org: Timestamps,
    endpoints: Vec<EndpointState>,
    tokens: HashMap<String, Issued>,
    sweep_at: usize,
    inflight: u64,
    stats: SimStats,
}

#[derive(Debug, Default)]
struct ClientState {
    requests: Timestamps,
    tokens: Timestamps,
    inflight: u64,
}

#[derive(Debug)]
struct EndpointState {
    template: crate::endpoint::Template,
    requests: Option<u64>,
    window: Nanos,
    scope: Scope,
    concurrency: u64,
    keys: HashMap<String, KeyState>,
}

#[derive(Debug, Default)]
struct KeyState {
    log: Timestamps,
    inflight: u64,
}

#[derive(Debug)]
struct Issued {
    client: String,
    expires: Nanos,
}

/// The `inin-ratelimit-*` values of one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateHeaders {
    /// Requests counted in the client's window, this one included if admitted.
    pub count: u64,
    /// The client's limit per window.
    pub allowed: u64,
    /// Whole seconds until the oldest counted request leaves the window.
    pub reset_secs: u64,
}

/// An admitted request's hold on the concurrency caps; give it back with [`Core::release`].
#[derive(Debug)]
pub(crate) struct Ticket {
    client: String,
    endpoints: Vec<usize>,
}

/// The outcome of [`Core::admit`].
#[derive(Debug)]
pub(crate) struct Admission {
    /// `Ok` when admitted, else how long until every failing limit has room.
    pub decision: Result<Ticket, Duration>,
    pub headers: RateHeaders,
}

fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn endpoint_key(scope: Scope, client: &str) -> &str {
    match scope {
        Scope::Client => client,
        Scope::Org => "",
    }
}

impl Core {
    pub(crate) fn new(config: &SimConfig) -> Core {
        let window = nanos(config.window);
        Core {
            window,
            token_ttl: nanos(config.token_ttl),
            client_requests: config.client_requests,
            org_requests: config.org_requests,
            token_requests: config.token_requests,
            client_concurrency: config.client_concurrency,
            clients: HashMap::new(),
            org: Timestamps::default(),
            endpoints: config
                .endpoints
                .iter()
                .map(|e| EndpointState {
                    template: e.template.clone(),
                    requests: e.requests,
                    window: nanos(e.window(config.window)),
                    scope: e.scope,
                    concurrency: e.concurrency,
                    keys: HashMap::new(),
                })
                .collect(),
            tokens: HashMap::new(),
            sweep_at: TOKEN_SWEEP_MIN,
            inflight: 0,
            stats: SimStats::default(),
        }
    }

    /// Issues a token to an authenticated client, or says how long its issuance quota is full.
    pub(crate) fn issue_token(&mut self, client: &str, now: Nanos) -> Result<String, Duration> {
        let (window, ceiling) = (self.window, self.token_requests);
        let state = self.clients.entry(client.to_owned()).or_default();
        state.tokens.evict(now, window);
        let wait = state.tokens.wait_for_room(now, window, ceiling);
        if wait > 0 {
            return Err(Duration::from_nanos(wait));
        }
        state.tokens.record(now);
        if self.tokens.len() >= self.sweep_at {
            self.tokens.retain(|_, t| t.expires > now);
            self.sweep_at = (self.tokens.len() * 2).max(TOKEN_SWEEP_MIN);
        }
        let token = Alphanumeric.sample_string(&mut rand::thread_rng(), TOKEN_LEN);
        self.tokens.insert(
            token.clone(),
            Issued {
                client: client.to_owned(),
                expires: now.saturating_add(self.token_ttl),
            },
        );
        Ok(token)
    }

    /// The client a live bearer token was issued to.
    pub(crate) fn authenticate(&self, token: &str, now: Nanos) -> Option<&str> {
        self.tokens
            .get(token)
            .filter(|t| t.expires > now)
            .map(|t| t.client.as_str())
    }

    /// Checks every limit matching the request; records it in all of them only if all
    /// have room.
    pub(crate) fn admit(
        &mut self,
        client: &str,
        method: &str,
        path: &str,
        now: Nanos,
    ) -> Admission {
        let window = self.window;
        let mut wait: Nanos = 0;

        self.org.evict(now, window);
        wait = wait.max(self.org.wait_for_room(now, window, self.org_requests));

        let state = self.clients.entry(client.to_owned()).or_default();
        state.requests.evict(now, window);
        wait = wait.max(
            state
                .requests
                .wait_for_room(now, window, self.client_requests),
        );
        if self.client_concurrency > 0 && state.inflight >= self.client_concurrency {
            wait = wait.max(CONCURRENCY_WAIT);
        }

        let mut matched = Vec::new();
        let method = http::Method::from_bytes(method.as_bytes()).ok();
        for (i, e) in self.endpoints.iter_mut().enumerate() {
            if !method.as_ref().is_some_and(|m| e.template.matches(m, path)) {
                continue;
            }
            matched.push(i);
            let key = e
                .keys
                .entry(endpoint_key(e.scope, client).to_owned())
                .or_default();
            key.log.evict(now, e.window);
            if let Some(ceiling) = e.requests {
                wait = wait.max(key.log.wait_for_room(now, e.window, ceiling));
            }
            if e.concurrency > 0 && key.inflight >= e.concurrency {
                wait = wait.max(CONCURRENCY_WAIT);
            }
        }

        let decision = if wait > 0 {
            Err(Duration::from_nanos(wait))
        } else {
            self.org.record(now);
            state.requests.record(now);
            state.inflight += 1;
            for &i in &matched {
                let e = &mut self.endpoints[i];
                if let Some(key) = e.keys.get_mut(endpoint_key(e.scope, client)) {
                    if e.requests.is_some() {
                        key.log.record(now);
                    }
                    key.inflight += 1;
                }
            }
            Ok(Ticket {
                client: client.to_owned(),
                endpoints: matched,
            })
        };

        let reset = state
            .requests
            .oldest()
            .map(|oldest| oldest.saturating_add(window).saturating_sub(now))
            .unwrap_or(0);
        let headers = RateHeaders {
            count: state.requests.count(),
            allowed: self.client_requests,
            reset_secs: reset.div_ceil(1_000_000_000),
        };
        Admission { decision, headers }
    }

    /// Gives back an admitted request's hold on the concurrency caps.
    pub(crate) fn release(&mut self, ticket: Ticket) {
        if let Some(state) = self.clients.get_mut(&ticket.client) {
            state.inflight = state.inflight.saturating_sub(1);
        }
        for i in ticket.endpoints {
            if let Some(e) = self.endpoints.get_mut(i) {
                if let Some(key) = e.keys.get_mut(endpoint_key(e.scope, &ticket.client)) {
                    key.inflight = key.inflight.saturating_sub(1);
                }
            }
        }
    }

    /// An `/api/v2` request arrived (before any check).
    pub(crate) fn enter(&mut self) {
        self.inflight += 1;
        self.stats.max_inflight = self.stats.max_inflight.max(self.inflight);
    }

    /// An `/api/v2` request was answered or abandoned.
    pub(crate) fn leave(&mut self) {
        self.inflight = self.inflight.saturating_sub(1);
    }

    /// Mutable access to the counters.
    pub(crate) fn stats_mut(&mut self) -> &mut SimStats {
        &mut self.stats
    }

    /// A copy of the counters.
    pub(crate) fn stats(&self) -> SimStats {
        self.stats.clone()
    }

    /// Empties every window and zeroes the counters; tokens and in-flight holds stay.
    pub(crate) fn reset(&mut self) {
        self.org = Timestamps::default();
        for c in self.clients.values_mut() {
            c.requests = Timestamps::default();
            c.tokens = Timestamps::default();
        }
        for e in &mut self.endpoints {
            for k in e.keys.values_mut() {
                k.log = Timestamps::default();
            }
        }
        self.stats = SimStats {
            max_inflight: self.inflight,
            ..SimStats::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    fn core(toml: &str) -> Core {
        Core::new(&SimConfig::from_toml_str(toml).unwrap())
    }

    fn admitted(c: &mut Core, client: &str, method: &str, path: &str, now: Nanos) -> bool {
        match c.admit(client, method, path, now).decision {
            Ok(t) => {
                c.release(t);
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn exactly_n_per_sliding_window() {
        let mut c = core("window = \"10s\"\nclient_requests = 3");
        for i in 0..3 {
            assert!(admitted(&mut c, "a", "GET", "/api/v2/users", i * S));
        }
        let a = c.admit("a", "GET", "/api/v2/users", 3 * S);
        assert_eq!(a.decision.unwrap_err(), Duration::from_secs(7));
        assert_eq!(
            a.headers,
            RateHeaders {
                count: 3,
                allowed: 3,
                reset_secs: 7
            }
        );
        // A refused request counts nowhere: the first slot frees at exactly 10s.
        assert!(!admitted(&mut c, "a", "GET", "/api/v2/users", 10 * S - 1));
        assert!(admitted(&mut c, "a", "GET", "/api/v2/users", 10 * S));
        assert!(!admitted(&mut c, "a", "GET", "/api/v2/users", 10 * S + 1));
        // Other clients have their own count.
        assert!(admitted(&mut c, "b", "GET", "/api/v2/users", 10 * S));
    }

    #[test]
    fn close_sends_are_not_merged() {
        // With merging, a burst at 0..1ms would all expire at 1ms + window.
        let mut c = core("window = \"1s\"\nclient_requests = 2");
        assert!(admitted(&mut c, "a", "GET", "/x", 0));
        assert!(admitted(&mut c, "a", "GET", "/x", 1_000_000));
        assert!(!admitted(&mut c, "a", "GET", "/x", S - 1));
        assert!(admitted(&mut c, "a", "GET", "/x", S));
    }

    #[test]
    fn org_and_endpoint_limits_layer() {
        let mut c = core(
            "window = \"10s\"\norg_requests = 4\n[[endpoint]]\nmatch = \"PUT /ivrs/{id}\"\nrequests = 1",
        );
        assert!(admitted(&mut c, "a", "PUT", "/ivrs/1", 0));
        assert!(!admitted(&mut c, "a", "PUT", "/ivrs/2", 0));
        assert!(admitted(&mut c, "b", "PUT", "/ivrs/2", 0));
        assert!(admitted(&mut c, "a", "GET", "/ivrs/2", 0));
        assert!(admitted(&mut c, "b", "GET", "/x", 0));
        assert!(!admitted(&mut c, "c", "GET", "/x", 0));
    }

    #[test]
    fn concurrency_caps_hold_until_release() {
        let mut c = core(
            "client_concurrency = 2\n[[endpoint]]\nmatch = \"POST /jobs\"\nscope = \"org\"\nconcurrency = 1",
        );
        let t1 = c.admit("a", "POST", "/jobs", 0).decision.unwrap();
        let refused = c.admit("b", "POST", "/jobs", 0).decision.unwrap_err();
        assert_eq!(refused, Duration::from_secs(1));
        let t2 = c.admit("a", "GET", "/x", 0).decision.unwrap();
        assert!(c.admit("a", "GET", "/x", 0).decision.is_err());
        c.release(t1);
        assert!(admitted(&mut c, "b", "POST", "/jobs", 0));
        c.release(t2);
        assert!(admitted(&mut c, "a", "GET", "/x", 0));
    }

    #[test]
    fn tokens_limit_expire_and_survive_reset() {
        let mut c = core("window = \"10s\"\ntoken_requests = 2\ntoken_ttl = \"5s\"");
        let t = c.issue_token("a", 0).unwrap();
        assert_ne!(c.issue_token("a", 0).unwrap(), t);
        assert_eq!(c.issue_token("a", S).unwrap_err(), Duration::from_secs(9));
        assert_eq!(c.authenticate(&t, S), Some("a"));
        assert_eq!(c.authenticate("nope", S), None);
        c.reset();
        assert_eq!(c.authenticate(&t, S), Some("a"));
        assert!(c.issue_token("a", S).is_ok());
        assert_eq!(c.authenticate(&t, 5 * S), None);
    }
}
