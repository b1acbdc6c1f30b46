//! Which egress (outbound) proxy each upstream is reached through: its `proxy` key, else
//! `HTTPS_PROXY`/`HTTP_PROXY` and `NO_PROXY` from the environment. Parsing and `NO_PROXY`
//! matching are hyper-util's (`client::proxy::matcher`, curl's rules).

use super::{Config, ConfigError};
use http::{HeaderValue, Uri};
use hyper_util::client::proxy::matcher::Matcher;
use std::fmt;

/// `proxy = "none"`: connect directly, whatever the environment says.
pub const NO_PROXY_KEYWORD: &str = "none";

/// An HTTP proxy that tunnels connections to an upstream with `CONNECT`.
#[derive(Clone, PartialEq, Eq)]
pub struct EgressProxy {
    /// `http://host:port/` of the proxy, without credentials.
    pub uri: Uri,
    /// `Proxy-Authorization` (Basic) from credentials in the URL; marked sensitive.
    pub auth: Option<HeaderValue>,
    /// Where the proxy came from: `proxy` (the key) or the environment variable's name.
    pub source: &'static str,
}

// Credentials stay out of every `Debug` print of the configuration.
impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressProxy")
            .field("uri", &self.uri)
            .field("auth", &self.auth.as_ref().map(|_| "***"))
            .field("source", &self.source)
            .finish()
    }
}

/// Parses a proxy URL, `http://[user:password@]host:port` (a missing scheme means
/// `http`). The message never repeats the value: it may hold a password.
pub fn parse_proxy(value: &str, source: &'static str) -> Result<EgressProxy, String> {
    let probe = Uri::from_static("https://upstream.invalid/");
    let intercept = Matcher::builder()
        .all(value)
        .build()
        .intercept(&probe)
        .ok_or_else(|| {
            "invalid proxy URL, expected http://[user:password@]host:port".to_string()
        })?;
    if intercept.uri().scheme_str() != Some("http") {
        return Err(
            "only http:// proxies are supported (pacer tunnels through them with CONNECT)".into(),
        );
    }
    Ok(EgressProxy {
        uri: intercept.uri().clone(),
        auth: intercept.basic_auth().cloned(),
        source,
    })
}

/// The first non-empty variable of `names`, with its name.
fn first_env(
    names: &[&'static str],
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Option<(&'static str, String)> {
    names
        .iter()
        .find_map(|n| lookup(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
}

/// The proxy for an upstream at `url` with no `proxy` key: `HTTPS_PROXY` for `https`
/// upstreams, `HTTP_PROXY` for `http` ones (upper case first, then lower case), unless
/// the host matches `NO_PROXY`.
fn from_env(
    url: &Uri,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<EgressProxy>, String> {
    let names: &[&'static str] = match url.scheme_str() {
        Some("https") => &["HTTPS_PROXY", "https_proxy"],
        _ => &["HTTP_PROXY", "http_proxy"],
    };
    let Some((name, value)) = first_env(names, lookup) else {
        return Ok(None);
    };
    let no_proxy = first_env(&["NO_PROXY", "no_proxy"], lookup)
        .map(|(_, v)| v)
        .unwrap_or_default();
    // hyper-util's matcher answers `None` for a host that NO_PROXY names.
    let bypass = Matcher::builder()
        .all("http://proxy.invalid:1")
        .no(no_proxy)
        .build()
        .intercept(url)
        .is_none();
    if bypass {
        return Ok(None);
    }
    parse_proxy(&value, name)
        .map(Some)
        .map_err(|m| format!("environment variable {name}: {m}"))
}

impl Config {
    /// Sets each upstream's [`EgressProxy`]: its `proxy` key wins (`"none"` goes direct),
    /// else the environment applies. A bad key was reported by validation; a bad
    /// environment variable is reported here, at the upstream it would serve.
    pub(super) fn resolve_egress(
        &mut self,
        lookup: &dyn Fn(&str) -> Option<String>,
        errors: &mut Vec<ConfigError>,
    ) {
        for (i, u) in self.upstreams.iter_mut().enumerate() {
            let Ok(url) = u.url.parse::<Uri>() else {
                continue;
            };
            u.egress = match u.proxy.as_ref().map(|p| p.expose().trim()) {
                Some(NO_PROXY_KEYWORD) => None,
                Some(key) => parse_proxy(key, "proxy").ok(),
                None => match from_env(&url, lookup) {
                    Ok(p) => p,
                    Err(message) => {
                        errors.push(ConfigError {
                            path: format!("upstream[{i}]"),
                            message,
                        });
                        None
                    }
                },
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, EgressProxy};

    /// Two upstreams, `https` and `http`, with `proxy` lines as given.
    fn config(api_proxy: &str, crm_proxy: &str) -> String {
        format!(
            "[[upstream]]\nname = \"api\"\nurl = \"https://api.mypurecloud.com\"\n{api_proxy}\n\
             [[upstream]]\nname = \"crm\"\nurl = \"http://crm.internal:8080\"\n{crm_proxy}\n\
             [[route]]\nprefix = \"/\"\nupstream = \"api\"\n"
        )
    }

    fn resolve(text: &str, env: &[(&str, &str)]) -> Vec<Option<EgressProxy>> {
        let lookup = |name: &str| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        };
        Config::parse_with_env(text, &lookup)
            .unwrap_or_else(|e| panic!("{e}"))
            .upstreams
            .into_iter()
            .map(|u| u.egress)
            .collect()
    }

    fn proxy_of(p: &Option<EgressProxy>) -> Option<(String, &'static str)> {
        p.as_ref().map(|p| (p.uri.to_string(), p.source))
    }

    #[test]
    fn the_key_wins_over_the_environment_and_none_goes_direct() {
        let env = [
            ("HTTPS_PROXY", "http://env-proxy:3128"),
            ("HTTP_PROXY", "http://env-proxy:3128"),
        ];
        let got = resolve(
            &config(
                "proxy = \"http://egress:3128\"",
                &format!("proxy = \"{}\"", super::NO_PROXY_KEYWORD),
            ),
            &env,
        );
        assert_eq!(
            proxy_of(&got[0]),
            Some(("http://egress:3128/".into(), "proxy"))
        );
        assert_eq!(got[1], None);
        // A bare host:port means http.
        let got = resolve(&config("proxy = \"egress:3128\"", ""), &[]);
        assert_eq!(
            proxy_of(&got[0]),
            Some(("http://egress:3128/".into(), "proxy"))
        );
    }

    #[test]
    fn the_environment_applies_by_scheme_upper_case_first() {
        let got = resolve(
            &config("", ""),
            &[
                ("https_proxy", "http://lower:1"),
                ("HTTPS_PROXY", "http://upper:1"),
                ("http_proxy", "http://plain:2"),
            ],
        );
        assert_eq!(
            proxy_of(&got[0]),
            Some(("http://upper:1/".into(), "HTTPS_PROXY"))
        );
        assert_eq!(
            proxy_of(&got[1]),
            Some(("http://plain:2/".into(), "http_proxy"))
        );
        assert_eq!(resolve(&config("", ""), &[]), vec![None, None]);
    }

    #[test]
    fn no_proxy_bypasses_the_environment_but_not_the_key() {
        let env = [
            ("HTTPS_PROXY", "http://env-proxy:3128"),
            ("HTTP_PROXY", "http://env-proxy:3128"),
            ("no_proxy", "mypurecloud.com, 10.0.0.0/8"),
        ];
        assert_eq!(resolve(&config("", ""), &env)[0], None);
        let crm = proxy_of(&resolve(&config("", ""), &env)[1]);
        assert_eq!(crm, Some(("http://env-proxy:3128/".into(), "HTTP_PROXY")));
        let keyed = resolve(&config("proxy = \"http://egress:3128\"", ""), &env);
        assert!(keyed[0].is_some());
    }

    #[test]
    fn credentials_become_basic_auth_and_are_never_printed() {
        let got = resolve(
            &config("proxy = \"http://pacer:${PROXY_PASSWORD}@egress:3128\"", ""),
            &[("PROXY_PASSWORD", "s3cr%40t")],
        );
        let p = got[0].as_ref().unwrap();
        // base64("pacer:s3cr@t"): the password is percent-decoded.
        assert_eq!(p.auth.as_ref().unwrap(), "Basic cGFjZXI6czNjckB0");
        assert!(p.auth.as_ref().unwrap().is_sensitive());
        assert_eq!(p.uri, "http://egress:3128/");
        let printed = format!("{p:?}");
        assert!(
            !printed.contains("s3cr") && !printed.contains("cGFjZXI6"),
            "{printed}"
        );
    }

    #[test]
    fn bad_proxies_are_errors_at_their_key_without_the_value() {
        let lookup = |name: &str| (name == "HTTPS_PROXY").then(|| "socks5://u:hunter2@s:1".into());
        let err = Config::parse_with_env(
            &config("", "proxy = \"https://u:hunter2@egress:3128\""),
            &lookup,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("upstream[1].proxy: only http:// proxies"),
            "{err}"
        );
        assert!(
            err.contains("upstream[0]: environment variable HTTPS_PROXY: only http://"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let err = Config::parse_with_env(&config("proxy = \"http://\"", ""), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("upstream[0].proxy: invalid proxy URL"),
            "{err}"
        );
    }
}
