//! Caller deadlines: `x-pacer-max-wait` says how long a caller is willing to wait in
//! pacer's queue, so that a caller with a short timeout of its own (a Genesys Data Action)
//! gets a prompt 429 with a truthful `Retry-After` instead of timing out inside pacer.
//!
//! The header lowers the route's `max_wait` (or `[queue] max_wait`) for that request and
//! never raises it. The guard reads it (a malformed value is 400, naming the header, before
//! the request costs a token look-up or a queue place), removes it (it is pacer's own and
//! never reaches an upstream) and leaves the value in the request's extensions as a
//! [`CallerMaxWait`]; the admission phase bounds the wait with [`bound`].
//!
//! Accepted values: a non-negative decimal number of seconds with an optional unit,
//! `2.5`, `2.5s`, `500ms`, `0`. `0` means "do not wait": a request that cannot be admitted
//! at once is shed at once. A value at or above the route's `max_wait` changes nothing.

use crate::error::{ErrorKind, ProxyError};
use http::HeaderMap;
use std::time::Duration;

/// The request header a caller sets its deadline with.
pub const HEADER: &str = "x-pacer-max-wait";

/// The answer to a value pacer cannot read.
const MALFORMED: &str =
    "x-pacer-max-wait must be one non-negative duration such as 2.5s, 500ms or 2.5 (seconds)";

/// Longest value read; anything longer is malformed (`86400000ms` is 10 characters).
const MAX_LEN: usize = 32;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// The longest a caller is willing to wait in pacer's queue, from [`HEADER`]; put in the
/// request's extensions by the guard, read by the admission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerMaxWait(pub Duration);

/// Takes [`HEADER`] out of `headers`: its value, `None` when the caller sent none, or a
/// 400 when it is malformed, negative or sent more than once.
pub fn take(headers: &mut HeaderMap) -> Result<Option<CallerMaxWait>, ProxyError> {
    if !headers.contains_key(HEADER) {
        return Ok(None);
    }
    let mut values = headers.get_all(HEADER).iter();
    let first = values.next();
    let parsed = match (first, values.next()) {
        (Some(v), None) => v.to_str().ok().and_then(parse),
        _ => None,
    };
    headers.remove(HEADER);
    match parsed {
        Some(d) => Ok(Some(CallerMaxWait(d))),
        None => Err(ProxyError::new(ErrorKind::BadRequest(MALFORMED), MALFORMED)),
    }
}

/// The wait a request may have: the configured `max_wait`, lowered (never raised) by the
/// caller's own.
pub fn bound(configured: Duration, caller: Option<CallerMaxWait>) -> Duration {
    match caller {
        Some(CallerMaxWait(d)) => d.min(configured),
        None => configured,
    }
}

/// Reads `2.5`, `2.5s` or `500ms`: digits with an optional fraction, in seconds unless
/// `ms` follows. Nothing else (no sign, exponent, spaces inside or other units). A value
/// too large for a [`Duration`] is [`Duration::MAX`]: it asks for no lower bound.
pub fn parse(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.len() > MAX_LEN {
        return None;
    }
    let (number, unit) = match value.strip_suffix("ms") {
        Some(n) => (n, NANOS_PER_SEC / 1000),
        None => (value.strip_suffix('s').unwrap_or(value), NANOS_PER_SEC),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return None;
    }
    // At most MAX_LEN digits: the whole part fits a u128; the fraction counts to 1 ns.
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut billionths: u128 = 0;
    for i in 0..9 {
        let d = fraction
            .as_bytes()
            .get(i)
            .map_or(0, |b| u128::from(b - b'0'));
        billionths = billionths * 10 + d;
    }
    let nanos = whole
        .checked_mul(unit)
        .and_then(|n| n.checked_add(billionths * unit / NANOS_PER_SEC))
        .unwrap_or(u128::MAX);
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    if secs == u64::MAX {
        return Some(Duration::MAX);
    }
    // Below one second's worth of nanoseconds: fits.
    let sub = (nanos % NANOS_PER_SEC) as u32;
    Some(Duration::new(secs, sub))
}

#[cfg(test)]
mod tests;
