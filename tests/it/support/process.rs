//! `pacer run` as a child process, for what only the real binary shows: its stdout (the
//! access log) and stderr (its own tracing subscriber, which a test process cannot share
//! without racing the other tests over tracing's per-callsite interest cache).

use super::{free_port, unique_temp_dir};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pacer");

/// A running `pacer run`, its stdout and stderr in files of its own temporary directory.
pub struct PacerProcess {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl PacerProcess {
    /// Writes the configuration `config(proxy_port, admin_port)` to a file and starts
    /// `pacer run` on it with `env` set (and `PACER_LOG_FORMAT` unset unless `env` sets
    /// it); returns once the proxy listener accepts connections.
    pub async fn start(
        tag: &str,
        config: impl FnOnce(u16, u16) -> String,
        env: &[(&str, &str)],
    ) -> PacerProcess {
        let (port, admin_port) = (free_port(), free_port());
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
        let dir = unique_temp_dir(tag);
        let file = dir.join("pacer.toml");
        std::fs::write(&file, config(port, admin_port)).expect("write config");
        let mut cmd = Command::new(BIN);
        cmd.args(["run", "--config", file.to_str().expect("utf-8 path")])
            .env_remove("PACER_LOG_FORMAT")
            .stdout(std::fs::File::create(dir.join("stdout")).expect("stdout file"))
            .stderr(std::fs::File::create(dir.join("stderr")).expect("stderr file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut pacer = PacerProcess {
            child: cmd.spawn().expect("spawn pacer"),
            dir,
            addr,
            admin,
        };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(status) = pacer.child.try_wait().expect("try_wait") {
                panic!("pacer exited with {status}:\n{}", pacer.stderr());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "pacer did not listen on {addr}:\n{}",
                pacer.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pacer
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// What the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        self.read("stdout")
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.read("stderr")
    }

    /// The stdout lines once there are at least `n` (fails after 10 s).
    pub async fn stdout_lines(&self, n: usize) -> Vec<String> {
        let started = Instant::now();
        loop {
            let text = self.stdout();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{} of {n} lines on stdout:\n{text}",
                lines.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the process with SIGTERM; it must exit cleanly. Returns (stdout, stderr).
    pub fn stop(mut self) -> (String, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let exited = self.child.wait().expect("wait for pacer");
        assert!(exited.success(), "pacer exited with {exited:?}");
        (self.stdout(), self.stderr())
    }
}

impl Drop for PacerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
