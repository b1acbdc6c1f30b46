//! Validation of a parsed configuration: every error with its key path, so that
//! `check-config` lists them all and the server refuses to start on any.

use super::*;

impl Config {
    /// Adds every problem of this configuration to `errors`.
    pub(super) fn validate(&self, errors: &mut Vec<ConfigError>) {
        let mut err = |path: String, message: String| errors.push(ConfigError { path, message });

        if self.server.max_headers == 0 {
            err("server.max_headers".into(), "must be at least 1".into());
        }
        if self.server.workers > MAX_WORKERS {
            err(
                "server.workers".into(),
                format!("at most {MAX_WORKERS} (0 means one per CPU core)"),
            );
        }
        if self.server.max_connections == 0 {
            err("server.max_connections".into(), "must be at least 1".into());
        }
        if self.server.buffer_body_bytes > MAX_BUFFER_BODY_BYTES {
            err(
                "server.buffer_body_bytes".into(),
                format!(
                    "must be at most {MAX_BUFFER_BODY_BYTES}: every request being read may hold this much"
                ),
            );
        }
        if self.server.max_uri_bytes < 16 {
            err("server.max_uri_bytes".into(), "must be at least 16".into());
        }
        if self.server.http2_max_concurrent_streams == 0 {
            err(
                "server.http2_max_concurrent_streams".into(),
                "must be at least 1".into(),
            );
        }
        let s = &self.server;
        for (key, d) in [
            ("header_read_timeout", s.header_read_timeout),
            ("body_idle_timeout", s.body_idle_timeout),
            ("request_deadline", s.request_deadline),
            ("max_connection_age", s.max_connection_age),
            ("http2_keep_alive_interval", s.http2_keep_alive_interval),
            ("http2_keep_alive_timeout", s.http2_keep_alive_timeout),
        ] {
            if d.0.is_zero() {
                err(format!("server.{key}"), "must be greater than zero".into());
            }
        }
        if self.upstreams.is_empty() {
            err(
                "upstream".into(),
                "at least one [[upstream]] is required".into(),
            );
        }
        let mut names = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let p = format!("upstream[{i}]");
            if u.name.is_empty() {
                err(format!("{p}.name"), "must not be empty".into());
            } else if !names.insert(u.name.as_str()) {
                err(
                    format!("{p}.name"),
                    format!("duplicate upstream name {:?}", u.name),
                );
            }
            if let Err(m) = check_upstream_url(&u.url) {
                err(format!("{p}.url"), m);
            }
            match u.proxy.as_ref().map(|p| p.expose().trim()) {
                None | Some(NO_PROXY_KEYWORD) => {}
                Some(proxy) => {
                    if let Err(m) = parse_proxy(proxy, "proxy") {
                        err(
                            format!("{p}.proxy"),
                            format!("{m}, or \"{NO_PROXY_KEYWORD}\""),
                        );
                    }
                }
            }
            if u.timeout.0.is_zero() {
                err(format!("{p}.timeout"), "must be greater than zero".into());
            }
            if u.connect_timeout.0.is_zero() {
                err(
                    format!("{p}.connect_timeout"),
                    "must be greater than zero".into(),
                );
            }
        }
        if self.routes.is_empty() {
            err("route".into(), "at least one [[route]] is required".into());
        }
        let mut prefixes = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let p = format!("route[{i}]");
            if !r.prefix.starts_with('/') {
                err(
                    format!("{p}.prefix"),
                    format!("must start with '/', got {:?}", r.prefix),
                );
            } else if !prefixes.insert(r.prefix.as_str()) {
                err(
                    format!("{p}.prefix"),
                    format!("duplicate prefix {:?}", r.prefix),
                );
            }
            if !names.contains(r.upstream.as_str()) {
                err(
                    format!("{p}.upstream"),
                    format!("no [[upstream]] named {:?}", r.upstream),
                );
            }
            if let Some(name) = &r.credential {
                if self.credential(name).is_none() {
                    err(
                        format!("{p}.credential"),
                        format!("no [[credential]] named {name:?}"),
                    );
                }
                if r.inbound_auth.is_none() && r.allow_cidrs.is_empty() {
                    err(
                        format!("{p}.credential"),
                        "a route that sends pacer's own token needs inbound_auth and/or \
                         allow_cidrs, or anyone who can reach pacer could use it"
                            .into(),
                    );
                }
                if !r.identity.is_empty() {
                    err(
                        format!("{p}.identity"),
                        "not used with `credential`: the caller is the credential's client".into(),
                    );
                }
            }
            if let Some(auth) = &r.inbound_auth {
                if http::HeaderName::from_bytes(auth.header.as_bytes()).is_err() {
                    err(
                        format!("{p}.inbound_auth.header"),
                        format!("invalid header name {:?}", auth.header),
                    );
                }
                if auth.keys.is_empty() || auth.keys.iter().any(|k| k.expose().is_empty()) {
                    err(
                        format!("{p}.inbound_auth.keys"),
                        "needs at least one non-empty key".into(),
                    );
                }
            }
        }
        self.validate_credentials(&names, &mut err);
        self.validate_usage(&mut err);
        self.validate_discover(&mut err);
        let mut client_ids = HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            if c.id.is_empty() {
                err(format!("client[{i}].id"), "must not be empty".into());
            } else if !client_ids.insert(c.id.as_str()) {
                err(
                    format!("client[{i}].id"),
                    format!("duplicate client id {:?}", c.id),
                );
            }
        }
        let mut limit_names = HashSet::new();
        for (i, l) in self.limits.iter().enumerate() {
            let p = format!("limit[{i}]");
            if l.name.is_empty() {
                err(format!("{p}.name"), "must not be empty".into());
            } else if !limit_names.insert((l.name.as_str(), l.upstream.as_deref())) {
                err(
                    format!("{p}.name"),
                    format!("duplicate limit name {:?}", l.name),
                );
            }
            if let Some(u) = &l.upstream {
                if !names.contains(u.as_str()) {
                    err(
                        format!("{p}.upstream"),
                        format!("no [[upstream]] named {u:?}"),
                    );
                }
            }
            if let Some(m) = &l.matches {
                if let Err(e) = crate::endpoint::Template::parse(m) {
                    err(format!("{p}.match"), e.to_string());
                }
            }
            match (l.requests, l.per) {
                (Some(0), _) => err(format!("{p}.requests"), "must be at least 1".into()),
                (Some(_), None) => err(format!("{p}.per"), "required with `requests`".into()),
                (None, Some(_)) => err(format!("{p}.requests"), "required with `per`".into()),
                (Some(_), Some(per)) if per.0.is_zero() => {
                    err(format!("{p}.per"), "must be greater than zero".into())
                }
                _ => {}
            }
            if l.requests.is_none() && l.concurrency.is_none() && l.jobs.is_none() {
                err(
                    p.clone(),
                    "needs `requests` and `per`, `concurrency`, or `jobs`".into(),
                );
            }
            self.validate_jobs(&p, l, &mut err);
            if l.concurrency == Some(0) {
                err(format!("{p}.concurrency"), "must be at least 1".into());
            }
            if !(0.0..1.0).contains(&l.headroom) {
                err(
                    format!("{p}.headroom"),
                    format!("must be in [0, 1), got {}", l.headroom),
                );
            } else if l.effective_requests() == Some(0) {
                err(
                    format!("{p}.headroom"),
                    "leaves no request in the window".into(),
                );
            }
        }
        let q = &self.queue;
        if !(0.0..1.0).contains(&q.critical_reserve) {
            err(
                "queue.critical_reserve".into(),
                format!("must be in [0, 1), got {}", q.critical_reserve),
            );
        }
        if q.reserve_memory.0 < Duration::from_secs(1) {
            err("queue.reserve_memory".into(), "must be at least 1s".into());
        }
        if !(q.bulk_share > 0.0 && q.bulk_share <= 1.0) {
            err(
                "queue.bulk_share".into(),
                format!("must be in (0, 1], got {}", q.bulk_share),
            );
        }
        let ad = &self.adaptive;
        if !(0.0..1.0).contains(&ad.threshold) {
            err(
                "adaptive.threshold".into(),
                format!("must be in [0, 1), got {}", ad.threshold),
            );
        }
        if !(ad.cut > 0.0 && ad.cut < 1.0) {
            err(
                "adaptive.cut".into(),
                format!("must be in (0, 1), got {}", ad.cut),
            );
        }
        if !(ad.floor > 0.0 && ad.floor <= 1.0) {
            err(
                "adaptive.floor".into(),
                format!("must be in (0, 1], got {}", ad.floor),
            );
        }
        if !(ad.recover > 0.0 && ad.recover <= 1.0) {
            err(
                "adaptive.recover".into(),
                format!(
                    "must be in (0, 1] (share of the configured rate per minute), got {}",
                    ad.recover
                ),
            );
        }
        if ad.hold.0.is_zero() {
            err("adaptive.hold".into(), "must be longer than 0s".into());
        }
        if ad.min_answers == 0 {
            err("adaptive.min_answers".into(), "must be at least 1".into());
        }
        let st = &self.state;
        if st.backend == StateBackend::Redis {
            let mode = match st.mode {
                RedisMode::Single => "single",
                RedisMode::Cluster => "cluster",
                RedisMode::Sentinel => "sentinel",
            };
            let url = st.url.as_ref().map(|u| u.expose());
            if st.mode == RedisMode::Single {
                match url {
                    None | Some("") => err(
                        "state.url".into(),
                        "required with backend = \"redis\"".into(),
                    ),
                    Some(u)
                        if !(u.starts_with("redis://")
                            || u.starts_with("rediss://")
                            || u.starts_with("redis+unix://")) =>
                    {
                        err(
                            "state.url".into(),
                            "must start with redis://, rediss:// or redis+unix://".into(),
                        )
                    }
                    _ => {}
                }
                if !st.nodes.is_empty() {
                    err(
                        "state.nodes".into(),
                        "only used with mode = \"cluster\" or \"sentinel\"".into(),
                    );
                }
            } else {
                if url.is_some() {
                    err(
                        "state.url".into(),
                        format!(
                            "not used with mode = \"{mode}\" (list the servers in state.nodes)"
                        ),
                    );
                }
                if st.nodes.is_empty() {
                    err(
                        "state.nodes".into(),
                        format!("required with mode = \"{mode}\""),
                    );
                }
                for (i, node) in st.nodes.iter().enumerate() {
                    let n = node.expose();
                    if !(n.starts_with("redis://") || n.starts_with("rediss://")) {
                        err(
                            format!("state.nodes[{i}]"),
                            "must start with redis:// or rediss://".into(),
                        );
                    } else if redis::IntoConnectionInfo::into_connection_info(n).is_err() {
                        err(format!("state.nodes[{i}]"), "invalid Redis URL".into());
                    }
                }
            }
            match (st.mode, st.master.as_deref()) {
                (RedisMode::Sentinel, None | Some("")) => err(
                    "state.master".into(),
                    "required with mode = \"sentinel\"".into(),
                ),
                (RedisMode::Sentinel, _) | (_, None) => {}
                (_, Some(_)) => err(
                    "state.master".into(),
                    "only used with mode = \"sentinel\"".into(),
                ),
            }
        }
        if st.timeout.0.is_zero() {
            err("state.timeout".into(), "must be greater than zero".into());
        }
        if st.lease_ttl.0 < Duration::from_secs(1) {
            err("state.lease_ttl".into(), "must be at least 1s".into());
        }
        if st.key_prefix.is_empty() || st.key_prefix.contains(['{', '}']) {
            err(
                "state.key_prefix".into(),
                "must be non-empty without braces".into(),
            );
        }
        // Shadow decisions are made in the local ledger; the shared Redis admission script
        // knows no shadow layer and would hold or refuse requests it should let through.
        if st.backend == StateBackend::Redis {
            const NO_REDIS: &str = "shadow mode is not supported with [state] backend = \"redis\" \
                 (it would still hold and shed in the shared store); use backend = \"local\" \
                 for the shadow rollout";
            if self.server.shadow {
                err("server.shadow".into(), NO_REDIS.into());
            }
            for (i, l) in self.limits.iter().enumerate() {
                if l.shadow {
                    err(format!("limit[{i}].shadow"), NO_REDIS.into());
                }
            }
        }
        if self.identity.max_keys == 0 {
            err("identity.max_keys".into(), "must be at least 1".into());
        }
        super::cache::validate(&self.caches, &self.cache_settings, &names, errors);
    }
}

impl Config {
    /// `[[credential]]`: unique names, a known login upstream, a non-empty id and secret,
    /// an absolute token path.
    fn validate_credentials(
        &self,
        upstreams: &HashSet<&str>,
        err: &mut impl FnMut(String, String),
    ) {
        let mut seen = HashSet::new();
        for (i, c) in self.credentials.iter().enumerate() {
            let p = format!("credential[{i}]");
            if c.name.is_empty() {
                err(format!("{p}.name"), "must not be empty".into());
            } else if !seen.insert(c.name.as_str()) {
                err(
                    format!("{p}.name"),
                    format!("duplicate credential name {:?}", c.name),
                );
            }
            if !upstreams.contains(c.upstream.as_str()) {
                err(
                    format!("{p}.upstream"),
                    format!("no [[upstream]] named {:?}", c.upstream),
                );
            }
            if c.client_id.trim().is_empty() {
                err(format!("{p}.client_id"), "must not be empty".into());
            } else if c.client_id.contains(':') || c.client_id.chars().any(char::is_control) {
                err(
                    format!("{p}.client_id"),
                    "must not contain ':' or control characters".into(),
                );
            }
            if c.client_secret.expose().is_empty() {
                err(format!("{p}.client_secret"), "must not be empty".into());
            }
            if !c.token_path.starts_with('/')
                || c.token_path.contains(['?', '#'])
                || http::uri::PathAndQuery::try_from(c.token_path.as_str()).is_err()
            {
                err(
                    format!("{p}.token_path"),
                    format!(
                        "must be an absolute path without query, got {:?}",
                        c.token_path
                    ),
                );
            }
            if c.refresh_before.is_some_and(|d| d.0.is_zero()) {
                err(
                    format!("{p}.refresh_before"),
                    "must be greater than zero".into(),
                );
            }
        }
    }
}

fn check_upstream_url(raw: &str) -> Result<(), String> {
    let url = match url::Url::parse(raw) {
        Ok(u) => u,
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            return Err(format!("relative URL {raw:?}"))
        }
        Err(e) => return Err(format!("invalid URL {raw:?}: {e}")),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, got {:?}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("URL {raw:?} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("URL {raw:?} must not have a query or fragment"));
    }
    Ok(())
}

impl Config {
    /// What is valid but works differently than one may expect, each with its key path:
    /// `check-config` prints these and the server logs them at start.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let mut out = Vec::new();
        if self.state.backend == StateBackend::Redis {
            for (i, l) in self.limits.iter().enumerate() {
                if let Some(n) = l.jobs {
                    out.push(ConfigError {
                        path: format!("limit[{i}].jobs"),
                        message: format!(
                            "job slots are kept per replica, not in Redis: with R replicas up \
                             to R x {n} jobs of {:?} run at once; divide `jobs` by the \
                             replica count or send job creations through one replica",
                            l.name
                        ),
                    });
                }
            }
        }
        out
    }

    /// A `jobs` limit: a slot per job created through one endpoint, nothing else.
    fn validate_jobs(&self, p: &str, l: &LimitConfig, err: &mut impl FnMut(String, String)) {
        let Some(n) = l.jobs else {
            if l.job_ttl.is_some() {
                err(format!("{p}.job_ttl"), "only with `jobs`".into());
            }
            return;
        };
        if n == 0 {
            err(format!("{p}.jobs"), "must be at least 1".into());
        }
        if l.requests.is_some() || l.per.is_some() || l.concurrency.is_some() {
            err(
                format!("{p}.jobs"),
                "a job limit counts running jobs only: put `requests`/`per` or \
                 `concurrency` in a [[limit]] of its own"
                    .into(),
            );
        }
        if l.matches.is_none() {
            err(
                format!("{p}.match"),
                "required with `jobs`: the endpoint that creates the jobs, e.g. \
                 \"POST /api/v2/analytics/*/details/jobs\""
                    .into(),
            );
        }
        if l.shadow {
            err(
                format!("{p}.shadow"),
                "not supported with `jobs` (job slots always hold)".into(),
            );
        }
        if let Some(ttl) = l.job_ttl {
            if ttl.0 < Duration::from_secs(1) || ttl.0 > MAX_JOB_TTL {
                err(
                    format!("{p}.job_ttl"),
                    "must be between 1s and 7 days".into(),
                );
            }
        }
    }
}

/// Longest `job_ttl`: Genesys keeps job results for days, not longer.
const MAX_JOB_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
