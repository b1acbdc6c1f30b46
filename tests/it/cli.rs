//! The `pacer` binary: `check-config`, refusing bad configuration at start, and reloading
//! on SIGHUP (a bad file keeps the configuration in force).

use crate::support::{slot, slot_blocking, wait_listening, within, Load, TestClient, TestUpstream};
use http::StatusCode;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pacer");

const BROKEN: &str = r#"
[server]
listen = "127.0.0.1:0"
header_read_timeout = "soon"

[[upstream]]
name = "api"
url = "api.example.com"

[[route]]
prefix = "/"
upstream = "nowhere"

[[limit]]
name = "x"
requests = 10
"#;

#[test]
fn check_config_lists_every_error_with_its_key_path() {
    let _slot = slot_blocking(Load::Timed);
    let dir = crate::support::unique_temp_dir("check");
    let file = dir.join("broken.toml");
    std::fs::write(&file, BROKEN).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "server.header_read_timeout",
        "upstream[0].url: relative URL \"api.example.com\"",
        "route[0].upstream: no [[upstream]] named \"nowhere\"",
        "limit[0].per: required with `requests`",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `pacer check-config FILE` with nothing in the environment but `PATH` and `env`.
fn check_config(file: &str, env: &[(&str, &str)]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(BIN);
    cmd.args(["check-config", root.join(file).to_str().unwrap()])
        .env_clear()
        .envs(env.iter().copied());
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.output().unwrap()
}

/// The README's quick start: the shipped examples validate on a fresh machine. The
/// API-only examples need no environment at all; the CRM example needs exactly the key it
/// documents, and without it is refused naming it.
#[test]
fn shipped_configs_pass_check_config() {
    let _slot = slot_blocking(Load::Timed);
    for file in ["config/pacer.toml", "config/genesys.toml"] {
        let out = check_config(file, &[]);
        assert!(
            out.status.success(),
            "{file} with an empty environment: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let crm = "config/genesys-crm.toml";
    let documented = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(crm))
        .expect("CRM example");
    assert!(
        documented.contains("PACER_DA_KEY"),
        "{crm} documents no env var"
    );
    let out = check_config(crm, &[("PACER_DA_KEY", "a-key-for-the-test")]);
    assert!(
        out.status.success(),
        "{crm} with PACER_DA_KEY: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check_config(crm, &[]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("PACER_DA_KEY"),
        "{crm} without PACER_DA_KEY must be refused naming it: {text}"
    );
}

#[test]
fn run_refuses_to_start_on_invalid_config() {
    let _slot = slot_blocking(Load::Timed);
    let dir = crate::support::unique_temp_dir("refuse");
    let file = dir.join("broken.toml");
    std::fs::write(&file, BROKEN).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("refusing to start") && text.contains("route[0].upstream"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn config(port: u16, upstream: &str, prefix: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:0"
# SIGHUP alone reloads here (the file watch has tests of its own: config_watch.rs).
watch_config = false
[[upstream]]
name = "api"
url = "{upstream}"
[[route]]
prefix = "{prefix}"
upstream = "api"
[identity]
tokens_me = false
"#
    )
}

async fn status_of(addr: SocketAddr, path: &str) -> StatusCode {
    TestClient::http1(addr).get(path, &[]).await.status
}

#[tokio::test]
async fn sighup_reloads_and_a_bad_file_keeps_the_old_config() {
    let _slot = slot(Load::Timed).await;
    within("reload", async {
        let upstream = TestUpstream::start().await;
        let port = crate::support::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir = crate::support::unique_temp_dir("reload");
        let file = dir.join("pacer.toml");
        std::fs::write(&file, config(port, &upstream.url(), "/a/")).unwrap();
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let mut child = Command::new(BIN)
            .args(["run", "--config", file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_listening(addr, "pacer").await;
        let hup = |pid: u32| {
            let ok = Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
        };
        assert_eq!(status_of(addr, "/a/x").await, StatusCode::OK);
        assert_eq!(status_of(addr, "/b/x").await, StatusCode::NOT_FOUND);

        // A broken file: refused, every error logged, the old configuration still serves.
        std::fs::write(&file, BROKEN).unwrap();
        hup(child.id());
        let log_path = dir.join("stderr.log");
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("reload refused") {
                assert!(text.contains("route[0].upstream"), "{text}");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no reload refusal logged:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status_of(addr, "/a/x").await, StatusCode::OK);
        assert!(
            child.try_wait().unwrap().is_none(),
            "pacer exited on a bad reload"
        );

        // A good file: in force for new requests.
        std::fs::write(&file, config(port, &upstream.url(), "/b/")).unwrap();
        hup(child.id());
        let started = Instant::now();
        while status_of(addr, "/b/x").await != StatusCode::OK {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "new route never served"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status_of(addr, "/a/x").await, StatusCode::NOT_FOUND);
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let exited = child.wait().unwrap();
        assert!(
            exited.success(),
            "SIGTERM should shut down cleanly: {exited:?}"
        );
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}
