//! `pacer healthcheck`: the exit code says whether a pacer's `/readyz` answers 200, and one
//! line on stderr says why not.

use crate::support::*;
use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_pacer");

async fn healthcheck(args: &[&str]) -> Output {
    let run = tokio::process::Command::new(BIN)
        .arg("healthcheck")
        .args(args)
        .env_remove("PACER_CONFIG")
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("healthcheck finishes")
        .expect("healthcheck runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn running_pacer() -> (pacer::app::Running, TestUpstream) {
    let up = TestUpstream::start().await;
    let pacer = start_pacer(&one_route_config("", &up.url(), "")).await;
    (pacer, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_zero_when_ready_and_non_zero_when_draining() {
    let _slot = slot(Load::Timed).await;
    within("healthcheck ready and draining", async {
        let (pacer, _up) = running_pacer().await;
        let admin = pacer.admin_addr.expect("admin listener").to_string();
        let out = healthcheck(&["--admin", &admin]).await;
        assert!(out.status.success(), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("ready"),
            "{out:?}"
        );
        pacer.proxy().start_draining();
        let out = healthcheck(&["--admin", &admin]).await;
        assert!(!out.status.success(), "{out:?}");
        let why = stderr(&out);
        assert!(why.contains("503") && why.contains("draining"), "{why}");
        assert_eq!(why.trim_end().lines().count(), 1, "{why}");
        pacer.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_reads_the_admin_address_from_the_configuration() {
    let _slot = slot(Load::Timed).await;
    within("healthcheck from config", async {
        let port = free_port();
        let up = TestUpstream::start().await;
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:{port}\"\n\n\
             [[upstream]]\nname = \"up\"\nurl = \"{}\"\n\n[[route]]\nprefix = \"/\"\nupstream = \"up\"\n",
            up.url()
        );
        let dir = unique_temp_dir("healthcheck");
        let file = dir.join("pacer.toml");
        std::fs::write(&file, &text).expect("write config");
        let config = pacer::config::Config::parse(&text).expect("config");
        let pacer = pacer::app::start(config).await.expect("pacer starts");
        let out = healthcheck(&["--config", file.to_str().expect("path")]).await;
        assert!(out.status.success(), "{out:?}");
        pacer.shutdown().await;
        // Stopped: connection refused.
        let out = healthcheck(&["--config", file.to_str().expect("path")]).await;
        assert!(!out.status.success(), "{out:?}");
        assert!(stderr(&out).contains("cannot connect"), "{out:?}");
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_fails_on_a_refused_port_a_silent_peer_and_another_server() {
    let _slot = slot(Load::Timed).await;
    within("healthcheck failures", async {
        let dead = dead_addr().to_string();
        let out = healthcheck(&["--admin", &dead]).await;
        assert!(!out.status.success(), "{out:?}");
        assert!(stderr(&out).contains("cannot connect"), "{out:?}");

        // Accepts connections (the kernel's backlog) but never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = silent.local_addr().expect("addr");
        let out = healthcheck(&["--admin", &addr.to_string(), "--timeout", "300ms"]).await;
        assert!(!out.status.success(), "{out:?}");
        assert!(stderr(&out).contains("no answer"), "{out:?}");
        drop(silent);

        // An HTTP server without pacer's /readyz (the proxy listener answers 404 there).
        let (pacer, _up) = running_pacer().await;
        let out = healthcheck(&["--admin", &pacer.proxy_addr.to_string()]).await;
        assert!(!out.status.success(), "{out:?}");
        assert!(stderr(&out).contains("404"), "{out:?}");
        pacer.shutdown().await;
    })
    .await;
}

/// The top-level services of `docker-compose.yml` with their lines (two-space indentation,
/// as the file is written).
fn compose_services(text: &str) -> Vec<(String, Vec<String>)> {
    let mut services: Vec<(String, Vec<String>)> = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.is_empty() && !line.starts_with('#') {
            inside = line == "services:";
            continue;
        }
        if !inside {
            continue;
        }
        match line.strip_prefix("  ") {
            Some(name) if !name.starts_with(' ') && name.ends_with(':') => {
                services.push((name.trim_end_matches(':').to_string(), Vec::new()));
            }
            Some(body) => {
                if let Some((_, lines)) = services.last_mut() {
                    lines.push(body.to_string());
                }
            }
            None => {}
        }
    }
    services
}

#[test]
fn compose_builds_pacer_once_and_starts_services_when_healthy() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("docker-compose.yml")).expect("compose file");
    let services = compose_services(&text);
    let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["sim", "pacer", "redis", "prometheus", "grafana"]);
    let has = |lines: &[String], prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    let builds: Vec<&str> = services
        .iter()
        .filter(|(_, l)| has(l, "  build:"))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(builds, ["sim"], "the pacer image is built once");
    for (name, lines) in &services {
        assert!(has(lines, "  healthcheck:"), "{name} has no healthcheck");
        // Long-form dependencies only: each waits for the other to be healthy.
        let waits = lines
            .iter()
            .filter(|l| l.trim() == "condition: service_healthy")
            .count();
        let deps = lines
            .iter()
            .skip_while(|l| !l.starts_with("  depends_on:"))
            .skip(1)
            .take_while(|l| l.starts_with("    "))
            .filter(|l| !l.starts_with("     "))
            .count();
        assert_eq!(
            waits, deps,
            "{name}: every dependency must be healthy first"
        );
        let expect_deps = matches!(name.as_str(), "pacer" | "prometheus" | "grafana");
        assert_eq!(deps > 0, expect_deps, "{name}: dependencies {deps}");
    }
    for name in ["sim", "pacer"] {
        let lines = &services.iter().find(|(n, _)| n == name).expect("service").1;
        assert!(
            has(lines, "  image: pacer:local"),
            "{name} runs another image"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("\"pacer\", \"healthcheck\"")),
            "{name} is not checked with pacer healthcheck"
        );
    }
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains("HEALTHCHECK"), "{dockerfile}");
    assert!(
        dockerfile.contains("CMD [\"pacer\", \"healthcheck\"]"),
        "{dockerfile}"
    );
}
