//! Reloading the configuration file given to `pacer run`: on SIGHUP, and when its content
//! changes on disk (`[server] watch_config`). Either way a valid file is put in force and
//! an invalid one is refused with every error logged, keeping the configuration in force.
//!
//! Changes are found by reading the file every [`POLL`] and comparing a SHA-256 of its
//! content, not by file-system events: a Kubernetes ConfigMap volume changes the file by
//! swapping a `..data` symlink in its directory (the file itself is a symlink through it
//! and never gets an event of its own), editors and `mv` rename over it, and a read of
//! the path through every symlink sees all of these alike, on every file system
//! (overlay, NFS, projected volumes) and with no inotify limits. The cost is one read of
//! a small file a second; a rewrite with the same content reloads nothing.

use crate::app::Running;
use crate::config::Config;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::Duration;

/// How often the file is read to look for a change.
pub const POLL: Duration = Duration::from_secs(1);

/// A changed file is read again after this and used only if it reads the same: a file
/// being written in place is not loaded half-written.
const SETTLE: Duration = Duration::from_millis(100);

/// The configuration file and the content last put in force or refused.
pub struct ConfigFile {
    path: PathBuf,
    digest: Option<[u8; 32]>,
    /// The last read failed (logged once, not every poll).
    unreadable: bool,
}

impl ConfigFile {
    /// Watches `path`, whose current content is the configuration in force.
    pub async fn new(path: PathBuf) -> ConfigFile {
        let digest = tokio::fs::read(&path).await.ok().map(|b| digest(&b));
        ConfigFile {
            path,
            digest,
            unreadable: false,
        }
    }

    /// SIGHUP: reads the file and reloads it, changed or not.
    pub async fn reload(&mut self, running: &Running) {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => self.apply(&bytes, running),
            Err(e) => {
                tracing::error!(file = %self.path.display(), error = %e, "cannot read the configuration; keeping the configuration in force");
            }
        }
    }

    /// A poll: reloads when the content differs from what was last loaded or refused.
    pub async fn check(&mut self, running: &Running) {
        let Some(bytes) = self.read().await else {
            return;
        };
        let seen = digest(&bytes);
        if self.digest == Some(seen) {
            return;
        }
        tokio::time::sleep(SETTLE).await;
        match self.read().await {
            Some(again) if digest(&again) == seen => {}
            // Still being written: the next poll looks again.
            _ => return,
        }
        tracing::info!(file = %self.path.display(), "configuration file changed; reloading");
        self.apply(&bytes, running);
    }

    async fn read(&mut self) -> Option<Vec<u8>> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => {
                self.unreadable = false;
                Some(bytes)
            }
            Err(e) => {
                if !self.unreadable {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot read the configuration file; keeping the configuration in force");
                }
                self.unreadable = true;
                None
            }
        }
    }

    fn apply(&mut self, bytes: &[u8], running: &Running) {
        self.digest = Some(digest(bytes));
        let parsed = match std::str::from_utf8(bytes) {
            Ok(text) => Config::parse(text),
            Err(e) => Err(crate::config::ConfigErrors(vec![
                crate::config::ConfigError {
                    path: String::new(),
                    message: format!("not UTF-8: {e}"),
                },
            ])),
        };
        match parsed {
            Ok(config) => {
                if let Err(e) = running.reload(config) {
                    tracing::error!(error = %e, "reload failed; keeping the configuration in force");
                }
            }
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(error = %e, "invalid configuration");
                }
                tracing::error!(file = %self.path.display(), "reload refused; keeping the configuration in force");
            }
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}
