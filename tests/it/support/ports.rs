//! Loopback addresses: refused ones, reserved ones, and free ports for child processes.

use std::net::SocketAddr;

/// An address nothing listens on: a socket bound to it but never listening, kept open for
/// the rest of the test process, so connecting is refused and no other listener of this
/// process (a pacer, an upstream) can be given the same port meanwhile.
pub fn dead_addr() -> SocketAddr {
    let (addr, socket) = reserved_addr();
    std::mem::forget(socket);
    addr
}

/// A free loopback port for a child process (redis-server, a pacer process) to listen on.
/// Taken below the kernel's ephemeral range (32768 and up on Linux), where outgoing
/// connections get their source ports: a port picked with `bind(":0")` and released could
/// be taken by any connection before the child binds it; here only another test process
/// could take it, and each process walks its own stretch of the range. The port 10000
/// above it is free too and also below the ephemeral range: a Redis Cluster node listens
/// there for its cluster bus.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 12_000;
    const SPAN: u32 = 10_000;
    const BUS_OFFSET: u16 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = (std::process::id().wrapping_mul(7919)) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..SPAN {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % SPAN;
        let port = (FIRST + offset) as u16;
        if free(port) && free(port + BUS_OFFSET) {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// A socket bound to a free port but not listening yet: connecting is refused until
/// `socket.listen(..)` turns it into a listener on that very port.
pub fn reserved_addr() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    (socket.local_addr().expect("local addr"), socket)
}

/// Waits until something accepts connections on `addr` (a child process has started
/// listening); fails after a generous 10 s.
pub async fn wait_listening(addr: SocketAddr, what: &str) {
    let started = std::time::Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{what} did not start listening on {addr}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
