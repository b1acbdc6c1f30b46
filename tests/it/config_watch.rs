//! Reloading when the configuration file changes on disk (`[server] watch_config`), with
//! the real binary: a Kubernetes ConfigMap update (an atomic swap of the `..data` symlink
//! the file points through), a write to a temporary file renamed over it, and a bad new
//! file, which keeps the configuration in force.

use crate::support::{free_port, slot, wait_listening, within, Load, TestClient, TestUpstream};
use http::StatusCode;
use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A configuration serving `prefix` from `upstream`, listening on `port`.
fn config(port: u16, upstream: &str, prefix: &str, server: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n{server}\n\
         [[upstream]]\nname = \"api\"\nurl = \"{upstream}\"\n\
         [[route]]\nprefix = \"{prefix}\"\nupstream = \"api\"\n\
         [identity]\ntokens_me = false\n"
    )
}

/// Valid TOML whose route names an upstream that does not exist.
fn broken(port: u16, upstream: &str) -> String {
    config(port, upstream, "/b/", "").replace(
        "upstream = \"api\"\n[identity]",
        "upstream = \"nowhere\"\n[identity]",
    )
}

/// A running `pacer run --config FILE` whose log goes to a file.
struct Pacer {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Pacer {
    async fn start(file: &Path, port: u16, dir: &Path) -> Pacer {
        let log = dir.join("stderr.log");
        let child = Command::new(env!("CARGO_BIN_EXE_pacer"))
            .args(["run", "--config", file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_listening(addr, "pacer").await;
        Pacer { child, addr, log }
    }

    async fn status(&self, path: &str) -> StatusCode {
        TestClient::http1(self.addr).get(path, &[]).await.status
    }

    /// Waits (up to 5 s, well over the 1 s poll) until `path` answers `status`.
    async fn until(&self, path: &str, status: StatusCode) {
        let started = Instant::now();
        while self.status(path).await != status {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{path} never answered {status}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 5 s) until the log contains `needle`; returns the log.
    async fn logged(&self, needle: &str) -> String {
        let started = Instant::now();
        loop {
            let text = self.log_text();
            if text.contains(needle) {
                return text;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{needle:?} never logged:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let exited = self.child.wait().unwrap();
        assert!(exited.success(), "SIGTERM: {exited:?}");
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory laid out like a Kubernetes ConfigMap volume: `pacer.toml -> ..data/pacer.toml`,
/// `..data -> ..<version>`, the content in `..<version>/pacer.toml`.
struct ConfigMapDir {
    dir: PathBuf,
    version: u32,
}

impl ConfigMapDir {
    fn new(dir: &Path, content: &str) -> ConfigMapDir {
        let mut d = ConfigMapDir {
            dir: dir.to_path_buf(),
            version: 0,
        };
        let first = d.write_version(content);
        symlink(&first, dir.join("..data")).unwrap();
        symlink("..data/pacer.toml", dir.join("pacer.toml")).unwrap();
        d
    }

    fn file(&self) -> PathBuf {
        self.dir.join("pacer.toml")
    }

    /// Writes the content into a new `..<version>` directory; returns its name.
    fn write_version(&mut self, content: &str) -> String {
        self.version += 1;
        let name = format!(
            "..2026_12_06_00_00_0{}.{}",
            self.version,
            1000 + self.version
        );
        std::fs::create_dir(self.dir.join(&name)).unwrap();
        std::fs::write(self.dir.join(&name).join("pacer.toml"), content).unwrap();
        name
    }

    /// What the kubelet does on a ConfigMap update: the new content in a new directory,
    /// `..data_tmp -> it`, renamed over `..data` (atomic), the old directory removed.
    fn update(&mut self, content: &str) {
        let old = std::fs::read_link(self.dir.join("..data")).unwrap();
        let new = self.write_version(content);
        symlink(&new, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(self.dir.join(old)).unwrap();
    }
}

/// Writes `content` beside `file` and renames it over `file`, as editors and `mv` do.
fn rename_over(file: &Path, content: &str) {
    let tmp = file.with_extension("toml.tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

#[tokio::test]
async fn a_kubernetes_configmap_update_reloads_and_a_bad_one_keeps_the_old_config() {
    let _slot = slot(Load::Timed).await;
    within("ConfigMap symlink swap", async {
        let upstream = TestUpstream::start().await;
        let port = free_port();
        let dir = crate::support::unique_temp_dir("configmap");
        let mut volume = ConfigMapDir::new(&dir, &config(port, &upstream.url(), "/a/", ""));
        let pacer = Pacer::start(&volume.file(), port, &dir).await;
        assert_eq!(pacer.status("/a/x").await, StatusCode::OK);
        assert_eq!(pacer.status("/b/x").await, StatusCode::NOT_FOUND);

        // A bad update: refused with its errors logged; the old configuration serves.
        volume.update(&broken(port, &upstream.url()));
        let log = pacer.logged("reload refused").await;
        assert!(log.contains("route[0].upstream"), "{log}");
        assert_eq!(pacer.status("/a/x").await, StatusCode::OK);
        assert_eq!(pacer.status("/b/x").await, StatusCode::NOT_FOUND);

        // A good update: in force without a signal.
        volume.update(&config(port, &upstream.url(), "/b/", ""));
        pacer.until("/b/x", StatusCode::OK).await;
        assert_eq!(pacer.status("/a/x").await, StatusCode::NOT_FOUND);
        pacer.stop();
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test]
async fn a_file_renamed_over_the_config_reloads_and_the_same_content_does_not() {
    let _slot = slot(Load::Timed).await;
    within("rename over the file", async {
        let upstream = TestUpstream::start().await;
        let port = free_port();
        let dir = crate::support::unique_temp_dir("rename");
        let file = dir.join("pacer.toml");
        let first = config(port, &upstream.url(), "/a/", "");
        std::fs::write(&file, &first).unwrap();
        let pacer = Pacer::start(&file, port, &dir).await;
        assert_eq!(pacer.status("/a/x").await, StatusCode::OK);

        // The same content, renamed over: nothing to reload.
        rename_over(&file, &first);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !pacer.log_text().contains("changed"),
            "{}",
            pacer.log_text()
        );
        // A bad file, renamed over: refused, and its content is not tried again each poll.
        rename_over(&file, &broken(port, &upstream.url()));
        pacer.logged("reload refused").await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let log = pacer.log_text();
        assert_eq!(log.matches("reload refused").count(), 1, "{log}");
        assert!(!log.contains("configuration reloaded"), "{log}");
        assert_eq!(pacer.status("/a/x").await, StatusCode::OK);

        rename_over(&file, &config(port, &upstream.url(), "/b/", ""));
        pacer.until("/b/x", StatusCode::OK).await;
        assert_eq!(pacer.status("/a/x").await, StatusCode::NOT_FOUND);
        let log = pacer.log_text();
        assert_eq!(log.matches("configuration reloaded").count(), 1, "{log}");
        pacer.stop();
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test]
async fn watch_config_false_leaves_reloading_to_sighup() {
    let _slot = slot(Load::Timed).await;
    within("watch_config = false", async {
        let upstream = TestUpstream::start().await;
        let port = free_port();
        let dir = crate::support::unique_temp_dir("nowatch");
        let file = dir.join("pacer.toml");
        let off = "watch_config = false";
        std::fs::write(&file, config(port, &upstream.url(), "/a/", off)).unwrap();
        let pacer = Pacer::start(&file, port, &dir).await;

        rename_over(&file, &config(port, &upstream.url(), "/b/", off));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(pacer.status("/b/x").await, StatusCode::NOT_FOUND);
        assert!(!pacer.log_text().contains("configuration reloaded"));

        let hup = Command::new("kill")
            .args(["-HUP", &pacer.child.id().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
        pacer.until("/b/x", StatusCode::OK).await;
        pacer.stop();
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}
