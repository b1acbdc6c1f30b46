//! Serving threads: single-threaded runtimes, each with its own `SO_REUSEPORT` listener on
//! the same port (`[server] workers`).

use super::*;

thread_local! {
    /// Which serving thread this is (see [`run_workers`]); 0 outside them.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The serving thread the caller runs on, so that per-thread resources (upstream
/// connection pools) stay with their thread.
pub fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// The number of serving threads `[server] workers` asks for (0: one per CPU core).
pub fn worker_count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// A listener on `addr` that other threads may listen on too (`SO_REUSEPORT`): the
/// kernel spreads new connections over them.
pub fn bind_shared(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves `addr` (already bound by the caller with [`bind_shared`]) on `extra` more threads,
/// each running its own single-threaded runtime and listening socket, so a request and
/// its answer never cross threads. Each thread ends when `shutdown` fires; the returned
/// receivers resolve when it has.
pub fn run_workers<H, F>(
    addr: SocketAddr,
    extra: usize,
    settings: ConnSettings,
    handler: H,
    shutdown: watch::Receiver<bool>,
) -> io::Result<Vec<tokio::sync::oneshot::Receiver<()>>>
where
    H: Fn(Request<ProxyBody>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut done = Vec::with_capacity(extra);
    for i in 1..=extra {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Bound here so that a failure is reported before anything serves.
        let listener = {
            let _entered = runtime.enter();
            bind_shared(addr)?
        };
        let (handler, settings, shutdown) = (handler.clone(), settings.clone(), shutdown.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("pacer-worker-{i}"))
            .spawn(move || {
                WORKER.with(|w| w.set(i));
                runtime.block_on(serve(listener, settings, handler, shutdown));
                let _ = tx.send(());
            })?;
        done.push(rx);
    }
    Ok(done)
}
