//! HTTP clients (HTTP/1.1, h2c, TLS) and a bystander that keeps sending normal requests.

use super::{empty, BoxError, TestBody, TestCerts};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A response read to its end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (panics otherwise).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The single value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// All values of a header.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    }

    /// Asserts pacer's own JSON error shape with this status.
    pub fn assert_pacer_error(&self, status: StatusCode) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let v = self.json();
        assert_eq!(v["status"], status.as_u16(), "{v}");
        for key in ["message", "code", "contextId"] {
            assert!(v[key].is_string(), "{key} missing in {v}");
        }
        assert_eq!(v["details"], serde_json::json!([]), "{v}");
        assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    }
}

/// A pooled hyper-util client bound to one base URL.
pub struct TestClient {
    client: Client<HttpsConnector<HttpConnector>, TestBody>,
    base: String,
}

fn connector(tls: rustls::ClientConfig, h2_only: bool) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    if h2_only {
        b.enable_http2().wrap_connector(http)
    } else {
        b.enable_http1().enable_http2().wrap_connector(http)
    }
}

pub(super) fn client_tls(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

impl TestClient {
    /// HTTP/1.1 to `http://addr`.
    pub fn http1(addr: SocketAddr) -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new())
                .build(connector(client_tls(rustls::RootCertStore::empty()), false)),
            base: format!("http://{addr}"),
        }
    }

    /// HTTP/2 with prior knowledge (h2c) to `http://addr`.
    pub fn h2c(addr: SocketAddr) -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector(client_tls(rustls::RootCertStore::empty()), true)),
            base: format!("http://{addr}"),
        }
    }

    /// HTTPS to `https://localhost:PORT` trusting only the test CA; ALPN h2 and http/1.1.
    pub fn https(addr: SocketAddr, certs: &TestCerts) -> TestClient {
        TestClient {
            client: Client::builder(TokioExecutor::new())
                .build(connector(certs.client_config(), false)),
            base: format!("https://localhost:{}", addr.port()),
        }
    }

    /// A request builder for `path` (path and query) on this client's base URL.
    pub fn request(&self, method: Method, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
    }

    /// `GET path` as the caller holding `token` (a bearer token), without a body.
    pub fn get_as(&self, path: &str, token: &str) -> Request<TestBody> {
        self.request(Method::GET, path)
            .header("authorization", format!("Bearer {token}"))
            .body(empty())
            .expect("request")
    }

    /// Sends `req`, expects `200` announcing a body of `len` bytes, and returns that body
    /// still streaming.
    pub async fn download(&self, req: Request<TestBody>, len: u64) -> Incoming {
        let resp = self.send_streaming(req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let announced = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok());
        assert_eq!(announced, Some(len.to_string().as_str()));
        resp.into_body()
    }

    /// Sends and returns the response with its body still streaming.
    pub async fn send_streaming(&self, req: Request<TestBody>) -> Response<Incoming> {
        self.send_streaming_result(req)
            .await
            .expect("request to pacer failed")
    }

    /// Sends; a connection failure is returned rather than a panic.
    pub async fn send_streaming_result(
        &self,
        req: Request<TestBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.client.request(req).await
    }

    /// Sends and reads the whole response.
    pub async fn send(&self, req: Request<TestBody>) -> Reply {
        let resp = self.send_streaming(req).await;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Reply {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        }
    }

    /// `GET path` with these headers.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = self.request(Method::GET, path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(empty()).expect("request")).await
    }
}

/// A client sending normal requests to `path` in a loop until stopped, counting answers.
pub struct Bystander {
    stop: watch::Sender<bool>,
    task: JoinHandle<(usize, Vec<String>)>,
}

impl Bystander {
    /// Starts sending `GET path` to pacer at `addr` every 100 ms, on fresh connections.
    pub fn start(addr: SocketAddr, path: &str) -> Bystander {
        let (stop, mut stopped) = watch::channel(false);
        let path = path.to_string();
        let task = tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            loop {
                let client = TestClient::http1(addr);
                let req = client
                    .request(Method::GET, &path)
                    .body(empty())
                    .expect("request");
                let sent = tokio::time::timeout(Duration::from_secs(2), async {
                    let resp = client.send_streaming_result(req).await?;
                    let status = resp.status();
                    let body = resp.into_body().collect().await;
                    Ok::<_, BoxError>((status, body.is_ok()))
                })
                .await;
                match sent {
                    Ok(Ok((StatusCode::OK, true))) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.changed() => break,
                }
            }
            (ok, failed)
        });
        Bystander { stop, task }
    }

    /// Stops and asserts every request was served, and at least one was sent.
    pub async fn assert_served(self) {
        let _ = self.stop.send(true);
        let (ok, failed) = self.task.await.expect("bystander task");
        assert!(failed.is_empty(), "bystander requests failed: {failed:?}");
        assert!(ok > 0, "bystander sent nothing");
    }
}
