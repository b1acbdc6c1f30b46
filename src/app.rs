//! Starting and stopping a pacer instance: the proxy listener, the admin listener and
//! the shared state behind them.

use crate::access_log::LogSink;
use crate::admin;
use crate::answer::ProxyBody;
use crate::config::Config;
use crate::edge;
use crate::proxy::Proxy;
use crate::reload::ConfigFile;
use crate::server::{self, ConnInfo, ConnSettings};
use arc_swap::ArcSwap;
use futures_util::FutureExt as _;
use http::{Request, Response};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::ServiceExt as _;

/// Why an instance could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Setup(#[from] crate::proxy::SetupError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("inbound TLS: {0}")]
    Tls(std::io::Error),
}

/// A running instance.
pub struct Running {
    /// Where the proxy listens (the real port when configured with port 0).
    pub proxy_addr: SocketAddr,
    /// Where the admin endpoints listen, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// The configuration in force and the pipeline built from it; swapped whole on reload.
    current: Arc<ArcSwap<Proxy>>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// The proxy of the configuration in force.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.current.load_full()
    }

    /// Puts a new, validated configuration in force for new requests; requests in flight
    /// finish under the old one. Listener settings (`listen`, `admin_listen`, `tls`, limits
    /// of connections) need a restart and are reported, not applied.
    pub fn reload(&self, config: Config) -> Result<(), crate::proxy::SetupError> {
        let old = self.proxy();
        let (a, b) = (&old.config.server, &config.server);
        if a.listen != b.listen
            || a.admin_listen != b.admin_listen
            || a.tls.is_some() != b.tls.is_some()
        {
            tracing::warn!("listener settings changed: they take effect on restart");
        }
        let proxy = Proxy::reload(&old, Arc::new(config))?;
        self.current.store(proxy);
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Stops accepting, answers new requests on open connections with 503, lets in-flight
    /// requests finish within `shutdown_grace`, then returns.
    pub async fn shutdown(self) {
        self.proxy().start_draining();
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

/// Builds everything from a validated configuration and starts serving on the caller's
/// runtime, without an access log (`pacer run` writes it: [`run`]).
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_with_workers(config, 0, None).await
}

/// Like [`start`], with `extra` more serving threads beside the caller's runtime, each
/// with its own runtime and listening socket on the same port (see
/// [`server::run_workers`]), and the access log written to `log` if given. The caller's
/// runtime also runs the shared background work.
pub async fn start_with_workers(
    config: Config,
    extra: usize,
    log: Option<LogSink>,
) -> Result<Running, StartError> {
    let config = Arc::new(config);
    let proxy = Proxy::with_log(config.clone(), log)?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();

    let listen = config.server.listen;
    let listener = if extra == 0 {
        bind(listen).await?
    } else {
        server::bind_shared(listen).map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?
    };
    let proxy_addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })?;
    let mut settings = ConnSettings::from_server(&config.server).map_err(StartError::Tls)?;
    // The connection cap is shared out between the serving threads.
    settings.max_connections = settings.max_connections.div_ceil(extra + 1);
    let current = Arc::new(ArcSwap::new(proxy.clone()));
    let cur = current.clone();
    let handler = move |req: Request<ProxyBody>, conn: ConnInfo| {
        let p = cur.load_full();
        let (sensitive, metrics) = (p.sensitive_headers.clone(), p.metrics.clone());
        let pipeline = Handle { proxy: p, conn };
        edge::wrap(pipeline, sensitive, metrics)
            .oneshot(req)
            .map(edge::into_answer)
    };
    let workers = server::run_workers(
        proxy_addr,
        extra,
        settings.clone(),
        handler.clone(),
        stopped.clone(),
    )
    .map_err(|source| StartError::Listen {
        addr: proxy_addr,
        source,
    })?;
    tasks.push(tokio::spawn(server::serve(
        listener,
        settings,
        handler,
        stopped.clone(),
    )));
    for done in workers {
        tasks.push(tokio::spawn(async move {
            let _ = done.await;
        }));
    }

    let admin_addr = match config.server.admin_listen {
        Some(addr) => {
            let listener = bind(addr).await?;
            let local = listener
                .local_addr()
                .map_err(|source| StartError::Listen { addr, source })?;
            let cur = current.clone();
            let handler = move |req: Request<ProxyBody>, _: ConnInfo| {
                let p = cur.load_full();
                async move { admin::handle(&p, req).await }
            };
            tasks.push(tokio::spawn(server::serve(
                listener,
                ConnSettings::admin(),
                handler,
                stopped,
            )));
            Some(local)
        }
        None => None,
    };
    // The organization's usage, polled with the configuration in force (`[usage]`).
    tasks.push(tokio::spawn(crate::usage::run(
        current.clone(),
        stop.subscribe(),
    )));
    // Histograms are buffered until rendered; keep them bounded when nobody scrapes.
    let (metrics, mut stopped_upkeep) = (proxy.metrics.clone(), stop.subscribe());
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => metrics.upkeep(),
                _ = stopped_upkeep.changed() => return,
            }
        }
    }));
    // The org's published limits (`[discover]`), read at start and every interval.
    tasks.push(tokio::spawn(crate::discover::run(
        current.clone(),
        stop.subscribe(),
    )));
    tracing::info!(%proxy_addr, ?admin_addr, "pacer listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        current,
        stop,
        tasks,
    })
}

/// The proxy's pipeline for the requests of one connection, as a tower service.
#[derive(Clone)]
struct Handle {
    proxy: Arc<Proxy>,
    conn: ConnInfo,
}

impl tower::Service<Request<ProxyBody>> for Handle {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    // Boxed: the pipeline's future is unnameable, and an unboxed one inside the edge
    // layers trips the compiler's higher-ranked `Send` check of the connection task.
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ProxyBody>) -> Self::Future {
        let (proxy, conn) = (self.proxy.clone(), self.conn);
        Box::pin(async move { Ok(proxy.handle(req, conn).await) })
    }
}

/// Serves until SIGINT/SIGTERM, then shuts down gracefully. The file is read again on
/// SIGHUP and, with `[server] watch_config`, whenever its content changes (see
/// [`crate::reload`]): a valid configuration is put in force, an invalid one is reported
/// with every error and the old one stays.
pub async fn run(config: Config, path: Option<std::path::PathBuf>) -> Result<(), StartError> {
    let extra = server::worker_count(config.server.workers).saturating_sub(1);
    let running = start_with_workers(config, extra, Some(LogSink::stdout())).await?;
    let mut file = match path {
        Some(path) => Some(ConfigFile::new(path).await),
        None => None,
    };
    let mut poll = tokio::time::interval(crate::reload::POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hup = ReloadSignal::new();
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let watching = file.is_some() && running.proxy().config.server.watch_config;
        tokio::select! {
            _ = &mut stop => break,
            _ = hup.recv() => {
                if let Some(file) = &mut file {
                    file.reload(&running).await;
                }
            }
            _ = poll.tick(), if watching => {
                if let Some(file) = &mut file {
                    file.check(&running).await;
                }
            }
        }
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// SIGHUPs, listened for once for the whole run so that none is missed between polls.
struct ReloadSignal {
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl ReloadSignal {
    fn new() -> Self {
        ReloadSignal {
            #[cfg(unix)]
            hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// Resolves on the next SIGHUP (never elsewhere).
    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(hup) = &mut self.hup {
            if hup.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
