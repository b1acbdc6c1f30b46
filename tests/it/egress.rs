//! Egress proxy: upstreams reached through an HTTP `CONNECT` proxy, from `[[upstream]]
//! proxy` or from `HTTPS_PROXY`/`HTTP_PROXY` and `NO_PROXY` in the environment.
//!
//! The proxy is a small one of the test's own: it reads the `CONNECT` head, answers 200
//! and splices bytes both ways, recording each tunnel's target and `Proxy-Authorization`.
//! The environment is given to the configuration as a lookup (the tests of one process
//! share the real one), and once to the real binary as a child process.

use crate::support::{
    dead_addr, free_port, one_route_config, slot, start_pacer, start_pacer_with_env,
    wait_listening, within, Load, TestCerts, TestClient, TestUpstream,
};
use http::StatusCode;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One tunnel the proxy opened.
#[derive(Debug, Clone, PartialEq)]
struct Tunnel {
    /// The `CONNECT` target, `host:port`.
    target: String,
    /// The `Proxy-Authorization` value, if any.
    auth: Option<String>,
}

/// A `CONNECT`-only HTTP proxy on `127.0.0.1:0`.
struct ConnectProxy {
    addr: SocketAddr,
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConnectProxy {
    async fn start() -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let seen = tunnels.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(splice(conn, seen.clone()));
            }
        });
        ConnectProxy {
            addr,
            tunnels,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.lock().expect("tunnels lock").clone()
    }
}

/// Serves one client connection of the proxy: a `CONNECT` head, then bytes both ways.
async fn splice(mut conn: TcpStream, seen: Arc<Mutex<Vec<Tunnel>>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let mut lines = text.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next());
    let Some(target) = target.filter(|_| method == "CONNECT") else {
        let _ = conn
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    let auth = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("proxy-authorization")
            .then(|| value.trim().to_string())
    });
    seen.lock().expect("tunnels lock").push(Tunnel {
        target: target.to_string(),
        auth,
    });
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        let _ = conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    if conn
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
}

fn ca_line(certs: &TestCerts) -> String {
    format!("ca_file = '{}'", certs.ca_pem.display())
}

#[tokio::test]
async fn upstreams_go_through_the_configured_connect_proxy_with_its_credentials() {
    let _slot = slot(Load::Timed).await;
    within("egress proxy key", async {
        let certs = TestCerts::new();
        let secure = TestUpstream::start_tls(&certs).await;
        let plain = TestUpstream::start().await;
        let proxy = ConnectProxy::start().await;
        // user "pacer", password "p@ss" (percent-encoded in the URL).
        let url = format!("http://pacer:p%40ss@{}", proxy.addr);
        let config = format!(
            "{}\n[[upstream]]\nname = \"plain\"\nurl = \"{}\"\nproxy = \"{url}\"\n\n\
             [[route]]\nprefix = \"/plain/\"\nupstream = \"plain\"\n",
            one_route_config(
                "",
                &secure.url_localhost(),
                &format!("{}\nproxy = \"{url}\"", ca_line(&certs))
            ),
            plain.url()
        );
        let pacer = start_pacer(&config).await;
        let client = TestClient::http1(pacer.proxy_addr);

        let reply = client.get("/api/secure", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        let seen = secure.only();
        assert_eq!(seen.uri, "/api/secure");
        // TLS runs end to end inside the tunnel: ALPN still finds h2, and the proxy's
        // credentials never reach the upstream.
        assert_eq!(seen.version, http::Version::HTTP_2);
        assert_eq!(seen.header("proxy-authorization"), None);
        let basic = Some("Basic cGFjZXI6cEBzcw==".to_string());
        assert_eq!(
            proxy.tunnels(),
            vec![Tunnel {
                target: format!("localhost:{}", secure.addr.port()),
                auth: basic.clone(),
            }]
        );

        // A plain http upstream is tunnelled too.
        let reply = client.get("/plain/x", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(plain.only().uri, "/plain/x");
        assert_eq!(
            proxy.tunnels().last(),
            Some(&Tunnel {
                target: plain.addr.to_string(),
                auth: basic,
            })
        );
        assert_eq!(proxy.tunnels().len(), 2);
    })
    .await;
}

#[tokio::test]
async fn environment_proxy_applies_no_proxy_bypasses_it_and_the_key_wins() {
    let _slot = slot(Load::Timed).await;
    within("egress proxy from the environment", async {
        let certs = TestCerts::new();
        let up = TestUpstream::start_tls(&certs).await;
        let proxy = ConnectProxy::start().await;
        let config = one_route_config("", &up.url_localhost(), &ca_line(&certs));
        let proxy_url = proxy.url();

        // HTTPS_PROXY applies to an https upstream.
        let pacer = start_pacer_with_env(&config, &[("HTTPS_PROXY", &proxy_url)]).await;
        let reply = TestClient::http1(pacer.proxy_addr)
            .get("/api/via-env", &[])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(proxy.tunnels().len(), 1);
        pacer.shutdown().await;

        // NO_PROXY naming the host: straight to the upstream.
        let env = [
            ("HTTPS_PROXY", proxy_url.as_str()),
            ("NO_PROXY", "localhost"),
        ];
        let pacer = start_pacer_with_env(&config, &env).await;
        let reply = TestClient::http1(pacer.proxy_addr)
            .get("/api/no-proxy", &[])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(
            proxy.tunnels().len(),
            1,
            "NO_PROXY host went through the proxy"
        );
        pacer.shutdown().await;

        // The key wins over the environment: "none" goes direct past a dead proxy.
        let dead = format!("http://{}", dead_addr());
        let direct = one_route_config(
            "",
            &up.url_localhost(),
            &format!("{}\nproxy = \"none\"", ca_line(&certs)),
        );
        let pacer = start_pacer_with_env(&direct, &[("HTTPS_PROXY", &dead)]).await;
        let reply = TestClient::http1(pacer.proxy_addr)
            .get("/api/direct", &[])
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        pacer.shutdown().await;
        assert_eq!(up.count(), 3);
        assert_eq!(proxy.tunnels().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_or_refusing_egress_proxy_is_a_502() {
    let _slot = slot(Load::Timed).await;
    within("egress proxy down", async {
        let certs = TestCerts::new();
        let up = TestUpstream::start_tls(&certs).await;
        let config = one_route_config(
            "",
            &up.url_localhost(),
            &format!("{}\nproxy = \"http://{}\"", ca_line(&certs), dead_addr()),
        );
        let pacer = start_pacer(&config).await;
        TestClient::http1(pacer.proxy_addr)
            .get("/api/x", &[])
            .await
            .assert_pacer_error(StatusCode::BAD_GATEWAY);

        // A proxy that refuses the tunnel (407, no credentials) is a 502 as well.
        let refusing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let refusing_addr = refusing.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = refusing.accept().await {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n",
                    )
                    .await;
            }
        });
        let config = one_route_config(
            "",
            &up.url_localhost(),
            &format!("{}\nproxy = \"http://{refusing_addr}\"", ca_line(&certs)),
        );
        let pacer = start_pacer(&config).await;
        TestClient::http1(pacer.proxy_addr)
            .get("/api/x", &[])
            .await
            .assert_pacer_error(StatusCode::BAD_GATEWAY);
        task.abort();
        assert_eq!(up.count(), 0);
    })
    .await;
}

/// The real binary reads the process environment (lower-case `https_proxy` here, with
/// credentials that must reach the proxy and never the log).
#[tokio::test]
async fn the_binary_takes_the_proxy_from_its_environment() {
    let _slot = slot(Load::Timed).await;
    within("egress proxy from the process environment", async {
        let certs = TestCerts::new();
        let up = TestUpstream::start_tls(&certs).await;
        let proxy = ConnectProxy::start().await;
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir = crate::support::unique_temp_dir("egress");
        let file = dir.join("pacer.toml");
        let log = dir.join("stderr.log");
        let config = one_route_config(
            &format!("listen = \"{addr}\"\nadmin_listen = \"127.0.0.1:0\""),
            &up.url_localhost(),
            &ca_line(&certs),
        );
        std::fs::write(&file, config).unwrap();
        const PASSWORD: &str = "Pr0xyPassw0rd";
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pacer"))
            .args(["run", "--config", file.to_str().unwrap()])
            .env_remove("HTTPS_PROXY")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env(
                "https_proxy",
                format!("http://svc:{PASSWORD}@{}", proxy.addr),
            )
            .env("PACER_LOG", "debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn pacer");
        wait_listening(addr, "pacer").await;
        let reply = TestClient::http1(addr).get("/api/child", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("svc:{PASSWORD}"));
        assert_eq!(
            proxy.tunnels(),
            vec![Tunnel {
                target: format!("localhost:{}", up.addr.port()),
                auth: Some(format!("Basic {basic}")),
            }]
        );
        let _ = child.start_kill();
        let _ = child.wait().await;
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("egress through a CONNECT proxy"), "{text}");
        assert!(text.contains("https_proxy"), "{text}");
        assert!(
            !text.contains(PASSWORD) && !text.contains(&basic),
            "proxy credentials logged:\n{text}"
        );
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}
