//! Reading the Usage API's answers, which are untrusted: ids are checked before they
//! become paths or labels, counts clamped, malformed entries skipped, the number of
//! clients capped.

use serde_json::Value;
use std::collections::BTreeMap;

/// Longest client or execution id accepted (Genesys ids are 36-character UUIDs).
const MAX_ID: usize = 64;

/// Longest client name kept, in characters.
const MAX_NAME: usize = 128;

/// Highest count believed (no organization sends 10^15 requests a day).
pub const MAX_COUNT: u64 = 1_000_000_000_000_000;

/// How far the Usage API has got with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryStatus {
    Running,
    Complete,
    Failed,
}

/// True for an id that is safe as a path segment and a label value: 1 to 64 ASCII
/// letters, digits, `-`, `_` or `.` (not `.` or `..`).
pub fn client_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A name as a label value: control characters dropped, trimmed, at most 128 characters;
/// `None` when nothing is left.
pub fn clean_name(raw: &str) -> Option<String> {
    let name: String = raw
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_NAME)
        .collect();
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// The `executionId` of a query's answer, if it is a safe id.
pub fn execution_id(answer: &Value) -> Option<String> {
    let id = answer.get("executionId")?.as_str()?;
    client_id_ok(id).then(|| id.to_string())
}

/// A count as the API sent it: a non-negative integer (or a float, rounded down), at most
/// [`MAX_COUNT`].
fn count(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n.min(MAX_COUNT));
    }
    let f = v.as_f64().filter(|f| f.is_finite() && *f >= 0.0)?;
    Some((f.min(MAX_COUNT as f64)) as u64)
}

/// A results answer: its status and, per valid client id, the sum of its `requests`
/// (at most `max_keys` clients; entries beyond, or malformed, are skipped).
pub fn results(answer: &Value, max_keys: usize) -> (QueryStatus, BTreeMap<String, u64>) {
    let status = match answer.get("queryStatus").and_then(Value::as_str) {
        Some("Complete") => QueryStatus::Complete,
        Some("Failed") => QueryStatus::Failed,
        _ => QueryStatus::Running,
    };
    let mut counts = BTreeMap::new();
    if status != QueryStatus::Complete {
        return (status, counts);
    }
    let entries = answer
        .get("results")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for e in entries {
        let Some(id) = e
            .get("clientId")
            .and_then(Value::as_str)
            .filter(|id| client_id_ok(id))
        else {
            continue;
        };
        let Some(n) = e.get("requests").and_then(count) else {
            continue;
        };
        if counts.len() >= max_keys && !counts.contains_key(id) {
            continue;
        }
        let total: &mut u64 = counts.entry(id.to_string()).or_default();
        *total = total.saturating_add(n).min(MAX_COUNT);
    }
    (status, counts)
}

/// The `name` of a `GET /api/v2/oauth/clients/{id}` answer, cleaned.
pub fn client_name(answer: &Value) -> Option<String> {
    clean_name(answer.get("name")?.as_str()?)
}
