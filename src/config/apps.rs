//! `[[app]]` and the app-identity keys of `[identity]`, `[server]` and `[[route]]`: the
//! applications that share one OAuth client (see [`crate::identity::app`]).

use super::*;

/// Longest app name kept; longer caller values are cut to it.
pub const MAX_APP_NAME: usize = 64;

/// Learned app names at most, whatever `[identity] max_apps` says.
pub const MAX_LEARNED_APPS: usize = 10_000;

/// `[[app]]`: an application named ahead of time, with its share of a client's queue.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    /// The name callers give (header, route, `[server] app` or User-Agent product).
    pub name: String,
    /// Share of a busy client's queue relative to its other apps (default 1).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// True when `name` is a usable app name: 1 to [`MAX_APP_NAME`] characters of
/// `A-Z a-z 0-9 . _ -`.
pub fn app_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_APP_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Names pacer uses itself for apps; no `[[app]]` may take them.
const RESERVED: &[&str] = &["other", "unknown"];

impl Config {
    /// Adds every problem of the app settings to `errors`.
    pub(super) fn validate_apps(&self, errors: &mut Vec<ConfigError>) {
        let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
        let name_rule = format!("must be 1 to {MAX_APP_NAME} characters of A-Z a-z 0-9 . _ -");
        let mut names = HashSet::new();
        for (i, a) in self.apps.iter().enumerate() {
            let p = format!("app[{i}]");
            if !app_name_ok(&a.name) {
                err(format!("{p}.name"), name_rule.clone());
            } else if RESERVED.contains(&a.name.as_str()) {
                err(
                    format!("{p}.name"),
                    format!("{:?} is pacer's own name for apps it cannot tell", a.name),
                );
            } else if !names.insert(a.name.as_str()) {
                err(
                    format!("{p}.name"),
                    format!("duplicate app name {:?}", a.name),
                );
            }
            if !(a.weight.is_finite() && a.weight > 0.0 && a.weight <= 1000.0) {
                err(
                    format!("{p}.weight"),
                    "must be greater than 0 and at most 1000".into(),
                );
            }
        }
        let id = &self.identity;
        if http::HeaderName::from_bytes(id.app_header.as_bytes()).is_err() {
            err(
                "identity.app_header".into(),
                format!("{:?} is not a valid header name", id.app_header),
            );
        }
        if id.max_apps > MAX_LEARNED_APPS {
            err(
                "identity.max_apps".into(),
                format!("at most {MAX_LEARNED_APPS}: every app is a metric label"),
            );
        }
        if let Some(app) = &self.server.app {
            if !app_name_ok(app) {
                err("server.app".into(), name_rule.clone());
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(app) = &r.app {
                if !app_name_ok(app) {
                    err(format!("route[{i}].app"), name_rule.clone());
                }
            }
        }
    }
}
