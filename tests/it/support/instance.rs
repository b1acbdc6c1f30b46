//! A pacer instance of the test's own: configuration text, listeners on `127.0.0.1:0`,
//! and tokens obtained through it.

use super::{full, Reply, TestClient};
use http::{Method, StatusCode};
use pacer::app::Running;
use pacer::config::Config;

/// Adds `listen`/`admin_listen` on `127.0.0.1:0` to a configuration's `[server]` section
/// (creating the section when there is none).
pub fn with_test_listeners(toml: &str) -> String {
    const LISTEN: &str = "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n";
    match toml.find("[server]\n") {
        Some(i) => {
            let at = i + "[server]\n".len();
            format!("{}{LISTEN}{}", &toml[..at], &toml[at..])
        }
        None => format!("[server]\n{LISTEN}\n{toml}"),
    }
}

/// Starts pacer from configuration text; listeners are filled in (see
/// [`with_test_listeners`]).
pub async fn start_pacer(toml: &str) -> Running {
    start_pacer_with_env(toml, &[]).await
}

/// [`start_pacer`] with `${NAME}` in the configuration taken from `env` instead of the
/// process environment (which the tests of one process share).
pub async fn start_pacer_with_env(toml: &str, env: &[(&str, &str)]) -> Running {
    let text = with_test_listeners(toml);
    let lookup = |name: &str| {
        env.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    };
    let config = Config::parse_with_env(&text, &lookup)
        .unwrap_or_else(|e| panic!("invalid test config:\n{e}\n---\n{text}"));
    pacer::app::start(config).await.expect("pacer starts")
}

/// Turns off `tokens/me` look-ups, so the upstream sees only the requests under test.
pub const NO_TOKEN_LOOKUPS: &str = "[identity]\ntokens_me = false\n";

/// A configuration with one upstream `up` at `url` behind the route `/api/`, without
/// token look-ups ([`NO_TOKEN_LOOKUPS`]). `server` goes into `[server]`, `upstream` into
/// the `[[upstream]]` table.
pub fn one_route_config(server: &str, url: &str, upstream: &str) -> String {
    format!(
        "[server]\n{server}\n\n[[upstream]]\nname = \"up\"\nurl = \"{url}\"\n{upstream}\n\n\
         [[route]]\nprefix = \"/api/\"\nupstream = \"up\"\n\n{NO_TOKEN_LOOKUPS}"
    )
}

/// The answer to a client-credentials exchange (Basic credentials, form body) sent through
/// `client`; it must be 200.
pub async fn token_reply_via(client: &TestClient, id: &str, secret: &str) -> Reply {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    let req = client
        .request(Method::POST, "/oauth/token")
        .header("authorization", format!("Basic {basic}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(full("grant_type=client_credentials"))
        .unwrap();
    let reply = client.send(req).await;
    assert_eq!(reply.status, StatusCode::OK, "token: {}", reply.text());
    reply
}

/// A client-credentials token obtained *through pacer* (Basic credentials, form body), so
/// that pacer learns the token's client.
pub async fn token_via(client: &TestClient, id: &str, secret: &str) -> String {
    token_reply_via(client, id, secret).await.json()["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}
