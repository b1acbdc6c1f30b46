//! Serving threads (`[server] workers`): extra single-threaded runtimes on `SO_REUSEPORT`
//! listeners share one set of limits and end with the instance.

use crate::support::{one_route_config, slot, with_test_listeners, within, Load, TestUpstream};
use pacer::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Names of this process' threads.
fn thread_names() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// One request on a connection of its own (so the kernel may hand it to any listener);
/// the status code of the answer.
async fn status_on_new_connection(addr: std::net::SocketAddr) -> u16 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /api/x HTTP/1.1\r\nhost: pacer\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.expect("read");
    let head = String::from_utf8_lossy(&answer);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_workers_share_one_set_of_limits_and_stop_with_the_instance() {
    let _slot = slot(Load::Alone).await;
    within("workers", async {
        let up = TestUpstream::start().await;
        let text = with_test_listeners(&format!(
            "{}\n[queue]\nmax_wait = \"0s\"\n\n\
             [[limit]]\nname = \"all\"\nscope = \"global\"\nrequests = 20\nper = \"60s\"\n",
            one_route_config("", &up.url(), "")
        ));
        let config = Config::parse(&text).expect("config");
        let pacer = pacer::app::start_with_workers(config, 2, None)
            .await
            .expect("pacer starts");
        let workers = |names: &[String]| {
            names
                .iter()
                .filter(|n| n.starts_with("pacer-worker-"))
                .count()
        };
        // A thread names itself once it runs: wait for both (`within` bounds the wait).
        while workers(&thread_names()) < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(workers(&thread_names()), 2, "{:?}", thread_names());

        let mut statuses = Vec::new();
        for _ in 0..60 {
            statuses.push(status_on_new_connection(pacer.proxy_addr).await);
        }
        let ok = statuses.iter().filter(|&&s| s == 200).count();
        let shed = statuses.iter().filter(|&&s| s == 429).count();
        // One limit for all serving threads: exactly its quota passes, wherever the
        // connections landed, and every other request is answered 429.
        assert_eq!((ok, shed), (20, 40), "{statuses:?}");
        assert_eq!(up.count(), 20);

        pacer.shutdown().await;
        // Each thread has said it is done; it exits right after.
        while workers(&thread_names()) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}
