//! App identity: which application behind a shared OAuth client sent a request, so that
//! apps get a fair share of their client's queue (see [`crate::queue`]) and every metric
//! says which app sent what.
//!
//! Sources in order: the request header `[identity] app_header` (default `x-pacer-app`),
//! the route's `app`, `[server] app`, the User-Agent's product token (before the first
//! `/`), else `unknown`. Caller values are sanitized (at most
//! [`MAX_APP_NAME`](crate::config::MAX_APP_NAME) characters of `A-Z a-z 0-9 . _ -`, any
//! other character becomes `_`) and bounded: the `[[app]]` entries plus at most
//! `[identity] max_apps` learned names; every later name is `other`.

use crate::config::{app_name_ok, AppConfig, IdentityConfig, MAX_APP_NAME};
use http::{header, HeaderMap, HeaderName};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

/// The app of apps that could not be told apart.
pub const UNKNOWN_APP: &str = "unknown";
/// The app of every name learned past `[identity] max_apps`.
pub const OTHER_APP: &str = "other";

/// One application: its bounded name (a metric label) and its weight in the queue.
#[derive(Debug, Clone)]
pub struct App(Arc<AppInner>);

#[derive(Debug)]
struct AppInner {
    name: Arc<str>,
    weight: f64,
}

impl App {
    pub(crate) fn new(name: &str, weight: f64) -> App {
        App(Arc::new(AppInner {
            name: Arc::from(name),
            weight,
        }))
    }

    /// The app's name: configured, learned, `other` or `unknown`.
    pub fn name(&self) -> &Arc<str> {
        &self.0.name
    }

    /// Its share of a busy client's queue relative to the client's other apps.
    pub fn weight(&self) -> f64 {
        self.0.weight
    }

    /// The app of requests that name none.
    pub fn unknown() -> App {
        static UNKNOWN: OnceLock<App> = OnceLock::new();
        UNKNOWN.get_or_init(|| App::new(UNKNOWN_APP, 1.0)).clone()
    }
}

impl Default for App {
    fn default() -> Self {
        App::unknown()
    }
}

impl PartialEq for App {
    fn eq(&self, other: &App) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for App {}

/// The bounded set of apps one configuration knows: named ones and those learned.
pub struct Apps {
    header: HeaderName,
    forward_header: bool,
    /// `[server] app`.
    server: Option<Arc<str>>,
    named: HashMap<Box<str>, App>,
    learned: RwLock<HashMap<Box<str>, App>>,
    max_learned: usize,
    other: App,
}

impl Apps {
    /// The apps of `[[app]]`, learning up to `identity.max_apps` more.
    pub fn new(identity: &IdentityConfig, apps: &[AppConfig], server_app: Option<&str>) -> Apps {
        let header = HeaderName::from_bytes(identity.app_header.as_bytes())
            .unwrap_or(HeaderName::from_static("x-pacer-app"));
        Apps {
            header,
            forward_header: identity.forward_app_header,
            server: server_app.map(Arc::from),
            named: apps
                .iter()
                .map(|a| (Box::from(a.name.as_str()), App::new(&a.name, a.weight)))
                .collect(),
            learned: RwLock::new(HashMap::new()),
            max_learned: identity.max_apps,
            other: App::new(OTHER_APP, 1.0),
        }
    }

    /// The app of a request on a route whose `app` is `route_app`. Without a new name to
    /// learn this takes no allocation.
    pub fn resolve(&self, headers: &HeaderMap, route_app: Option<&str>) -> App {
        if let Some(v) = headers.get(&self.header) {
            if let Some(app) = self.caller_app(v.as_bytes()) {
                return app;
            }
        }
        if let Some(name) = route_app.or(self.server.as_deref()) {
            return self.named_or_learned(name);
        }
        if let Some(ua) = headers.get(header::USER_AGENT) {
            let product = ua.as_bytes().split(|&b| b == b'/' || b == b' ').next();
            if let Some(app) = product.and_then(|p| self.caller_app(p)) {
                return app;
            }
        }
        App::unknown()
    }

    /// Removes the app header before forwarding, unless `forward_app_header` is set.
    pub fn strip(&self, headers: &mut HeaderMap) {
        if !self.forward_header {
            headers.remove(&self.header);
        }
    }

    /// Names learned from callers so far (at most `max_apps`).
    pub fn learned(&self) -> usize {
        self.learned.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The app a caller-sent value names, sanitized; none for an empty one.
    fn caller_app(&self, raw: &[u8]) -> Option<App> {
        let raw = raw.trim_ascii();
        if raw.is_empty() {
            return None;
        }
        match std::str::from_utf8(raw) {
            Ok(name) if app_name_ok(name) => Some(self.named_or_learned(name)),
            _ => Some(self.named_or_learned(&sanitize(raw))),
        }
    }

    fn named_or_learned(&self, name: &str) -> App {
        if let Some(app) = self.named.get(name) {
            return app.clone();
        }
        match name {
            UNKNOWN_APP => return App::unknown(),
            OTHER_APP => return self.other.clone(),
            _ => {}
        }
        if let Some(app) = self
            .learned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return app.clone();
        }
        let mut learned = self.learned.write().unwrap_or_else(|p| p.into_inner());
        if let Some(app) = learned.get(name) {
            return app.clone();
        }
        if learned.len() >= self.max_learned {
            return self.other.clone();
        }
        let app = App::new(name, 1.0);
        learned.insert(Box::from(name), app.clone());
        app
    }
}

/// At most [`MAX_APP_NAME`] bytes, each one outside `A-Z a-z 0-9 . _ -` replaced by `_`.
fn sanitize(raw: &[u8]) -> String {
    raw.iter()
        .take(MAX_APP_NAME)
        .map(|&b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                b as char
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn apps(extra: &str) -> Apps {
        let c = Config::parse(&format!("{}{extra}", crate::config::MINIMAL)).unwrap();
        Apps::new(&c.identity, &c.apps, c.server.app.as_deref())
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn sources_in_order() {
        let a = apps("[[app]]\nname = \"export\"\nweight = 2\n");
        let both = headers(&[("x-pacer-app", "export"), ("user-agent", "curl/8.0")]);
        assert_eq!(&**a.resolve(&both, Some("route-app")).name(), "export");
        assert_eq!(a.resolve(&both, None).weight(), 2.0);
        let ua = headers(&[("user-agent", "purecloud-sdk/1.2 (linux)")]);
        assert_eq!(&**a.resolve(&ua, Some("route-app")).name(), "route-app");
        assert_eq!(&**a.resolve(&ua, None).name(), "purecloud-sdk");
        assert_eq!(&**a.resolve(&HeaderMap::new(), None).name(), "unknown");
        let side = apps("[server]\napp = \"crm-sync\"\n");
        assert_eq!(&**side.resolve(&ua, None).name(), "crm-sync");
        assert_eq!(
            &**side.resolve(&ua, Some("dataactions")).name(),
            "dataactions"
        );
    }

    #[test]
    fn caller_values_are_sanitized_and_bounded() {
        let a = apps("[identity]\nmax_apps = 3\n");
        let long = "x".repeat(200);
        let got = a.resolve(&headers(&[("x-pacer-app", &long)]), None);
        assert_eq!(got.name().len(), MAX_APP_NAME);
        let odd = a.resolve(&headers(&[("x-pacer-app", "a b{c}")]), None);
        assert_eq!(&**odd.name(), "a_b_c_");
        a.resolve(&headers(&[("x-pacer-app", "third")]), None);
        let over = a.resolve(&headers(&[("x-pacer-app", "fourth")]), None);
        assert_eq!(&**over.name(), "other");
        assert_eq!(a.learned(), 3);
        // A caller cannot pose as pacer's own names to take a learned place.
        assert_eq!(
            &**a.resolve(&headers(&[("x-pacer-app", "unknown")]), None)
                .name(),
            "unknown"
        );
    }

    #[test]
    fn header_removed_unless_forwarded() {
        let a = apps("");
        let mut h = headers(&[("x-pacer-app", "x")]);
        a.strip(&mut h);
        assert!(h.is_empty());
        let keep = apps("[identity]\nforward_app_header = true\napp_header = \"x-app\"\n");
        let mut h = headers(&[("x-app", "x")]);
        keep.strip(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn config_is_validated_with_key_paths() {
        let text = format!(
            "{}[identity]\napp_header = \"bad header\"\nmax_apps = 1000000\n[server]\napp = \"a b\"\n\
             [[app]]\nname = \"other\"\n[[app]]\nname = \"x\"\nweight = 0\n[[app]]\nname = \"x\"\n",
            crate::config::MINIMAL
        );
        let errs = Config::parse(&text).unwrap_err().to_string();
        for path in [
            "identity.app_header",
            "identity.max_apps",
            "server.app",
            "app[0].name",
            "app[1].weight",
            "app[2].name",
        ] {
            assert!(errs.contains(path), "{path} missing in {errs}");
        }
    }
}
