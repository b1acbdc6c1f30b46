//! The floor of pacer's stack, for `bench/compare.sh`: a minimal hyper 1 reverse proxy.
//!
//! hyper-util's auto server (HTTP/1.1 and h2c) in front of hyper-util's legacy client with
//! pooled keep-alive connections, on tokio. No limits, no routing, no timeouts, no logic:
//! each request goes to the origin with the same path and query, and the answer streams
//! back. Only the hop-by-hop headers are dropped, as any proxy must.
//!
//! ```sh
//! cargo run --release --example bare_proxy -- 127.0.0.1:8081 http://127.0.0.1:8082
//! cargo run --release --example bare_proxy -- --current-thread 127.0.0.1:8081 http://127.0.0.1:8082
//! ```
//!
//! The default runtime is tokio's multi-thread one (a worker per core); `--current-thread`
//! runs everything on one thread.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

const USAGE: &str = "usage: bare_proxy [--current-thread] LISTEN_ADDR ORIGIN_URL\n\
                     e.g.   bare_proxy 127.0.0.1:8081 http://127.0.0.1:8082";

/// Headers that belong to one connection and are never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

type Body = Either<Incoming, Empty<Bytes>>;

/// Where requests go: the origin's scheme and authority (its path is not used).
#[derive(Clone)]
struct Origin {
    scheme: Scheme,
    authority: Authority,
}

struct Args {
    current_thread: bool,
    listen: SocketAddr,
    origin: Origin,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut current_thread = false;
    let mut positional = Vec::new();
    for arg in args {
        match arg.as_str() {
            "--current-thread" => current_thread = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            s if s.starts_with('-') => return Err(format!("unknown flag {s}\n{USAGE}")),
            _ => positional.push(arg),
        }
    }
    let [listen, origin] = positional.as_slice() else {
        return Err(USAGE.to_owned());
    };
    let listen: SocketAddr = listen
        .parse()
        .map_err(|e| format!("listen address {listen:?}: {e}"))?;
    let uri: Uri = origin
        .parse()
        .map_err(|e| format!("origin {origin:?}: {e}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return Err(format!("origin {origin:?}: needs http://host:port"));
    };
    if scheme != &Scheme::HTTP {
        return Err(format!("origin {origin:?}: only http is supported"));
    }
    Ok(Args {
        current_thread,
        listen,
        origin: Origin {
            scheme: scheme.clone(),
            authority: authority.clone(),
        },
    })
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    origin: Origin,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(origin.scheme)
        .authority(origin.authority)
        .path_and_query(path)
        .build();
    match uri {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST)),
    }
    strip_hop_by_hop(req.headers_mut());
    match client.request(req).await {
        Ok(res) => {
            let mut res = res.map(Either::Left);
            strip_hop_by_hop(res.headers_mut());
            Ok(res)
        }
        Err(_) => Ok(status(StatusCode::BAD_GATEWAY)),
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut res = Response::new(Either::Right(Empty::new()));
    *res.status_mut() = code;
    res
}

async fn serve(listen: SocketAddr, origin: Origin) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .build(http);
    let server = auto::Builder::new(TokioExecutor::new());
    eprintln!("bare_proxy: listening on {listen}");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                eprintln!("bare_proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let origin = origin.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| forward(client.clone(), origin.clone(), req));
            // A client that goes away mid-request is not an error of the proxy.
            let _ = server.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let runtime = if args.current_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    let result = runtime.and_then(|rt| rt.block_on(serve(args.listen, args.origin)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare_proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
