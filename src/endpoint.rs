//! Endpoint templates (`METHOD /path/{param}/*`) and the classifier that names the
//! endpoint of a request. The template, never the raw path, is the metric label and the
//! key of endpoint-scoped limits, so label cardinality stays bounded.

use http::Method;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A template that did not parse.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("invalid endpoint template {text:?}: {reason}")]
pub struct TemplateError {
    text: String,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    /// `{name}` or a `*` that is not last: exactly one segment.
    Param,
    /// A trailing `*`: any rest, including nothing.
    Rest,
}

/// A parsed `METHOD /path` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// `None` for `*`: any method.
    method: Option<Method>,
    segs: Vec<Seg>,
    text: Arc<str>,
}

impl Template {
    /// Parses `"PUT /api/v2/architect/ivrs/{ivrId}"`, `"POST /api/v2/analytics/*/details/jobs"`
    /// or `"* /api/v2/users/*"`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let err = |reason| TemplateError {
            text: text.to_string(),
            reason,
        };
        let (method, path) = text
            .trim()
            .split_once(' ')
            .ok_or(err("expected \"METHOD /path\""))?;
        let method = match method {
            "*" => None,
            m => Some(Method::from_bytes(m.as_bytes()).map_err(|_| err("invalid method"))?),
        };
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(err("path must start with '/'"));
        }
        let parts: Vec<&str> = path[1..].split('/').collect();
        let mut segs = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let seg = if *part == "*" {
                if last {
                    Seg::Rest
                } else {
                    Seg::Param
                }
            } else if part.starts_with('{') && part.ends_with('}') && part.len() > 2 {
                Seg::Param
            } else if part.contains(['{', '}', '*', '?', '#']) {
                return Err(err("a segment is a literal, {name} or *"));
            } else {
                Seg::Lit((*part).to_string())
            };
            segs.push(seg);
        }
        let canonical = format!("{} {}", method.as_ref().map_or("*", Method::as_str), path);
        Ok(Template {
            method,
            segs,
            text: canonical.into(),
        })
    }

    /// The template as written: the endpoint label.
    pub fn label(&self) -> &Arc<str> {
        &self.text
    }

    /// True when a request with this method and (normalized, query-less) path matches.
    pub fn matches(&self, method: &Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
        for seg in &self.segs {
            match seg {
                Seg::Rest => return true,
                Seg::Param => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Seg::Lit(l) => match parts.next() {
                    Some(p) if p == l => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }

    /// True when every request this template matches, `other` matches too.
    fn covered_by(&self, other: &Template) -> bool {
        if other.method.is_some() && other.method != self.method {
            return false;
        }
        let mut mine = self.segs.iter();
        for theirs in &other.segs {
            match (theirs, mine.next()) {
                (Seg::Rest, _) => return true,
                (Seg::Param, Some(Seg::Lit(_) | Seg::Param)) => {}
                (Seg::Lit(a), Some(Seg::Lit(b))) if a == b => {}
                _ => return false,
            }
        }
        mine.next().is_none()
    }

    /// The matchit route for this template; params are named by position so that
    /// templates sharing a prefix never conflict over names.
    fn router_path(&self) -> String {
        let mut out = String::new();
        for (i, seg) in self.segs.iter().enumerate() {
            out.push('/');
            match seg {
                Seg::Lit(l) => out.push_str(&l.replace('{', "{{").replace('}', "}}")),
                Seg::Param => out.push_str(&format!("{{p{i}}}")),
                Seg::Rest => out.push_str("{*rest}"),
            }
        }
        out
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The endpoint a request was classified as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Template text, e.g. `PUT /api/v2/architect/ivrs/{ivrId}`.
    pub label: Arc<str>,
    /// Index of the matching template, if any.
    pub template: Option<usize>,
}

/// Distinct heuristic labels kept before new paths are labelled `other`.
const MAX_HEURISTIC_LABELS: usize = 1000;

/// Names the endpoint of a request: the most specific configured template, found with a
/// radix-tree router per method; otherwise a label with id-like segments replaced by `{id}`.
#[derive(Debug)]
pub struct Classifier {
    templates: Vec<Template>,
    by_method: HashMap<Method, matchit::Router<usize>>,
    any_method: matchit::Router<usize>,
    /// Templates the router refused (conflicts), tried one by one after it.
    leftovers: Vec<usize>,
    heuristic: Mutex<HashMap<(Method, String), Arc<str>>>,
}

impl Classifier {
    /// Builds the classifier; duplicate templates are kept once.
    pub fn new(templates: impl IntoIterator<Item = Template>) -> Classifier {
        let mut unique: Vec<Template> = Vec::new();
        for t in templates {
            if !unique.iter().any(|u| u.text == t.text) {
                unique.push(t);
            }
        }
        let mut by_method: HashMap<Method, matchit::Router<usize>> = HashMap::new();
        let mut any_method = matchit::Router::new();
        let mut leftovers = Vec::new();
        for (i, t) in unique.iter().enumerate() {
            let router = match &t.method {
                Some(m) => by_method.entry(m.clone()).or_default(),
                None => &mut any_method,
            };
            if router.insert(t.router_path(), i).is_err() {
                leftovers.push(i);
            }
        }
        Classifier {
            templates: unique,
            by_method,
            any_method,
            leftovers,
            heuristic: Mutex::new(HashMap::new()),
        }
    }

    /// All templates, indexed as in [`Endpoint::template`].
    pub fn templates(&self) -> &[Template] {
        &self.templates
    }

    /// Index of a template by its label.
    pub fn index_of(&self, label: &str) -> Option<usize> {
        self.templates.iter().position(|t| &*t.text == label)
    }

    /// The endpoint of a request with a normalized, query-less path.
    pub fn classify(&self, method: &Method, path: &str) -> Endpoint {
        let found = self
            .by_method
            .get(method)
            .and_then(|r| r.at(path).ok())
            .or_else(|| self.any_method.at(path).ok())
            .map(|m| *m.value)
            .or_else(|| {
                self.leftovers
                    .iter()
                    .copied()
                    .find(|&i| self.templates[i].matches(method, path))
            });
        match found {
            Some(i) => Endpoint {
                label: self.templates[i].text.clone(),
                template: Some(i),
            },
            None => Endpoint {
                label: self.heuristic_label(method, path),
                template: None,
            },
        }
    }

    /// True when template `t` applies to a request classified as `endpoint` at `path`.
    pub fn applies(&self, t: usize, endpoint: &Endpoint, method: &Method, path: &str) -> bool {
        match endpoint.template {
            Some(e) if e == t => true,
            Some(e) if self.templates[e].covered_by(&self.templates[t]) => true,
            _ => self.templates[t].matches(method, path),
        }
    }

    fn heuristic_label(&self, method: &Method, path: &str) -> Arc<str> {
        let mut label = String::with_capacity(path.len() + 8);
        label.push_str(method.as_str());
        label.push(' ');
        for (i, seg) in path.split('/').enumerate() {
            if i > 0 {
                label.push('/');
            }
            label.push_str(if looks_like_id(seg) { "{id}" } else { seg });
        }
        let Ok(mut seen) = self.heuristic.lock() else {
            return Arc::from("other");
        };
        let key = (method.clone(), label);
        if let Some(l) = seen.get(&key) {
            return l.clone();
        }
        if seen.len() >= MAX_HEURISTIC_LABELS {
            return Arc::from(format!("{} other", method.as_str()));
        }
        let l: Arc<str> = Arc::from(key.1.as_str());
        seen.insert(key, l.clone());
        l
    }
}

fn looks_like_id(seg: &str) -> bool {
    let digits = !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit());
    let hexish = seg.len() >= 16 && seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    digits || hexish || seg.len() > 40 || seg.contains(['@', '%', '.', ' ', ':'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Template {
        Template::parse(s).unwrap()
    }

    #[test]
    fn parses_and_matches() {
        let ivr = t("PUT /api/v2/architect/ivrs/{ivrId}");
        assert!(ivr.matches(&Method::PUT, "/api/v2/architect/ivrs/abc"));
        assert!(!ivr.matches(&Method::GET, "/api/v2/architect/ivrs/abc"));
        assert!(!ivr.matches(&Method::PUT, "/api/v2/architect/ivrs/abc/x"));
        assert!(!ivr.matches(&Method::PUT, "/api/v2/architect/ivrs/"));
        let jobs = t("POST /api/v2/analytics/*/details/jobs");
        assert!(jobs.matches(
            &Method::POST,
            "/api/v2/analytics/conversations/details/jobs"
        ));
        let rest = t("* /api/v2/users/*");
        assert!(rest.matches(&Method::DELETE, "/api/v2/users/1/roles"));
        assert!(Template::parse("/no/method").is_err());
        assert!(Template::parse("GET no-slash").is_err());
        assert!(Template::parse("GET /a/b{c}").is_err());
    }

    #[test]
    fn classifier_prefers_most_specific_and_labels_unknown_paths() {
        let c = Classifier::new([
            t("PUT /api/v2/architect/ivrs/{ivrId}"),
            t("* /api/v2/architect/*"),
            t("POST /api/v2/analytics/*/details/jobs"),
        ]);
        let e = c.classify(&Method::PUT, "/api/v2/architect/ivrs/42");
        assert_eq!(&*e.label, "PUT /api/v2/architect/ivrs/{ivrId}");
        let broad = c.index_of("* /api/v2/architect/*").unwrap();
        assert!(c.applies(broad, &e, &Method::PUT, "/api/v2/architect/ivrs/42"));
        let e = c.classify(&Method::GET, "/api/v2/architect/flows");
        assert_eq!(&*e.label, "* /api/v2/architect/*");
        let e = c.classify(&Method::POST, "/api/v2/analytics/users/details/jobs");
        assert_eq!(&*e.label, "POST /api/v2/analytics/*/details/jobs");
        let e = c.classify(
            &Method::GET,
            "/api/v2/users/6b1f0c9e-1111-4e2b-9a0f-0123456789ab/presence",
        );
        assert_eq!(&*e.label, "GET /api/v2/users/{id}/presence");
        assert_eq!(e.template, None);
    }

    #[test]
    fn heuristic_labels_are_bounded() {
        let c = Classifier::new([]);
        for i in 0..(MAX_HEURISTIC_LABELS + 50) {
            c.classify(&Method::GET, &format!("/x/name{i}"));
        }
        assert_eq!(&*c.classify(&Method::GET, "/y/new").label, "GET other");
    }
}
