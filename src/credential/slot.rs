//! One credential's cached token: handed out until its refresh time, fetched by one
//! caller at a time (single flight), dropped by [`Slot::invalidate`] after an upstream 401.
//! The fetch itself is a closure, so the timing is tested without a network.

use super::{CredentialError, Token};
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// A failed exchange is answered to callers for this long without another attempt, so a
/// crowd of callers behind a broken login costs one exchange, not one each.
pub(super) const FAILURE_HOLD: Duration = Duration::from_secs(1);

/// Lifetime assumed for a token answer without a usable `expires_in`.
pub(super) const UNKNOWN_LIFETIME: Duration = Duration::from_secs(60);

/// A token is dropped after an upstream 401 at most once in this long, so an upstream
/// that refuses every token costs one exchange a second, not one per request.
pub(super) const INVALIDATE_HOLD: Duration = Duration::from_secs(1);

/// The least `refresh_before` by default (10% of the lifetime otherwise).
pub(super) const MIN_DEFAULT_REFRESH: Duration = Duration::from_secs(60);

/// How long before expiry a token of `lifetime` is fetched again: `refresh_before`, else
/// 10% of the lifetime but at least 60 s; never more than half the lifetime.
pub(super) fn refresh_margin(lifetime: Duration, refresh_before: Option<Duration>) -> Duration {
    let wanted = refresh_before.unwrap_or_else(|| (lifetime / 10).max(MIN_DEFAULT_REFRESH));
    wanted.min(lifetime / 2)
}

struct Cached {
    token: Token,
    /// From here on the next caller fetches a new token.
    refresh_at: Instant,
    /// From here on the token is not handed out at all.
    expires: Instant,
}

#[derive(Default)]
struct State {
    token: Option<Cached>,
    failed: Option<(Instant, CredentialError)>,
    /// When an upstream's 401 last dropped the token.
    invalidated: Option<Instant>,
}

/// A credential's token cache and its single-flight lock.
#[derive(Default)]
pub(super) struct Slot {
    state: Mutex<State>,
    flight: tokio::sync::Mutex<()>,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached token while it is before its refresh time (`fresh`) or before expiry.
    fn cached(&self, now: Instant, fresh: bool) -> Option<Token> {
        let state = self.state();
        let c = state.token.as_ref()?;
        let until = if fresh { c.refresh_at } else { c.expires };
        (now < until).then(|| c.token.clone())
    }

    /// The token: the cached one until its refresh time; else one caller runs `fetch`
    /// (returning the token and its lifetime) while the others wait for its result, or
    /// keep using the cached token while it has not expired.
    pub(super) async fn get<F, Fut>(
        &self,
        refresh_before: Option<Duration>,
        fetch: F,
    ) -> Result<Token, CredentialError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Token, Option<Duration>), CredentialError>>,
    {
        if let Some(t) = self.cached(Instant::now(), true) {
            return Ok(t);
        }
        let _leader = match self.flight.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                // A refresh is under way: the old token still works until it expires.
                if let Some(t) = self.cached(Instant::now(), false) {
                    return Ok(t);
                }
                self.flight.lock().await
            }
        };
        let now = Instant::now();
        if let Some(t) = self.cached(now, true) {
            return Ok(t);
        }
        let held = self
            .state()
            .failed
            .as_ref()
            .filter(|(at, _)| now.saturating_duration_since(*at) < FAILURE_HOLD)
            .map(|(_, e)| e.clone());
        if let Some(e) = held {
            return self.cached(now, false).ok_or(e);
        }
        match fetch().await {
            Ok((token, lifetime)) => {
                let lifetime = lifetime.unwrap_or(UNKNOWN_LIFETIME);
                let now = Instant::now();
                // The lifetime is clamped by `issued_token`; an `Instant` that cannot be
                // that far ahead still must not panic.
                let expires = now.checked_add(lifetime).unwrap_or(now);
                let margin = refresh_margin(lifetime, refresh_before);
                let refresh_at = expires.checked_sub(margin).unwrap_or(now);
                let mut state = self.state();
                state.failed = None;
                state.token = Some(Cached {
                    token: token.clone(),
                    refresh_at,
                    expires,
                });
                Ok(token)
            }
            Err(e) => {
                self.state().failed = Some((Instant::now(), e.clone()));
                // A refresh that failed early leaves the old token usable until expiry.
                self.cached(Instant::now(), false).ok_or(e)
            }
        }
    }

    /// What `/status` shows of the slot at `now`: the token's state, seconds until it is
    /// fetched again and until it expires, and the last exchange's failure while it is
    /// held. Never the token itself.
    pub(super) fn report(&self, now: Instant) -> serde_json::Value {
        let state = self.state();
        let left = |at: Instant| at.saturating_duration_since(now).as_secs();
        let (token, refresh_in, expires_in) = match &state.token {
            Some(c) if now < c.expires => {
                ("valid", Some(left(c.refresh_at)), Some(left(c.expires)))
            }
            Some(_) => ("expired", None, None),
            None => ("none", None, None),
        };
        serde_json::json!({
            "token": token,
            "refresh_in_seconds": refresh_in,
            "expires_in_seconds": expires_in,
            "last_error": state.failed.as_ref().map(|(_, e)| e.to_string()),
        })
    }

    /// Drops the cached token if it is still `token` (the one an upstream refused), so the
    /// next caller fetches a new one; true when it did. Callers that got the same 401
    /// concurrently cause one refresh between them, and a token is dropped at most once
    /// per [`INVALIDATE_HOLD`].
    pub(super) fn invalidate(&self, token: &Token) -> bool {
        let now = Instant::now();
        let mut state = self.state();
        let recently = state
            .invalidated
            .is_some_and(|at| now.saturating_duration_since(at) < INVALIDATE_HOLD);
        if !recently && state.token.as_ref().is_some_and(|c| c.token == *token) {
            state.token = None;
            state.failed = None;
            state.invalidated = Some(now);
            true
        } else {
            false
        }
    }
}
