//! Offline push end to end: a real broker whose push worker talks to the local FCM and APNs
//! stand-ins of `common::push_mock` (documented answers, scripted per test). Owed pushes,
//! cancellation by a reconnect, retries, Retry-After, token pruning, the circuit breaker,
//! dead letters, a restart with owed pushes, and the VoIP push of an incoming call.

mod common;

use std::time::{Duration, Instant};

use common::push_mock::*;
use common::*;
use serde_json::{json, Value};
use tempfile::TempDir;

const FCM_TOKEN: &str = "fcm-token-bob-0123456789";
const APNS_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const VOIP_TOKEN: &str = "f0e1d2c3b4a5968778695a4b3c2d1e0ff0e1d2c3b4a5968778695a4b3c2d1e0f";

/// A broker pushing to both mocks, with short delays so tests stay quick.
struct Setup {
    b: TestBroker,
    fcm: FcmMock,
    apns: ApnsMock,
    _creds: TempDir,
}

async fn setup(delay_ms: u64) -> Setup {
    setup_with(delay_ms, |_| {}).await
}

async fn setup_with(delay_ms: u64, more: impl FnOnce(&mut switchboard::Config)) -> Setup {
    let fcm = FcmMock::start().await;
    let apns = ApnsMock::start().await;
    let creds = tempfile::tempdir().unwrap();
    let fcm_cfg = fcm.config(vec![fcm.app(creds.path(), "main")]);
    let apns_cfg = apns.config(creds.path(), vec![apns.app(creds.path(), "main")]);
    let b = TestBroker::start_with(|c| {
        c.push.delay_ms = delay_ms;
        c.push.retry_base_ms = 100;
        c.push.retry_cap_ms = 400;
        c.push.breaker_probe_ms = 300;
        c.push.fcm = fcm_cfg;
        c.push.apns = apns_cfg;
        more(c);
    })
    .await;
    Setup {
        b,
        fcm,
        apns,
        _creds: creds,
    }
}

/// Connects `user` on `device`, registers a token, and disconnects: an offline phone.
async fn offline_phone(b: &TestBroker, user: &str, device: &str, provider: &str, token: &str) {
    let c = b.connect(user, device).await;
    c.ok(
        "push.register",
        json!({"provider": provider, "token": token}),
    )
    .await;
    c.close().await;
}

/// Waits (bounded) until `count()` reaches `n`; returns when it did.
async fn until_count(what: &str, n: usize, count: impl Fn() -> usize) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let got = count();
        if got >= n {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "{what}: {got} of {n} within 8 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fcm_message(r: &Recorded) -> Value {
    r.json.as_ref().expect("FCM body is JSON")["message"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_recipient_gets_exactly_one_push_with_the_event_in_it() {
    let s = setup(200).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    offline_phone(&s.b, &bob, "phone", "fcm", FCM_TOKEN).await;
    let a = s.b.connect(&alice, "a1").await;
    let ack = a
        .ok(
            "send",
            json!({"to": bob, "body": {"text": "see you at 5"}, "cid": "c1"}),
        )
        .await;
    until_count("fcm sends", 1, || s.fcm.sends().len()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let sends = s.fcm.sends();
    assert_eq!(sends.len(), 1, "exactly one push: {sends:?}");
    let m = fcm_message(&sends[0]);
    assert_eq!(m["token"], json!(FCM_TOKEN));
    assert_eq!(m["notification"]["title"], json!(alice));
    assert_eq!(m["notification"]["body"], json!("see you at 5"));
    assert_eq!(m["data"]["conv"], json!(dm(&alice, &bob)));
    assert_eq!(m["data"]["off"], json!(off(&ack).to_string()));
    assert_eq!(m["data"]["seq"], json!("1"));
    assert!(
        s.fcm.assertion_errors().is_empty(),
        "{:?}",
        s.fcm.assertion_errors()
    );
    // the sender's own offline devices are never pushed their own message
    let stats = s.b.http().get("/v1/stats").await.json();
    assert_eq!(stats["push_queue"], json!(0), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_online_recipient_gets_no_push() {
    let s = setup(100).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = s.b.connect(&bob, "phone").await;
    bc.ok(
        "push.register",
        json!({"provider": "fcm", "token": FCM_TOKEN}),
    )
    .await;
    let a = s.b.connect(&alice, "a1").await;
    a.ok("send", json!({"to": bob, "body": "hi", "cid": "c1"}))
        .await;
    bc.next_message("c1").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(s.fcm.sends().is_empty(), "{:?}", s.fcm.sends());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconnect_within_the_delay_cancels_the_push() {
    let s = setup(1500).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    offline_phone(&s.b, &bob, "phone", "fcm", FCM_TOKEN).await;
    let a = s.b.connect(&alice, "a1").await;
    let ack = a
        .ok("send", json!({"to": bob, "body": "hi", "cid": "c1"}))
        .await;
    let since = off(&ack) - 1;
    let bc = s.b.connect_since(&bob, "phone", since).await;
    assert_eq!(
        messages(&bc.replay, None).len(),
        1,
        "the device got it itself"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert!(s.fcm.sends().is_empty(), "{:?}", s.fcm.sends());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_503_is_retried_and_then_delivered_once() {
    let s = setup(0).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    offline_phone(&s.b, &bob, "phone", "fcm", FCM_TOKEN).await;
    s.fcm.push_send(fcm_unavailable());
    s.fcm.push_send(google_html_error(503));
    let a = s.b.connect(&alice, "a1").await;
    a.ok("send", json!({"to": bob, "body": "hi", "cid": "c1"}))
        .await;
    until_count("fcm sends", 3, || s.fcm.sends().len()).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sends = s.fcm.sends();
    assert_eq!(sends.len(), 3, "two failures then one success: {sends:?}");
    let collapse: Vec<Value> = sends
        .iter()
        .map(|r| fcm_message(r)["android"]["collapse_key"].clone())
        .collect();
    assert!(
        collapse.iter().all(|c| *c == collapse[0]),
        "one collapse id for every attempt"
    );
    let stats = s.b.http().get("/v1/stats").await.json();
    assert_eq!(
        (stats["push_queue"].clone(), stats["push_dead"].clone()),
        (json!(0), json!(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fcm_429_pauses_for_retry_after_before_trying_again() {
    let s = setup(0).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    offline_phone(&s.b, &bob, "phone", "fcm", FCM_TOKEN).await;
    s.fcm.push_send(fcm_quota_exceeded(Some("1")));
    let a = s.b.connect(&alice, "a1").await;
    a.ok("send", json!({"to": bob, "body": "hi", "cid": "c1"}))
        .await;
    let first = until_count("first attempt", 1, || s.fcm.sends().len()).await;
    let second = until_count("second attempt", 2, || s.fcm.sends().len()).await;
    // Retry-After: 1 s (the retry backoff alone would be at most 400 ms here)
    assert!(
        second - first >= Duration::from_millis(800),
        "retried after {:?}, before Retry-After",
        second - first
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apns_410_prunes_the_token_and_nothing_more_goes_to_it() {
    let s = setup(0).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    offline_phone(&s.b, &bob, "phone", "apns", APNS_TOKEN).await;
    s.apns.push(apns_unregistered(now_ms()));
    let a = s.b.connect(&alice, "a1").await;
    a.ok("send", json!({"to": bob, "body": "one", "cid": "c1"}))
        .await;
    until_count("apns requests", 1, || s.apns.requests().len()).await;
    // the prune is a logged event
    let deadline = Instant::now() + Duration::from_secs(5);
    let removed = loop {
        let r =
            s.b.http()
                .get("/v1/events?after=0&limit=1000&types=push.token_removed")
                .await;
        let evs: Vec<Value> = r
            .text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if let Some(e) = evs.into_iter().next() {
            break e;
        }
        assert!(Instant::now() < deadline, "no push.token_removed event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(removed["user"], json!(bob));
    assert_eq!(removed["provider"], json!("apns"));
    a.ok("send", json!({"to": bob, "body": "two", "cid": "c2"}))
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        s.apns.requests().len(),
        1,
        "a pruned token got another push"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_credentials_pause_the_app_and_jobs_resume_once_they_work() {
    let s = setup(0).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    offline_phone(&s.b, &bob, "phone", "fcm", FCM_TOKEN).await;
    s.fcm.push_token(oauth_invalid_grant());
    s.fcm.push_token(oauth_invalid_grant());
    let a = s.b.connect(&alice, "a1").await;
    for i in 0..3 {
        a.ok(
            "send",
            json!({"to": bob, "body": i, "cid": format!("c{i}")}),
        )
        .await;
    }
    // the credentials are fixed after two refusals: every job goes out, once
    until_count("fcm sends", 3, || s.fcm.sends().len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.fcm.sends().len(), 3);
    let tokens = s.fcm.token_requests().len();
    assert!(
        (3..=6).contains(&tokens),
        "probes, not one token request per job: {tokens}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_payload_becomes_a_dead_letter() {
    let s = setup(0).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    offline_phone(&s.b, &bob, "phone", "fcm", FCM_TOKEN).await;
    s.fcm.push_send(fcm_invalid_payload());
    let a = s.b.connect(&alice, "a1").await;
    let ack = a
        .ok("send", json!({"to": bob, "body": "hi", "cid": "c1"}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let dead = loop {
        let d = s.b.http().get("/v1/push/dead").await.json();
        if d["items"].as_array().is_some_and(|a| !a.is_empty()) {
            break d;
        }
        assert!(Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let item = &dead["items"][0];
    assert_eq!(item["off"], ack["off"]);
    assert_eq!(item["user"], json!(bob));
    assert_ne!(
        item["token"],
        json!(FCM_TOKEN),
        "tokens are never shown whole"
    );
    assert_eq!(s.fcm.sends().len(), 1, "a refused payload is not retried");
    assert_eq!(
        s.b.http().get("/v1/stats").await.json()["push_dead"],
        json!(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn owed_pushes_survive_a_restart_and_go_out_once_each() {
    let s = setup(1000).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    offline_phone(&s.b, &bob, "phone", "fcm", FCM_TOKEN).await;
    let a = s.b.connect(&alice, "a1").await;
    for i in 0..3 {
        a.ok(
            "send",
            json!({"to": bob, "body": i, "cid": format!("c{i}")}),
        )
        .await;
    }
    drop(a);
    let Setup { b, fcm, _creds, .. } = s;
    // stopped before any push was due
    let b = b.restart().await;
    until_count("fcm sends", 3, || fcm.sends().len()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let offs: Vec<Value> = fcm
        .sends()
        .iter()
        .map(|r| fcm_message(r)["data"]["off"].clone())
        .collect();
    assert_eq!(offs.len(), 3, "each owed push exactly once: {offs:?}");
    let mut distinct = offs.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{offs:?}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_to_an_offline_ios_user_is_a_voip_push_expiring_with_the_ring() {
    let s = setup(5000).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = s.b.connect(&bob, "iphone").await;
    bc.ok(
        "push.register",
        json!({"provider": "apns", "token": APNS_TOKEN}),
    )
    .await;
    bc.ok(
        "push.register",
        json!({"provider": "apns_voip", "token": VOIP_TOKEN}),
    )
    .await;
    bc.close().await;
    let a = s.b.connect(&alice, "a1").await;
    let r = a
        .ok(
            "call.invite",
            json!({"to": [bob], "media": "audio", "ring_ms": 20000}),
        )
        .await;
    let call = r["call"].as_str().unwrap().to_string();
    let invite = a
        .next_event("call.invite", |e| e["call"] == json!(call))
        .await;
    // a ring does not wait for push.delay_ms (5 s here)
    until_count("apns requests", 1, || s.apns.requests().len()).await;
    let req = &s.apns.requests()[0];
    assert_eq!(req.path, format!("/3/device/{VOIP_TOKEN}"));
    assert_eq!(req.header("apns-push-type"), Some("voip"));
    assert_eq!(
        req.header("apns-topic"),
        Some(format!("{APNS_TOPIC}.voip").as_str())
    );
    assert_eq!(req.header("apns-priority"), Some("10"));
    let expiration: u64 = req.header("apns-expiration").unwrap().parse().unwrap();
    let ring_end_s = (invite["ts"].as_u64().unwrap() + 20_000) / 1000;
    assert!(
        expiration.abs_diff(ring_end_s) <= 1,
        "expiration {expiration} is not the end of the ring {ring_end_s}"
    );
    let body = req.json.as_ref().unwrap();
    assert_eq!(body["call"], json!(call), "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.apns.requests().len(),
        1,
        "one push per device (VoIP, not also the alert)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unregister_stops_pushes_and_an_unknown_app_is_refused() {
    let s = setup(0).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = s.b.connect(&bob, "phone").await;
    bc.err(
        "push.register",
        json!({"provider": "fcm", "token": FCM_TOKEN, "app": "nope"}),
        "bad_request",
    )
    .await;
    bc.ok(
        "push.register",
        json!({"provider": "fcm", "token": FCM_TOKEN}),
    )
    .await;
    let r = bc.ok("push.unregister", json!({"provider": "fcm"})).await;
    assert_eq!(r["removed"], json!(true));
    bc.close().await;
    let a = s.b.connect(&alice, "a1").await;
    a.ok("send", json!({"to": bob, "body": "hi", "cid": "c1"}))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(s.fcm.sends().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_a_closed_slow_session_never_wrote_are_owed_as_pushes() {
    let s = setup_with(0, |c| c.limits.outbound_queue = 16).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let opts = OpenOpts {
        protocols: vec![JSON_PROTO.to_string()],
        recv_buffer: Some(4096),
        ..Default::default()
    };
    let mut slow = s.b.open_with(opts).await.expect("upgrade");
    slow.hello(Some(&s.b.token(&bob)), "phone", None).await;
    slow.ok(
        "push.register",
        json!({"provider": "fcm", "token": FCM_TOKEN}),
    )
    .await;
    slow.pause_reading();
    let a = s.b.connect(&alice, "a1").await;
    let frames: Vec<Value> = (0..300)
        .map(|i| json!({"op": "send", "to": bob, "body": {"text": "p".repeat(15_000), "i": i}, "cid": format!("f{i}")}))
        .collect();
    a.pipeline(frames, 4).await;
    slow.resume_reading();
    assert_eq!(
        slow.wait_closed_within(Duration::from_secs(15)).await,
        Some(4008)
    );
    let got = messages(&slow.all(), None).len();
    assert!(got < 300, "the consumer was not slow");
    // every message the closed session never wrote is owed to the phone: one push each
    until_count("pushes for unwritten messages", 300 - got, || {
        s.fcm.sends().len()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sends = s.fcm.sends();
    let mut offs: Vec<String> = sends
        .iter()
        .map(|r| {
            fcm_message(r)["data"]["off"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    let n = offs.len();
    offs.sort();
    offs.dedup();
    assert_eq!(offs.len(), n, "a message was pushed twice");
    assert!(
        n >= 300 - got,
        "{n} pushes for {} unwritten messages",
        300 - got
    );
}
