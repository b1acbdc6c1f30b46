use super::slot::{refresh_margin, Slot, FAILURE_HOLD, INVALIDATE_HOLD};
use super::*;
use crate::sim::{SimConfig, Simulator};
use std::sync::atomic::{AtomicUsize, Ordering};

fn token(s: &str) -> Token {
    Token::new(s).unwrap()
}

type Fetched = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<(Token, Option<Duration>), CredentialError>> + Send,
    >,
>;

/// A fetch that counts its calls and issues `t<n>` living `lifetime`, after `delay`.
fn fetcher(
    calls: &Arc<AtomicUsize>,
    lifetime: Duration,
    delay: Duration,
) -> impl FnOnce() -> Fetched {
    let calls = calls.clone();
    move || {
        Box::pin(async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(delay).await;
            Ok((token(&format!("t{n}")), Some(lifetime)))
        })
    }
}

#[test]
fn the_refresh_margin_defaults_to_a_tenth_at_least_a_minute_at_most_half() {
    let h = Duration::from_secs(3600);
    assert_eq!(refresh_margin(h, None), Duration::from_secs(360));
    assert_eq!(
        refresh_margin(Duration::from_secs(300), None),
        Duration::from_secs(60)
    );
    assert_eq!(
        refresh_margin(Duration::from_secs(100), None),
        Duration::from_secs(50)
    );
    assert_eq!(
        refresh_margin(h, Some(Duration::from_secs(30))),
        Duration::from_secs(30)
    );
    assert_eq!(refresh_margin(h, Some(h)), Duration::from_secs(1800));
    assert_eq!(refresh_margin(Duration::ZERO, None), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_callers_cause_one_fetch() {
    let slot = Arc::new(Slot::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (slot, calls) = (slot.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            slot.get(
                None,
                fetcher(
                    &calls,
                    Duration::from_secs(3600),
                    Duration::from_millis(200),
                ),
            )
            .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), token("t1"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn refreshes_before_expiry_and_serves_the_old_token_meanwhile() {
    let slot = Arc::new(Slot::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let life = Duration::from_secs(1000);
    let slow = Duration::from_secs(5);
    let get = |slot: Arc<Slot>, calls: Arc<AtomicUsize>| async move {
        slot.get(Some(Duration::from_secs(100)), fetcher(&calls, life, slow))
            .await
    };
    assert_eq!(get(slot.clone(), calls.clone()).await.unwrap(), token("t1"));
    // Until 100 s before expiry (1000 s after the fetch ended) the token is reused.
    tokio::time::advance(Duration::from_secs(899)).await;
    assert_eq!(get(slot.clone(), calls.clone()).await.unwrap(), token("t1"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    // One caller refreshes (taking 5 s); another meanwhile still gets the valid old one.
    let refreshing = tokio::spawn(get(slot.clone(), calls.clone()));
    tokio::task::yield_now().await;
    assert_eq!(get(slot.clone(), calls.clone()).await.unwrap(), token("t1"));
    assert_eq!(refreshing.await.unwrap().unwrap(), token("t2"));
    assert_eq!(get(slot.clone(), calls.clone()).await.unwrap(), token("t2"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_is_never_handed_out() {
    let slot = Slot::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let life = Duration::from_secs(10);
    slot.get(None, fetcher(&calls, life, Duration::ZERO))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;
    let failing = || async { Err(CredentialError::Status(503)) };
    assert_eq!(
        slot.get(None, failing).await,
        Err(CredentialError::Status(503))
    );
}

#[tokio::test(start_paused = true)]
async fn invalidate_drops_only_the_refused_token_once() {
    let slot = Slot::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let life = Duration::from_secs(3600);
    let t1 = slot
        .get(None, fetcher(&calls, life, Duration::ZERO))
        .await
        .unwrap();
    assert!(!slot.invalidate(&token("other")));
    assert!(slot.invalidate(&t1));
    assert!(
        !slot.invalidate(&t1),
        "a second 401 of the same token: no-op"
    );
    let t2 = slot
        .get(None, fetcher(&calls, life, Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(t2, token("t2"));
    assert!(!slot.invalidate(&t1), "a late 401 of the old token: no-op");
    assert_eq!(
        slot.get(None, fetcher(&calls, life, Duration::ZERO))
            .await
            .unwrap(),
        t2
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // An upstream that refuses every token gets a new one at most once a second.
    assert!(
        !slot.invalidate(&t2),
        "within INVALIDATE_HOLD of the last drop"
    );
    tokio::time::advance(INVALIDATE_HOLD).await;
    assert!(slot.invalidate(&t2));
}

#[tokio::test(start_paused = true)]
async fn a_failed_exchange_is_held_briefly_for_the_crowd() {
    let slot = Slot::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let failing = |calls: Arc<AtomicUsize>| {
        move || async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(Token, Option<Duration>), _>(CredentialError::Status(500))
        }
    };
    for _ in 0..5 {
        assert_eq!(
            slot.get(None, failing(calls.clone())).await,
            Err(CredentialError::Status(500))
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::advance(FAILURE_HOLD).await;
    let _ = slot.get(None, failing(calls.clone())).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn tokens_print_as_a_hash() {
    let t = token("very-secret-token");
    let shown = format!("{t:?}");
    assert!(!shown.contains("very-secret"), "{shown}");
    assert!(shown.starts_with("Token(sha256:"), "{shown}");
    assert!(t.authorization().is_sensitive());
    assert_eq!(t.authorization(), "Bearer very-secret-token");
    assert!(Token::new("").is_none());
    assert!(Token::new("a\nb").is_none());
}

async fn with_sim(extra: &str) -> (Simulator, Credentials, Arc<AtomicUsize>) {
    let sim = Simulator::start("127.0.0.1:0".parse().unwrap(), SimConfig::default())
        .await
        .unwrap();
    let config = config_of(&sim, extra);
    let upstreams = config
        .upstreams
        .iter()
        .map(|u| Arc::new(Upstream::new(u, 1).unwrap()))
        .collect();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let creds = Credentials::new(&config, upstreams).with_send_hook(Arc::new(move |_, c, _, _| {
        assert_eq!(c, "ivr-client");
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    (sim, creds, sent)
}

/// Login and API at the simulator, credential `ivr` for `ivr-client` plus `extra` keys.
fn config_of(sim: &Simulator, extra: &str) -> Config {
    let text = format!(
        r#"
[[upstream]]
name = "login"
url = "{url}"
[[upstream]]
name = "api"
url = "{url}"
[[route]]
prefix = "/"
upstream = "api"
[[credential]]
name = "ivr"
upstream = "login"
client_id = "ivr-client"
client_secret = "${{IVR_SECRET}}"
{extra}
"#,
        url = sim.url()
    );
    Config::parse_with_env(&text, &|name| {
        (name == "IVR_SECRET").then(|| "ivr-secret".to_string())
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_callers_one_exchange_against_the_simulator() {
    let (sim, creds, sent) = with_sim("").await;
    let creds = Arc::new(creds);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let creds = creds.clone();
            tokio::spawn(async move { creds.token("ivr").await })
        })
        .collect();
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.push(t.await.unwrap().unwrap());
    }
    assert!(tokens.iter().all(|t| *t == tokens[0]));
    let stats = sim.stats();
    assert_eq!(stats.clients["ivr-client"].requests, 1, "{stats:?}");
    assert_eq!(sent.load(Ordering::SeqCst), 1, "the exchange is counted");
    // The token works upstream; pacer's own call counts too.
    let me = creds
        .get_json("ivr", "api", "/api/v2/tokens/me")
        .await
        .unwrap();
    assert_eq!(me["OAuthClient"]["id"], "ivr-client");
    assert_eq!(sent.load(Ordering::SeqCst), 2);
    assert_eq!(
        creds.token("nope").await,
        Err(CredentialError::Unknown("nope".into()))
    );
    assert_eq!(
        creds.get_json("ivr", "nope", "/x").await,
        Err(CredentialError::UnknownUpstream("nope".into()))
    );
    assert!(!format!("{creds:?}").contains("ivr-secret"));

    // A reload with the same settings keeps the token; changed settings fetch anew.
    let same = Credentials::new(&config_of(&sim, ""), creds.upstreams.clone()).carry_over(&creds);
    assert_eq!(same.token("ivr").await.unwrap(), tokens[0]);
    let changed = Credentials::new(
        &config_of(&sim, "refresh_before = \"2m\""),
        creds.upstreams.clone(),
    )
    .carry_over(&creds);
    assert!(changed.token("ivr").await.is_ok());
    assert_eq!(
        sim.stats().clients["ivr-client"].requests,
        3,
        "one new exchange"
    );
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_fetched_again_once_and_the_call_retried() {
    let (sim, creds, _) = with_sim("").await;
    // A token the upstream does not know is cached, as if it had been revoked.
    let slot = creds.entries["ivr"].slot.clone();
    let revoked = token("revoked");
    slot.get(None, || async {
        Ok((revoked.clone(), Some(Duration::from_secs(3600))))
    })
    .await
    .unwrap();
    let me = creds
        .get_json("ivr", "api", "/api/v2/tokens/me")
        .await
        .unwrap();
    assert_eq!(me["OAuthClient"]["id"], "ivr-client");
    let stats = sim.stats();
    // One 401 (the revoked token, counted as unknown), one token exchange, one 200.
    assert_eq!(stats.clients["unknown"].unauthorized, 1, "{stats:?}");
    assert_eq!(stats.clients["ivr-client"].requests, 2, "{stats:?}");
    assert_ne!(creds.token("ivr").await.unwrap(), revoked);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_an_error_not_a_hang() {
    let (sim, _, _) = with_sim("").await;
    let text = format!(
        "[[upstream]]\nname = \"login\"\nurl = \"{}\"\n[[route]]\nprefix = \"/\"\nupstream = \"login\"\n\
         [[credential]]\nname = \"x\"\nupstream = \"login\"\nclient_id = \"ivr-client\"\nclient_secret = \"wrong\"\n",
        sim.url()
    );
    let config = Config::parse(&text).unwrap();
    let ups = vec![Arc::new(Upstream::new(&config.upstreams[0], 1).unwrap())];
    let creds = Credentials::new(&config, ups);
    assert_eq!(creds.token("x").await, Err(CredentialError::Status(401)));
    sim.shutdown().await;
}
