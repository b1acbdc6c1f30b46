//! Use per app within each client since start, for `/status` and the live page: requests
//! sent upstream, shed by pacer and answered 429 by the upstream, per upstream, client
//! label and app. Keys are bounded labels already; even so at most [`MAX_APP_SERIES`]
//! are kept and the rest count under the app `other`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Upstream, client and app triples kept before new ones count as app `other`.
pub const MAX_APP_SERIES: usize = 4096;

/// What one app of one client did.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AppCounts {
    /// Requests sent upstream.
    pub forwarded: u64,
    /// Requests pacer shed.
    pub shed: u64,
    /// Upstream 429 answers.
    pub upstream_429: u64,
}

/// One app's use within its client, with its share of the client's.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AppSeries {
    pub upstream: String,
    pub client: String,
    pub app: String,
    #[serde(flatten)]
    pub counts: AppCounts,
    /// Its part of the client's forwarded requests, 0 to 1.
    pub share: f64,
}

type Key = (Arc<str>, Arc<str>, Arc<str>);

/// Use per app within each client.
#[derive(Default)]
pub struct AppUse {
    series: Mutex<HashMap<Key, AppCounts>>,
}

impl AppUse {
    /// Adds `add` to the triple's counts (no allocation once the triple is known).
    pub fn record(&self, upstream: &Arc<str>, client: &Arc<str>, app: &Arc<str>, add: AppCounts) {
        let mut key: Key = (upstream.clone(), client.clone(), app.clone());
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if series.len() >= MAX_APP_SERIES && !series.contains_key(&key) {
            key.2 = Arc::from(crate::identity::app::OTHER_APP);
        }
        let c = series.entry(key).or_default();
        c.forwarded += add.forwarded;
        c.shed += add.shed;
        c.upstream_429 += add.upstream_429;
    }

    /// Every triple, sorted by upstream, client and app.
    pub fn snapshot(&self) -> Vec<AppSeries> {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut per_client: HashMap<(&str, &str), u64> = HashMap::new();
        for ((u, c, _), n) in series.iter() {
            *per_client.entry((u, c)).or_default() += n.forwarded;
        }
        let mut out: Vec<AppSeries> = series
            .iter()
            .map(|((u, c, a), n)| {
                let total = per_client.get(&(&**u, &**c)).copied().unwrap_or(0);
                AppSeries {
                    upstream: u.to_string(),
                    client: c.to_string(),
                    app: a.to_string(),
                    counts: *n,
                    share: if total == 0 {
                        0.0
                    } else {
                        n.forwarded as f64 / total as f64
                    },
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.upstream, &a.client, &a.app).cmp(&(&b.upstream, &b.client, &b.app)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_within_a_client_and_bounded_series() {
        let u = use_of(&[
            ("crm", "export", 3),
            ("crm", "sync", 1),
            ("ivr", "flows", 2),
        ]);
        let s = u.snapshot();
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].app.as_str(), s[0].share), ("export", 0.75));
        assert_eq!(s[2].share, 1.0);
        let (api, crm): (Arc<str>, Arc<str>) = (Arc::from("api"), Arc::from("crm"));
        for i in 0..MAX_APP_SERIES * 2 {
            let app: Arc<str> = Arc::from(format!("a{i}").as_str());
            let add = AppCounts {
                shed: 1,
                ..AppCounts::default()
            };
            u.record(&api, &crm, &app, add);
        }
        let s = u.snapshot();
        assert_eq!(s.len(), MAX_APP_SERIES + 1);
        let other = s.iter().find(|s| s.app == "other").unwrap();
        assert!(other.counts.shed >= MAX_APP_SERIES as u64);
    }

    fn use_of(rows: &[(&str, &str, u64)]) -> AppUse {
        let u = AppUse::default();
        for (client, app, n) in rows {
            let add = AppCounts {
                forwarded: *n,
                ..AppCounts::default()
            };
            u.record(
                &Arc::from("api"),
                &Arc::from(*client),
                &Arc::from(*app),
                add,
            );
        }
        u
    }
}
