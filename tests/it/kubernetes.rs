//! The Kubernetes example, `deploy/kubernetes/sidecar.yaml`: pacer is a native sidecar
//! (an init container with `restartPolicy: Always`) with a startup probe, every Secret
//! the pods reference is in the file, the ConfigMap is mounted as a directory (a `subPath`
//! mount never sees updates, so the file watch would never fire), and the configuration
//! in it validates.
//!
//! The YAML is read with python3's PyYAML (there is no YAML parser among pacer's
//! dependencies) and handed over as JSON; without PyYAML only text checks run.

use crate::support::{slot_blocking, Load};
use pacer::config::Config;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn manifest_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/sidecar.yaml")
}

/// Every document of the manifest as JSON, or `None` without python3 and PyYAML.
fn documents() -> Option<Vec<Value>> {
    const SCRIPT: &str =
        "import sys, json, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)";
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(manifest_path())
        .output()
        .ok()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        assert!(
            stderr.contains("No module named 'yaml'"),
            "sidecar.yaml does not parse: {stderr}"
        );
        return None;
    }
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON from python3");
    Some(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn named<'a>(items: &'a Value, name: &str) -> &'a Value {
    items
        .as_array()
        .and_then(|a| a.iter().find(|i| i["name"] == name))
        .unwrap_or_else(|| panic!("no item named {name:?} in {items}"))
}

#[test]
fn sidecar_manifest_is_a_native_sidecar_with_its_secrets_and_a_directory_mount() {
    let _slot = slot_blocking(Load::Timed);
    let text = std::fs::read_to_string(manifest_path()).expect("read sidecar.yaml");
    assert!(
        !text.contains("subPath:"),
        "a subPath mount never sees ConfigMap updates"
    );
    let Some(docs) = documents() else {
        eprintln!(
            "SKIP structure of sidecar.yaml: python3 with PyYAML not found; text checks only"
        );
        for needle in [
            "restartPolicy: Always",
            "startupProbe:",
            "automountServiceAccountToken: false",
            "runAsNonRoot: true",
        ] {
            assert!(text.contains(needle), "sidecar.yaml lacks {needle:?}");
        }
        return;
    };
    let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k);
    let deployment = kind("Deployment").next().expect("a Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    // pacer: a native sidecar, probed on the admin port.
    let pacer = named(&pod["initContainers"], "pacer");
    assert_eq!(pacer["restartPolicy"], "Always");
    let admin = named(&pacer["ports"], "admin")["containerPort"].clone();
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ] {
        let get = &pacer[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(get["port"] == "admin" || get["port"] == admin, "{probe}");
    }
    assert_eq!(pacer["securityContext"]["allowPrivilegeEscalation"], false);
    let containers = pod["containers"].as_array().expect("containers");
    assert!(
        containers.iter().all(|c| c["name"] != "pacer"),
        "pacer must run as a native sidecar, not beside the app in `containers`"
    );

    // Every Secret key referenced is in the file.
    let all = pod["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(containers);
    for container in all {
        for var in container["env"].as_array().into_iter().flatten() {
            let r = &var["valueFrom"]["secretKeyRef"];
            if r.is_null() {
                continue;
            }
            let secret = kind("Secret")
                .find(|s| s["metadata"]["name"] == r["name"])
                .unwrap_or_else(|| panic!("Secret {} is not in sidecar.yaml", r["name"]));
            let key = r["key"].as_str().expect("secretKeyRef.key");
            assert!(
                !secret["stringData"][key].is_null() || !secret["data"][key].is_null(),
                "Secret {} has no key {key}",
                r["name"]
            );
        }
    }

    // The ConfigMap, mounted as a directory, holds the file `run --config` names.
    let mount = named(&pacer["volumeMounts"], "pacer-config");
    assert!(mount["subPath"].is_null());
    let dir = mount["mountPath"].as_str().expect("mountPath");
    let args: Vec<&str> = pacer["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let file = args
        .iter()
        .skip_while(|a| **a != "--config")
        .nth(1)
        .expect("--config FILE");
    let key = file
        .strip_prefix(&format!("{dir}/"))
        .unwrap_or_else(|| panic!("{file} is not in the mounted directory {dir}"));
    let map_name = &named(&pod["volumes"], "pacer-config")["configMap"]["name"];
    let map = kind("ConfigMap")
        .find(|m| &m["metadata"]["name"] == map_name)
        .expect("the mounted ConfigMap");
    let toml = map["data"][key]
        .as_str()
        .expect("the config file in the ConfigMap");
    let env = |name: &str| (name == "PACER_REDIS_URL").then(|| "redis://127.0.0.1:6379/".into());
    let config = Config::parse_with_env(toml, &env)
        .unwrap_or_else(|e| panic!("the ConfigMap's {key} is invalid:\n{e}"));
    assert!(config.server.watch_config);
}
