//! Connections to Redis in whichever topology `[state]` names: one server (`single`, also
//! over TLS with `rediss://` and `ca_file`), a Redis Cluster (`cluster`) or the primary the
//! Sentinels name (`sentinel`, asked again at every connection so a failover is followed).

use crate::config::{RedisMode, StateConfig};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value};
use std::time::Duration;

/// A connection to whichever topology is configured; commands, pipelines and scripts are
/// routed by their keys (all carry the `{prefix}` tag, so one slot in a cluster).
#[derive(Clone)]
pub(super) enum Conn {
    /// One server, or the primary the Sentinels named.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Redis' clock as `(seconds, microseconds)`, read on the server holding `key`: in a
    /// cluster, the primary of its slot, whose clock the admission script uses too.
    pub(super) async fn time(&mut self, key: &str) -> Result<(u64, u64), redis::RedisError> {
        let time = redis::cmd("TIME");
        match self {
            Conn::Single(c) => time.query_async(c).await,
            Conn::Cluster(c) => {
                let route = Route::new(key_slot(key.as_bytes()), SlotAddr::Master);
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                redis::from_owned_redis_value(c.route_command(&time, route).await?)
            }
        }
    }
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag, or of the whole key without
/// one, modulo 16384.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&c| c == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&c| c == b'}')
                .map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty());
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Where Redis is, from `[state]`.
pub(super) enum Target {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
    Sentinel {
        sentinels: Vec<ConnectionInfo>,
        master: String,
        /// Credentials and database of the primary: those of the first Sentinel URL.
        node: SentinelNodeConnectionInfo,
    },
}

impl Target {
    pub(super) fn new(cfg: &StateConfig) -> Result<Target, redis::RedisError> {
        let nodes = || -> Result<Vec<ConnectionInfo>, redis::RedisError> {
            cfg.nodes
                .iter()
                .map(|n| n.expose().into_connection_info())
                .collect()
        };
        let timeout = cfg.timeout.0 * 10;
        let certs = match &cfg.ca_file {
            Some(path) => Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(path).map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "state.ca_file",
                        format!("{}: {e}", path.display()),
                    ))
                })?),
            }),
            None => None,
        };
        Ok(match cfg.mode {
            RedisMode::Single => {
                let url = cfg
                    .url
                    .as_ref()
                    .map(|u| u.expose().to_string())
                    .unwrap_or_default();
                match certs {
                    Some(certs) => Target::Single(redis::Client::build_with_tls(url, certs)?),
                    None => Target::Single(redis::Client::open(url)?),
                }
            }
            RedisMode::Cluster => {
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes()?)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(3);
                if let Some(certs) = certs {
                    builder = builder.certs(certs);
                }
                Target::Cluster(builder.build()?)
            }
            RedisMode::Sentinel => {
                let sentinels = nodes()?;
                let first = sentinels.first().ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "no sentinel nodes",
                    ))
                })?;
                let tls_mode = match &first.addr {
                    redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                        Some(redis::TlsMode::Insecure)
                    }
                    redis::ConnectionAddr::TcpTls { .. } => Some(redis::TlsMode::Secure),
                    _ => None,
                };
                let node = SentinelNodeConnectionInfo {
                    tls_mode,
                    redis_connection_info: Some(first.redis.clone()),
                };
                Target::Sentinel {
                    master: cfg.master.clone().unwrap_or_default(),
                    sentinels,
                    node,
                }
            }
        })
    }

    /// A new connection; for Sentinel, to the primary the Sentinels name now.
    pub(super) async fn connect(&self, timeout: Duration) -> Result<Conn, redis::RedisError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(1);
        match self {
            Target::Single(client) => ConnectionManager::new_with_config(client.clone(), config)
                .await
                .map(Conn::Single),
            Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
            Target::Sentinel {
                sentinels,
                master,
                node,
            } => {
                // A fresh client each time: no cached connection to a Sentinel that died.
                let mut sentinel = SentinelClient::build(
                    sentinels.clone(),
                    master.clone(),
                    Some(node.clone()),
                    SentinelServerType::Master,
                )?;
                let client = sentinel.async_get_client().await?;
                let addr = client.get_connection_info().addr.to_string();
                let conn = ConnectionManager::new_with_config(client, config).await?;
                tracing::info!(master = %master, addr = %addr, "redis primary from sentinel");
                Ok(Conn::Single(conn))
            }
        }
    }
}

#[cfg(test)]
mod tests;
