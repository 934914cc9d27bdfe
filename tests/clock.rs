//! Clock skew (issue 9 item 9): the real binary under libfaketime (Debian `faketime`).
//!
//! The broker's wall clock is read from a file that the test rewrites while it runs
//! (`FAKETIME_TIMESTAMP_FILE`, re-read on every call), so the clock steps as NTP or a resumed
//! VM would step it; the monotonic clock stays real unless a test says otherwise.
//!
//! - a step of +1 h and then of -2 h: offsets keep increasing, event `ts` never goes back,
//!   no session is closed and nobody turns offline (liveness is measured on the monotonic
//!   clock), and a session that stops answering pings is still closed on time after the
//!   clock went back;
//! - tokens are judged by the broker's clock with `auth.leeway_s`: `exp` and `nbf` within
//!   the leeway of the broker's (skewed) time pass, beyond it they do not;
//! - a clock running at x1.5 (wall and monotonic): order holds, heartbeats keep every
//!   answering session alive, the presence grace still ends.
//!
//! Without libfaketime the tests say SKIPPED (under `CI=true` they fail). Every wait is
//! bounded.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";
const LEEWAY_S: i64 = 30;

fn faketime_installed(test: &str) -> bool {
    let ok = Path::new(LIB).exists();
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "{test}: faketime is not installed, and CI must run this test"
        );
        eprintln!("SKIPPED {test}: libfaketime (Debian package faketime) is not installed");
    }
    ok
}

/// A broker whose clock is the spec in the returned file (`+0`, `+1h`, `-1h`, `+0 x1.5`).
fn broker_under_faketime(spec: &str, fake_monotonic: bool) -> (ServerProcess, PathBuf) {
    let mut s = ServerProcess::new();
    let file = s.dir.path().join("faketime");
    std::fs::write(&file, spec).expect("write the faketime file");
    s.extra_env.extend([
        ("LD_PRELOAD".to_string(), LIB.to_string()),
        (
            "FAKETIME_TIMESTAMP_FILE".to_string(),
            file.display().to_string(),
        ),
        ("FAKETIME_NO_CACHE".to_string(), "1".to_string()),
        (
            "FAKETIME_DONT_FAKE_MONOTONIC".to_string(),
            if fake_monotonic { "0" } else { "1" }.to_string(),
        ),
        // Liveness in test time: pings every 300 ms, silent after 900 ms, a sweep each second.
        (
            "SWITCHBOARD_HEARTBEAT__INTERVAL_MS".to_string(),
            "300".to_string(),
        ),
        (
            "SWITCHBOARD_HEARTBEAT__TIMEOUT_MS".to_string(),
            "900".to_string(),
        ),
        (
            "SWITCHBOARD_PRESENCE__SWEEP_CRON".to_string(),
            "* * * * * *".to_string(),
        ),
        (
            "SWITCHBOARD_AUTH__LEEWAY_S".to_string(),
            LEEWAY_S.to_string(),
        ),
    ]);
    (s, file)
}

/// Steps the broker's clock to `spec` (an offset from real time); it reads the file on
/// every clock call, so the next reading has it.
async fn step(file: &Path, spec: &str) {
    std::fs::write(file, spec).expect("rewrite the faketime file");
}

async fn connections(s: &ServerProcess) -> u64 {
    s.ep().health().await["connections"]
        .as_u64()
        .expect("connections in /health")
}

fn presence_of(c: &Client, user: &str) -> Vec<Value> {
    c.all()
        .into_iter()
        .filter(|f| f["ev"] == "presence" && f["user"] == user)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_steps_keep_order_and_liveness() {
    if !faketime_installed("wall_clock_steps_keep_order_and_liveness") {
        return;
    }
    let (mut s, file) = broker_under_faketime("+0", false);
    s.start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let ep = s.ep();
    // Tokens valid for a day: the +1 h step must not expire them (that would be right).
    let day = |u: &str, contacts: &[&str]| {
        let mut c = claims(u, 86_400);
        c["contacts"] = json!(contacts);
        mint(&s.secret, &c)
    };
    let b = ep
        .connect_with(
            &bob,
            ConnectOpts::device("b1").token(day(&bob, &[&alice, &carol])),
        )
        .await;
    let a = ep
        .connect_with(
            &alice,
            ConnectOpts::device("a1").token(day(&alice, &[&bob])),
        )
        .await;
    b.next_event("presence", |e| {
        e["user"] == alice && e["status"] == "online"
    })
    .await;
    let mut acks = vec![
        a.ok("send", json!({"to": bob, "body": 1, "cid": "m1"}))
            .await,
    ];

    // +1 h: with liveness on the wall clock every session would look silent for an hour.
    step(&file, "+1h").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        connections(&s).await,
        2,
        "a clock step closed sessions:\n{}",
        s.log()
    );
    let m2 = a
        .ok("send", json!({"to": bob, "body": 2, "cid": "m2"}))
        .await;
    let jumped = m2["ts"].as_u64().unwrap_or(0) - acks[0]["ts"].as_u64().unwrap_or(0);
    assert!(
        (3_500_000..3_700_000).contains(&jumped),
        "the broker's clock did not step +1 h: {jumped} ms"
    );
    acks.push(m2);

    // -2 h (to an hour behind real time): ts must not go back.
    step(&file, "-1h").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        connections(&s).await,
        2,
        "a clock step closed sessions:\n{}",
        s.log()
    );
    for (i, cid) in ["m3", "m4"].iter().enumerate() {
        acks.push(
            a.ok("send", json!({"to": bob, "body": 3 + i, "cid": cid}))
                .await,
        );
    }
    for w in acks.windows(2) {
        assert!(off(&w[1]) > off(&w[0]), "offsets ordered: {w:?}");
        assert!(
            w[1]["ts"].as_u64() >= w[0]["ts"].as_u64(),
            "ts went back: {w:?}"
        );
    }
    for cid in ["m1", "m2", "m3", "m4"] {
        b.next_message(cid).await;
    }
    let offline: Vec<Value> = presence_of(&b, &alice)
        .into_iter()
        .filter(|e| e["status"] == "offline")
        .collect();
    assert!(offline.is_empty(), "alice turned offline: {offline:?}");

    // With the clock an hour back a silent session is still closed on time: carol stops
    // reading (so never answers a ping) and is gone within a few heartbeat timeouts.
    let c = ep
        .connect_with(
            &carol,
            ConnectOpts::device("c1").token(day(&carol, &[&bob])),
        )
        .await;
    b.next_event("presence", |e| {
        e["user"] == carol && e["status"] == "online"
    })
    .await;
    assert_eq!(connections(&s).await, 3);
    c.pause_reading();
    let deadline = Instant::now() + Duration::from_secs(10);
    while connections(&s).await != 2 {
        assert!(
            Instant::now() < deadline,
            "a silent session was not closed with the clock stepped back:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.next_event("presence", |e| {
        e["user"] == carol && e["status"] == "offline"
    })
    .await;

    // A restart under the stepped-back clock keeps ts from going back too.
    s.send_sigterm();
    assert!(s.wait_exit(Duration::from_secs(20)).await.success());
    s.start().await;
    let ep = s.ep();
    let a = ep
        .connect_with(
            &alice,
            ConnectOpts::device("a1").token(ep.token_ttl(&alice, 86_400)),
        )
        .await;
    let m5 = a
        .ok("send", json!({"to": bob, "body": 5, "cid": "m5"}))
        .await;
    let last = acks.last().expect("acks");
    assert!(off(&m5) > off(last));
    assert!(
        m5["ts"].as_u64() >= last["ts"].as_u64(),
        "{m5} after {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_judged_by_the_broker_clock_with_the_leeway() {
    if !faketime_installed("tokens_are_judged_by_the_broker_clock_with_the_leeway") {
        return;
    }
    let (mut s, file) = broker_under_faketime("+1h", false);
    s.start().await;
    let ep = s.ep();
    let user = uid("dana");
    let hello = |claims: Value| {
        let token = mint(&s.secret, &claims);
        let ep = ep.clone();
        async move {
            let c = ep.open().await;
            let r = c
                .request_frame(json!({"op": "hello", "id": 1, "token": token, "device": "d1"}))
                .await;
            (r["ok"] == json!(true), r)
        }
    };
    let real = now_s();
    let broker_now = real + 3600;
    // exp: just inside and just outside the leeway of the broker's clock.
    let inside = json!({"sub": user, "exp": broker_now - LEEWAY_S + 10});
    let outside = json!({"sub": user, "exp": broker_now - LEEWAY_S - 10});
    // Valid for ten more minutes by the real clock, expired fifty by the broker's.
    let real_valid = json!({"sub": user, "exp": real + 600});
    assert!(hello(inside).await.0, "exp inside the leeway is accepted");
    let (ok, r) = hello(outside).await;
    assert!(!ok && r["error"]["code"] == json!("unauthorized"), "{r}");
    let (ok, r) = hello(real_valid).await;
    assert!(!ok && r["error"]["code"] == json!("unauthorized"), "{r}");

    // An hour behind: nbf within the leeway of the broker's clock passes, beyond it not.
    step(&file, "-1h").await;
    let broker_now = now_s() - 3600;
    let far = now_s() + 3600;
    let inside = json!({"sub": user, "exp": far, "nbf": broker_now + LEEWAY_S - 10});
    let outside = json!({"sub": user, "exp": far, "nbf": broker_now + LEEWAY_S + 10});
    assert!(hello(inside).await.0, "nbf inside the leeway is accepted");
    let (ok, r) = hello(outside).await;
    assert!(!ok && r["error"]["code"] == json!("unauthorized"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_at_one_and_a_half_speed_keeps_order_and_liveness() {
    if !faketime_installed("a_clock_at_one_and_a_half_speed_keeps_order_and_liveness") {
        return;
    }
    // Wall and monotonic both run fast: timers (pings, grace) fire early.
    let (mut s, _file) = broker_under_faketime("+0 x1.5", true);
    s.start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let ep = s.ep();
    let b = ep
        .connect_with(&bob, ConnectOpts::device("b1").contacts(&[&alice]))
        .await;
    let a = ep
        .connect_with(&alice, ConnectOpts::device("a1").contacts(&[&bob]))
        .await;
    b.next_event("presence", |e| {
        e["user"] == alice && e["status"] == "online"
    })
    .await;
    let mut acks = Vec::new();
    for i in 0..10 {
        acks.push(
            a.ok(
                "send",
                json!({"to": bob, "body": i, "cid": format!("f{i}")}),
            )
            .await,
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (first, last) = (&acks[0], &acks[acks.len() - 1]);
    let wall = last["ts"].as_u64().unwrap_or(0) - first["ts"].as_u64().unwrap_or(0);
    assert!(
        wall >= 3_500,
        "the broker's clock did not run fast: {wall} ms over ~2.7 s"
    );
    for w in acks.windows(2) {
        assert!(off(&w[1]) > off(&w[0]));
        assert!(w[1]["ts"].as_u64() > w[0]["ts"].as_u64(), "{w:?}");
    }
    assert_eq!(
        connections(&s).await,
        2,
        "answering sessions were closed:\n{}",
        s.log()
    );
    assert!(
        presence_of(&b, &alice)
            .iter()
            .all(|e| e["status"] != "offline"),
        "alice turned offline while connected"
    );
    // The grace still ends: alice leaves, bob sees her offline.
    a.close().await;
    b.next_event("presence", |e| {
        e["user"] == alice && e["status"] == "offline"
    })
    .await;
}
