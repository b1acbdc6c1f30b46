//! What `/status` and `/metrics` show: the instance's recorded metrics and its limiter
//! state read now, with every label bounded.

use crate::cache::ResponseCache;
use crate::config::Priority;
use crate::limit::KeyPart;
use crate::metrics::Gauge;
use crate::proxy::Proxy;
use std::collections::BTreeMap;

/// A JSON snapshot for `/status`: limit use and waiting requests per key, queue depths,
/// pauses, adaptive cuts, and the last minutes' 429s, 401s, sheds and waits per client.
pub fn status(proxy: &Proxy) -> serde_json::Value {
    // Show the cuts and ceilings other replicas shared, as the next admission will.
    let (version, shared) = proxy.admission.shared_adaptive();
    proxy.adaptive.merge(version, &shared);
    let set = proxy.admission.limits();
    let waiting = proxy.admission.waiting();
    let jobs = proxy.admission.jobs_usage();
    let mut usage: Vec<_> = proxy
        .admission
        .usage()
        .into_iter()
        .map(|(layer, used, inflight)| {
            let spec = &set.specs[layer.limit];
            let (client, endpoint) = match &layer.part {
                KeyPart::Global => (None, None),
                KeyPart::Client(c) => (Some(client_label(proxy, c)), None),
                KeyPart::Endpoint(e) => (None, Some(e.to_string())),
                KeyPart::ClientEndpoint(c, e) => {
                    (Some(client_label(proxy, c)), Some(e.to_string()))
                }
            };
            serde_json::json!({
                "limit": &*spec.name,
                "key": layer.part.label(),
                "used": used,
                "quota": spec.requests_now(),
                "inflight": inflight,
                "concurrency": spec.concurrency.map(|c| c[0]),
                "client": client,
                "endpoint": endpoint,
                "per_seconds": spec.requests.map(|_| spec.per.as_secs_f64()),
                "waiting": waiting.get(&layer).copied().unwrap_or(0),
                "shadow": spec.shadow,
            })
        })
        .collect();
    // Job limits: running jobs per key (see [`crate::jobs`]).
    usage.extend(jobs.into_iter().map(|(layer, running)| {
        let spec = &set.specs[layer.limit];
        let client = match &layer.part {
            KeyPart::Client(c) | KeyPart::ClientEndpoint(c, _) => Some(client_label(proxy, c)),
            KeyPart::Global | KeyPart::Endpoint(_) => None,
        };
        serde_json::json!({
            "limit": &*spec.name,
            "key": layer.part.label(),
            "jobs_running": running,
            "jobs": spec.jobs,
            "job_ttl_seconds": std::time::Duration::from_nanos(spec.job_ttl).as_secs_f64(),
            "client": client,
            "waiting": waiting.get(&layer).copied().unwrap_or(0),
        })
    }));
    let upstream_name = |u: usize| proxy.upstreams.get(u).map(|u| u.name.to_string());
    let pauses: Vec<_> = proxy
        .admission
        .pauses()
        .into_iter()
        .map(|((u, caller), left)| {
            serde_json::json!({
                "upstream": upstream_name(u),
                "client": &*caller,
                "label": client_label(proxy, &caller),
                "seconds": left.as_secs_f64(),
            })
        })
        .collect();
    let depth_by_upstream = proxy.admission.depth_by_upstream();
    let by_upstream: BTreeMap<String, serde_json::Value> = proxy
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let d = depth_by_upstream.get(&i).copied().unwrap_or_default();
            (
                u.name.to_string(),
                serde_json::json!({"critical": d[0], "normal": d[1], "bulk": d[2]}),
            )
        })
        .collect();
    let depth = proxy.admission.depth();
    serde_json::json!({
        "draining": proxy.is_draining(),
        "upstreams": proxy.upstreams.iter().map(|u| u.name.to_string()).collect::<Vec<_>>(),
        "queue": {"critical": depth[0], "normal": depth[1], "bulk": depth[2]},
        "queue_by_upstream": by_upstream,
        "limits": usage,
        "pauses": pauses,
        "limiter_keys": proxy.admission.keys(),
        "critical_reserve": reserve_status(proxy),
        "shadow": shadow_status(proxy),
        "adaptive_cuts": proxy
            .adaptive
            .reports()
            .into_iter()
            .map(|r| serde_json::json!({
                "upstream": upstream_name(r.key.0),
                "client": &*r.key.1,
                "label": client_label(proxy, &r.key.1),
                "factor": r.factor,
                "cuts": r.cuts,
                "seconds": r.hold_left.as_secs_f64(),
                "allowed": r.allowed,
                "client_share": r.client_share,
            }))
            .collect::<Vec<_>>(),
        "discovery": proxy.discovery.report(&proxy.config),
        "state": proxy.admission.backend_status(),
        "remembered_tokens": proxy.identity.remembered_tokens(),
        "usage": proxy.usage.status(|id| client_label(proxy, id)),
        "credentials": proxy.credentials.status(),
        "cache": proxy.cache.as_ref().map(|c| c.status()),
        "recent": {
            "minutes": crate::recent::MINUTES,
            "clients": proxy.metrics.recent().snapshot(),
        },
        "apps": {
            "learned": proxy.apps.learned(),
            "max_learned": proxy.config.identity.max_apps,
            "named": proxy.config.apps.iter().map(|a| serde_json::json!({
                "name": a.name,
                "weight": a.weight,
            })).collect::<Vec<_>>(),
            "use": proxy.metrics.apps().snapshot(),
        },
    })
}

/// Which limits are in shadow, and what they (and shadowed upstream pauses) would have done
/// per limit and client label (see [`crate::shadow`]).
fn shadow_status(proxy: &Proxy) -> serde_json::Value {
    let set = proxy.admission.limits();
    let mut limits: Vec<&str> = set
        .specs
        .iter()
        .filter(|s| s.shadow)
        .map(|s| &*s.name)
        .collect();
    limits.dedup();
    let would: Vec<_> = proxy
        .admission
        .shadow_book()
        .tallies()
        .into_iter()
        .map(|(limit, client, t)| {
            serde_json::json!({
                "limit": &*limit,
                "client": &*client,
                "would_shed": t.would_shed.values().sum::<u64>(),
                "would_shed_by_reason": t.would_shed,
                "would_wait": t.would_wait,
                "would_wait_seconds": t.would_wait_seconds,
            })
        })
        .collect();
    serde_json::json!({
        "server": proxy.config.server.shadow,
        "pauses": set.shadow_pauses,
        "limits": limits,
        "would": would,
    })
}

/// A limiter key's caller as its metric label (bounded; see [`key_label`]).
fn client_label(proxy: &Proxy, caller: &str) -> String {
    proxy.identity.label_of(caller).to_string()
}

/// Which keys keep the critical reserve, and why (see [`crate::reserve`]).
fn reserve_status(proxy: &Proxy) -> serde_json::Value {
    let c = &proxy.config;
    let clients: Vec<&str> = c
        .clients
        .iter()
        .filter(|cl| cl.priority == Priority::Critical)
        .map(|cl| cl.name.as_deref().unwrap_or(&cl.id))
        .collect();
    let routes: Vec<&str> = c
        .routes
        .iter()
        .filter(|r| r.priority == Some(Priority::Critical))
        .map(|r| r.prefix.as_str())
        .collect();
    let (count, learned) = proxy.admission.learned_reserve(100);
    serde_json::json!({
        "share": c.queue.critical_reserve,
        "critical_clients": clients,
        "critical_routes": routes,
        "shared_keys_always": !clients.is_empty(),
        "learned_count": count,
        "learned": learned,
    })
}

/// A limiter key as a bounded label, naming clients as `pacer_requests_total` does.
fn key_label(proxy: &Proxy, part: &KeyPart) -> String {
    let client = |id: &str| -> String { proxy.identity.label_of(id).to_string() };
    match part {
        KeyPart::Global => "global".into(),
        KeyPart::Client(c) => client(c),
        KeyPart::Endpoint(e) => e.to_string(),
        KeyPart::ClientEndpoint(c, e) => format!("{} {e}", client(c)),
    }
}

/// Prometheus text: recorded metrics plus gauges read from the limiter now.
pub fn render_metrics(proxy: &Proxy) -> String {
    let set = proxy.admission.limits();
    // Keys of unidentified callers are folded into one `unknown` sample (their maximum),
    // so the label set stays bounded.
    let mut utilization: BTreeMap<(String, String), f64> = Default::default();
    for (layer, used, inflight) in proxy.admission.usage() {
        let spec = &set.specs[layer.limit];
        let mut ratio: f64 = 0.0;
        if let Some(q) = spec.requests_now() {
            ratio = ratio.max(used as f64 / q.max(1) as f64);
        }
        if let Some(c) = spec.concurrency {
            ratio = ratio.max(inflight as f64 / c[0].max(1) as f64);
        }
        let key = key_label(proxy, &layer.part);
        let e = utilization
            .entry((spec.name.to_string(), key))
            .or_insert(0.0);
        *e = e.max(ratio);
    }
    // Job limits: running jobs over `jobs` (a job limit counts nothing else). Full job
    // slots are an exporter working as it should, so they are also a gauge of their own
    // that the utilization alert leaves out.
    let mut jobs_running: BTreeMap<(String, String), f64> = Default::default();
    for (layer, running) in proxy.admission.jobs_usage() {
        let spec = &set.specs[layer.limit];
        let Some(n) = spec.jobs else { continue };
        let key = key_label(proxy, &layer.part);
        let e = utilization
            .entry((spec.name.to_string(), key.clone()))
            .or_insert(0.0);
        *e = e.max(running as f64 / n.max(1) as f64);
        *jobs_running
            .entry((spec.name.to_string(), key))
            .or_insert(0.0) += running as f64;
    }
    // Pauses of callers that share a label are one sample (the longest).
    let mut paused: BTreeMap<(String, String), f64> = Default::default();
    for ((u, caller), left) in proxy.admission.pauses() {
        let upstream = proxy
            .upstreams
            .get(u)
            .map_or_else(String::new, |u| u.name.to_string());
        let client = key_label(proxy, &KeyPart::Client(caller));
        let e = paused.entry((upstream, client)).or_insert(0.0);
        *e = e.max(left.as_secs_f64());
    }
    let depth = proxy.admission.depth_by_upstream();
    let [cache_entries, cache_bytes] = ResponseCache::gauges(proxy.cache.as_deref());
    let gauges = [
        cache_entries,
        cache_bytes,
        Gauge {
            name: "pacer_limit_utilization_ratio",
            help: "Share of a limit's quota (or concurrency, or job slots) in use now, per key.",
            samples: utilization
                .into_iter()
                .map(|((limit, key), v)| (vec![("limit", limit), ("key", key)], v))
                .collect(),
        },
        Gauge {
            name: "pacer_jobs_running",
            help: "Async jobs holding a slot of a jobs limit now, per key.",
            samples: jobs_running
                .into_iter()
                .map(|((limit, key), v)| (vec![("limit", limit), ("key", key)], v))
                .collect(),
        },
        Gauge {
            name: "pacer_queue_depth",
            help: "Requests waiting for admission.",
            samples: proxy
                .upstreams
                .iter()
                .enumerate()
                .flat_map(|(i, u)| {
                    let d = depth.get(&i).copied().unwrap_or_default();
                    Priority::ALL.into_iter().map(move |p| {
                        (
                            vec![
                                ("upstream", u.name.to_string()),
                                ("priority", p.as_str().to_string()),
                            ],
                            d[p.index()] as f64,
                        )
                    })
                })
                .collect(),
        },
        Gauge {
            name: "pacer_adaptive_rate_factor",
            help:
                "Share of its per-client rate ceiling a client may use after upstream 429s and reported budgets (1 = no cut).",
            samples: {
                // Keys folded into one label (`unknown`) show the deepest cut.
                let mut factors: BTreeMap<(String, String), f64> =
                    Default::default();
                for r in proxy.adaptive.reports() {
                    let upstream = proxy
                        .upstreams
                        .get(r.key.0)
                        .map_or_else(String::new, |u| u.name.to_string());
                    let client = key_label(proxy, &KeyPart::Client(r.key.1));
                    let e = factors.entry((upstream, client)).or_insert(1.0);
                    *e = e.min(r.client_share);
                }
                factors
                    .into_iter()
                    .map(|((upstream, client), v)| {
                        (vec![("upstream", upstream), ("client", client)], v)
                    })
                    .collect()
            },
        },
        Gauge {
            name: "pacer_limit_discovered",
            help: "The org's published size of a limit in force ([discover]), requests per window; only for limits with one.",
            samples: proxy
                .discovery
                .report(&proxy.config)
                .into_iter()
                .filter_map(|r| {
                    let labels = vec![("limit", r.limit), ("upstream", r.upstream.unwrap_or_default())];
                    Some((labels, r.published? as f64))
                })
                .collect(),
        },
        Gauge {
            name: "pacer_state_backend_up",
            help: "1 while the counter store is reachable (always 1 for local state).",
            samples: vec![(
                vec![("backend", proxy.admission.backend_status().kind.to_string())],
                if proxy.admission.backend_status().up {
                    1.0
                } else {
                    0.0
                },
            )],
        },
        Gauge {
            name: "pacer_upstream_paused_seconds",
            help: "Seconds left of a pause the upstream asked for (429 + Retry-After).",
            samples: paused
                .into_iter()
                .map(|((upstream, client), v)| {
                    (vec![("upstream", upstream), ("client", client)], v)
                })
                .collect(),
        },
    ];
    let mut gauges = Vec::from(gauges);
    gauges.extend(proxy.usage.gauges());
    let mut text = proxy.metrics.render(&gauges);
    crate::metrics::render_process(&mut text);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn paused_seconds_labels_stay_bounded_for_any_number_of_callers() {
        let text = format!(
            "{}\n[[client]]\nid = \"ivr-id\"\nname = \"ivr\"\npriority = \"critical\"\n",
            crate::config::MINIMAL
        );
        let proxy = Proxy::new(Arc::new(Config::parse(&text).expect("config"))).expect("proxy");
        proxy.identity.client("oauth-client");
        let pause = |key: &str| {
            proxy
                .admission
                .pause((0, Arc::from(key)), Duration::from_secs(60))
        };
        // Header identities (raw values from the network) and hashed unknown tokens.
        for i in 0..50_000 {
            pause(&format!("header-value-{i}"));
            pause(&format!("token:{i:016x}"));
        }
        pause("ivr-id");
        pause("oauth-client");
        let text = render_metrics(&proxy);
        let samples: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("pacer_upstream_paused_seconds{"))
            .collect();
        let clients: std::collections::BTreeSet<&str> = samples
            .iter()
            .filter_map(|l| l.split("client=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(
            clients.into_iter().collect::<Vec<_>>(),
            ["ivr", "oauth-client", "other", "unknown"],
            "{samples:?}"
        );
        assert_eq!(samples.len(), 4, "one sample per label set: {samples:?}");
    }
}
