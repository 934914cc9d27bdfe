//! Sessions (protocol.md sections 1, 3 and 10 rules 1, 3, 5, 6): hello and its reply, token
//! checks (close 4001), the first frame rule, the hello timeout (4011), token expiry and
//! `refresh`, the `Authorization: Bearer` upgrade header, subprotocol negotiation (HTTP 400 for
//! an unknown offer only), MessagePack parity with JSON, a second hello, resume (exact replay,
//! then `sync`, then live, no gap or duplicate across the seam, also under concurrent sends),
//! resets (`unknown_offset`, `over_limit`) and heartbeats.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Error as WsError;

// ---------------------------------------------------------------------------------------------
// hello

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_reply_has_every_field_then_sync_then_snapshot() {
    let b = TestBroker::start().await;
    let (alice, dev) = (uid("alice"), uid("phone"));
    let c = b
        .connect_with(&alice, ConnectOpts::device(&dev).platform("android"))
        .await;
    let r = &c.hello_reply;
    assert_keys(r, HELLO_KEYS);
    assert_eq!(r["re"], json!(1));
    assert_eq!(r["ok"], json!(true));
    assert_eq!(r["user"], json!(alice));
    assert_eq!(r["device"], json!(dev));
    assert!(
        r["session"].as_str().is_some_and(|s| !s.is_empty()),
        "session: {r}"
    );
    let head = r["head"]
        .as_u64()
        .unwrap_or_else(|| panic!("head not a u64: {r}"));
    // rule 1: a first connect is neither a resume nor a reset, and has an empty replay.
    assert_eq!(r["resumed"], json!(false));
    assert_eq!(r["reset"], json!(false));
    assert!(
        c.replay.is_empty(),
        "replay on a first connect: {:?}",
        c.replay
    );
    // rule 1: sync.head equals the hello's head; neither sync nor the snapshot has an offset.
    assert_eq!(c.sync["head"], json!(head));
    assert!(c.sync.get("off").is_none(), "sync carries off: {}", c.sync);
    assert!(c.snapshot["users"].is_array(), "snapshot: {}", c.snapshot);
    assert!(
        c.snapshot.get("off").is_none(),
        "snapshot carries off: {}",
        c.snapshot
    );
    let all = c.all();
    assert_eq!(all[1]["ev"], json!("sync"), "second frame: {}", all[1]);
    assert_eq!(
        all[2]["ev"],
        json!("presence.snapshot"),
        "third frame: {}",
        all[2]
    );
    let health = b.health().await;
    assert!(
        health["head"].as_u64().unwrap() >= head,
        "health {health} behind hello head {head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_head_covers_every_acked_event() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let ack = a
        .ok("send", json!({"to": bob, "body": "x", "cid": "c1"}))
        .await;
    let bc = b.connect(&bob, "b1").await;
    assert!(bc.hello_reply["head"].as_u64().unwrap() >= off(&ack));
    assert_eq!(bc.sync["head"], bc.hello_reply["head"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn platform_defaults_to_web() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let _c = b.connect(&alice, "d1").await; // hello without `platform`
    let r = b.http().get(&format!("/v1/users/{alice}/presence")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let devices = r.json()["devices"].clone();
    assert_eq!(devices.as_array().map(Vec::len), Some(1), "{devices}");
    assert_eq!(
        (&devices[0]["device"], &devices[0]["platform"]),
        (&json!("d1"), &json!("web"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_hello_on_a_session_is_a_conflict_and_keeps_the_socket() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let c = b.connect(&alice, "d1").await;
    let r = c
        .request_frame(json!({"op": "hello", "id": 2, "token": b.token(&alice), "device": "d1"}))
        .await;
    assert_eq!(r["re"], json!(2));
    assert_error(&r, "conflict");
    c.ok("unread", json!({})).await;
    assert!(!c.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_connections_counts_only_sessions_past_hello() {
    let b = TestBroker::start().await;
    let _waiting = b.open().await; // upgraded, no hello yet
    let _a = b.connect(&uid("alice"), "a1").await;
    let _c = b.connect(&uid("carol"), "c1").await;
    assert_eq!(b.health().await["connections"], json!(2));
}

// ---------------------------------------------------------------------------------------------
// bad tokens

/// Hello with `token` must get `unauthorized` (re 1), then close 4001.
async fn assert_token_refused(b: &TestBroker, token: String) {
    let c = b.open().await;
    let r = c
        .request_frame(
            json!({"op": "hello", "id": 1, "token": token, "device": "d1", "platform": "web"}),
        )
        .await;
    assert_eq!(r["re"], json!(1), "{r}");
    assert_error(&r, "unauthorized");
    assert_eq!(c.wait_closed().await, Some(4001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_with_expired_token_is_unauthorized_then_closed_4001() {
    let b = TestBroker::start().await;
    // two minutes past: well beyond the 5 s leeway
    let token = mint(&b.secret, &claims(&uid("alice"), -120));
    assert_token_refused(&b, token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_with_wrongly_signed_token_is_unauthorized_then_closed_4001() {
    let b = TestBroker::start().await;
    let token = mint(
        "not-the-server-secret-xxxxxxxxxxxxxxxx",
        &claims(&uid("alice"), 600),
    );
    assert_token_refused(&b, token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_with_alg_none_token_is_unauthorized_then_closed_4001() {
    let b = TestBroker::start().await;
    let token = unsigned_token(&claims(&uid("alice"), 600));
    assert_token_refused(&b, token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_with_token_missing_exp_is_unauthorized_then_closed_4001() {
    let b = TestBroker::start().await;
    let token = mint(&b.secret, &json!({"sub": uid("alice")}));
    assert_token_refused(&b, token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_with_token_missing_sub_is_unauthorized_then_closed_4001() {
    let b = TestBroker::start().await;
    let token = mint(&b.secret, &json!({"exp": now_s() + 600}));
    assert_token_refused(&b, token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_with_garbage_token_is_unauthorized_then_closed_4001() {
    let b = TestBroker::start().await;
    assert_token_refused(&b, "not.a.jwt".to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_without_any_token_is_unauthorized_then_closed_4001() {
    let b = TestBroker::start().await;
    let c = b.open().await;
    let r = c
        .request_frame(json!({"op": "hello", "id": 1, "device": "d1"}))
        .await;
    assert_error(&r, "unauthorized");
    assert_eq!(c.wait_closed().await, Some(4001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_frame_other_than_hello_closes_4001() {
    let b = TestBroker::start().await;
    let c = b.open().await;
    c.send(&json!({"op": "send", "id": 1, "to": uid("bob"), "body": "hi", "cid": "c1"}))
        .await;
    // an error frame may precede the close; the close code is what counts
    assert_eq!(c.wait_closed().await, Some(4001));
    assert!(
        c.all().iter().all(|f| f["ok"] != json!(true)),
        "a frame before hello succeeded: {:?}",
        c.all()
    );
}

// ---------------------------------------------------------------------------------------------
// hello timeout, token expiry, refresh

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_hello_within_the_timeout_closes_4011() {
    let b = TestBroker::start_with(|c| c.limits.hello_timeout_ms = 500).await;
    let c = b.open().await;
    assert_eq!(c.wait_closed().await, Some(4011));
    assert!(c.all().iter().all(|f| f["ok"] != json!(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hello_in_time_is_not_closed_by_the_hello_timeout() {
    let b = TestBroker::start_with(|c| c.limits.hello_timeout_ms = 500).await;
    let c = b.connect(&uid("alice"), "d1").await;
    // a negative check: nothing to await, so wait well past the 500 ms
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !c.is_closed(),
        "closed with {:?} after a timely hello",
        c.close_code()
    );
    c.ok("unread", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_expiry_closes_the_socket_4001() {
    let b = TestBroker::start_with(|c| c.auth.leeway_s = 0).await;
    let alice = uid("alice");
    let token = b.token_ttl(&alice, 2);
    let c = b
        .connect_with(&alice, ConnectOpts::device("d1").token(token))
        .await;
    c.ok("unread", json!({})).await;
    assert_eq!(
        c.wait_closed_within(Duration::from_secs(10)).await,
        Some(4001)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_before_expiry_keeps_the_socket_open() {
    let b = TestBroker::start_with(|c| c.auth.leeway_s = 0).await;
    let alice = uid("alice");
    let c = b
        .connect_with(
            &alice,
            ConnectOpts::device("d1").token(b.token_ttl(&alice, 2)),
        )
        .await;
    let fresh = claims(&alice, 3600);
    let r = c
        .ok("refresh", json!({"token": mint(&b.secret, &fresh)}))
        .await;
    assert_eq!(r["exp"], fresh["exp"], "{r}");
    // past the first token's exp: still open
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        !c.is_closed(),
        "closed with {:?} despite refresh",
        c.close_code()
    );
    c.ok("unread", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_with_another_users_token_is_refused() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let c = b.connect(&alice, "d1").await;
    let r = c
        .request("refresh", json!({"token": b.token(&uid("mallory"))}))
        .await;
    assert_eq!(
        r["ok"],
        json!(false),
        "refresh to another sub succeeded: {r}"
    );
}

// ---------------------------------------------------------------------------------------------
// upgrade: Authorization header, subprotocols

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn authorization_bearer_header_on_upgrade_stands_in_for_the_token() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let opts = OpenOpts {
        protocols: vec![JSON_PROTO.to_string()],
        headers: vec![(
            "Authorization".to_string(),
            format!("Bearer {}", b.token(&alice)),
        )],
        ..Default::default()
    };
    let mut c = b.open_with(opts).await.expect("upgrade");
    let r = c.hello(None, "d1", None).await;
    assert_eq!(r["user"], json!(alice));
}

/// Offers `offer`, expects `chosen` echoed, then checks the frame type of the session.
async fn check_negotiation(offer: &[&str], chosen: Option<&str>) {
    let b = TestBroker::start().await;
    let opts = OpenOpts {
        protocols: offer.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut c = b.open_with(opts).await.expect("upgrade");
    assert_eq!(c.subprotocol.as_deref(), chosen);
    let token = b.token(&uid("alice"));
    c.hello(Some(&token), "d1", None).await;
    let want = if chosen == Some(MSGPACK_PROTO) {
        Kind::Binary
    } else {
        Kind::Text
    };
    let kinds = c.kinds();
    assert!(
        !kinds.is_empty() && kinds.iter().all(|k| *k == want),
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_subprotocol_is_echoed_and_uses_text_frames() {
    check_negotiation(&[JSON_PROTO], Some(JSON_PROTO)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn msgpack_subprotocol_is_echoed_and_uses_binary_frames() {
    check_negotiation(&[MSGPACK_PROTO], Some(MSGPACK_PROTO)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_offer_next_to_json_chooses_json() {
    check_negotiation(&["x-unknown.v9", JSON_PROTO], Some(JSON_PROTO)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_offer_defaults_to_json_without_echo() {
    check_negotiation(&[], None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_subprotocol_only_is_refused_with_http_400() {
    let b = TestBroker::start().await;
    let opts = OpenOpts {
        protocols: vec!["switchboard.v9.xml".to_string()],
        ..Default::default()
    };
    match b.open_with(opts).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status().as_u16(), 400),
        Err(e) => panic!("expected HTTP 400, got handshake error {e}"),
        Ok(c) => panic!("upgraded with subprotocol {:?}", c.subprotocol),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn msgpack_and_json_clients_see_identical_events() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b
        .connect_with(&alice, ConnectOpts::device("a1").msgpack())
        .await;
    let bj = b.connect(&bob, "b1").await;
    let bm = b
        .connect_with(&bob, ConnectOpts::device("b2").msgpack())
        .await;
    assert_eq!(a.subprotocol.as_deref(), Some(MSGPACK_PROTO));
    assert_keys(&a.hello_reply, HELLO_KEYS);
    assert_eq!(a.hello_reply["user"], json!(alice));
    let body = json!({
        "text": "h\u{e9}llo \u{2603}", "n": 42, "neg": -7, "big": 1u64 << 40, "f": 1.5,
        "yes": true, "nil": null, "list": [1, "two", {"three": [3]}]
    });
    let ack = a
        .ok("send", json!({"to": bob, "body": body, "cid": "m1"}))
        .await;
    assert_eq!(ack["conv"], json!(dm(&alice, &bob)));
    assert_eq!(ack["dup"], json!(false));
    let ej = bj.next_message("m1").await;
    let em = bm.next_message("m1").await;
    assert_keys(&em, MESSAGE_KEYS);
    assert_eq!(em, ej, "msgpack and json events differ");
    assert_eq!(em["body"], body);
    assert_eq!(em["off"], ack["off"]);
    assert_eq!(em["from"], json!(alice));
    // and back: a JSON sender, a MessagePack receiver
    let ack2 = bj
        .ok(
            "send",
            json!({"to": alice, "body": [1, 2.5, "x"], "cid": "m2"}),
        )
        .await;
    let e2 = a.next_message("m2").await;
    assert_eq!(e2["body"], json!([1, 2.5, "x"]));
    assert_eq!(e2["off"], ack2["off"]);
    assert_eq!(e2["seq"], json!(2));
    // errors are MessagePack too
    let r = a.request("no.such.op", json!({})).await;
    assert_error(&r, "bad_request");
    assert!(a.kinds().iter().all(|k| *k == Kind::Binary));
    assert!(bm.kinds().iter().all(|k| *k == Kind::Binary));
    assert!(bj.kinds().iter().all(|k| *k == Kind::Text));
}

// ---------------------------------------------------------------------------------------------
// replay and resume

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_connect_without_since_replays_nothing() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = b.connect(&bob, "b1").await;
    for i in 0..3 {
        bc.ok(
            "send",
            json!({"to": alice, "body": i, "cid": format!("c{i}")}),
        )
        .await;
    }
    let a = b.connect(&alice, "a1").await;
    assert!(a.replay.is_empty(), "{:?}", a.replay);
    assert_eq!(a.hello_reply["resumed"], json!(false));
    assert_eq!(a.hello_reply["reset"], json!(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_replays_exactly_the_missed_events_then_sync_then_live() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    let first = bc
        .ok("send", json!({"to": alice, "body": "before", "cid": "m0"}))
        .await;
    let since = off(&a.next_message("m0").await);
    a.close().await;

    let mut missed = Vec::new();
    for i in 1..=5 {
        missed.push(
            bc.ok(
                "send",
                json!({"to": alice, "body": {"i": i}, "cid": format!("m{i}")}),
            )
            .await,
        );
    }
    bc.ok("typing", json!({"conv": conv, "on": true})).await; // ephemeral: never replayed

    let a = b.connect_since(&alice, "a1", since).await;
    let r = &a.hello_reply;
    assert_eq!(r["resumed"], json!(true), "{r}");
    assert_eq!(r["reset"], json!(false), "{r}");
    let head = r["head"].as_u64().unwrap();
    assert!(head >= off(missed.last().unwrap()));
    let offs: Vec<u64> = a.replay.iter().map(off).collect();
    assert!(
        offs.windows(2).all(|w| w[0] < w[1]),
        "replay not in increasing offset order: {offs:?}"
    );
    assert!(
        offs.iter().all(|&o| since < o && o <= head),
        "replay outside ({since}, {head}]: {offs:?}"
    );
    assert!(a.replay.iter().all(|f| f["ev"] != "typing"));
    let msgs = messages(&a.replay, Some(&conv));
    let cids: Vec<&str> = msgs.iter().map(|m| m["cid"].as_str().unwrap()).collect();
    assert_eq!(cids, ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(
        msgs.iter().map(off).collect::<Vec<_>>(),
        missed.iter().map(off).collect::<Vec<_>>()
    );
    let seqs: Vec<u64> = msgs.iter().map(seq).collect();
    assert_eq!(
        seqs,
        (seq(&first) + 1..=seq(&first) + 5).collect::<Vec<_>>()
    );
    for (m, ack) in msgs.iter().zip(&missed) {
        assert_keys(m, MESSAGE_KEYS);
        assert_eq!(m["from"], json!(bob));
        assert_eq!(m["device"], json!("b1"));
        assert_eq!(m["ts"], ack["ts"]);
    }
    assert_eq!(a.sync["head"], json!(head));

    let live = bc
        .ok("send", json!({"to": alice, "body": "after", "cid": "m6"}))
        .await;
    let e = a.next_message("m6").await;
    assert_eq!(e["off"], live["off"]);
    assert!(off(&e) > head);
    for f in a.after(&a.sync) {
        if is_durable(&f) {
            assert!(
                off(&f) > head,
                "event at or before head {head} after sync: {f}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_replay_equals_what_an_always_connected_device_saw() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a1 = b.connect(&alice, "a1").await; // the witness, never disconnected
    let a2 = b.connect(&alice, "a2").await; // the one that resumes
    let a3 = b.connect(&alice, "a3").await;
    let bc = b.connect(&bob, "b1").await;
    bc.ok("send", json!({"to": alice, "body": "hello", "cid": "m0"}))
        .await;
    let since = off(&a2.next_message("m0").await);
    a2.close().await;

    for i in 0..3 {
        bc.ok(
            "send",
            json!({"to": alice, "body": {"n": i}, "cid": format!("b{i}")}),
        )
        .await;
        a3.ok(
            "send",
            json!({"to": bob, "body": {"n": i}, "cid": format!("a{i}")}),
        )
        .await;
    }
    a3.ok("receipt", json!({"conv": conv, "kind": "read", "seq": 4}))
        .await;
    let n = b
        .http()
        .post(
            &format!("/v1/users/{alice}/notices"),
            json!({"type": "hint", "data": {"x": 1}}),
        )
        .await;
    assert!(n.is_success(), "{}", n.text);
    bc.ok("typing", json!({"conv": conv, "on": true})).await;

    let a2 = b.connect_since(&alice, "a2", since).await;
    let head = a2.hello_reply["head"].as_u64().unwrap();
    let barrier = bc
        .ok(
            "send",
            json!({"to": alice, "body": "barrier", "cid": "barrier"}),
        )
        .await;
    a1.next_message("barrier").await; // a1 has seen everything up to head by now
    let witness: Vec<Value> = a1
        .all()
        .into_iter()
        .filter(|f| is_durable(f) && since < off(f) && off(f) <= head)
        .collect();
    assert_eq!(
        a2.replay.iter().map(off).collect::<Vec<_>>(),
        witness.iter().map(off).collect::<Vec<_>>()
    );
    assert_eq!(a2.replay, witness);
    let kinds: Vec<&str> = a2
        .replay
        .iter()
        .map(|f| f["ev"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "message").count(),
        6,
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"receipt") && kinds.contains(&"notice"),
        "{kinds:?}"
    );
    let live = a2.next_message("barrier").await;
    assert_eq!(live["off"], barrier["off"]);
    assert!(off(&live) > head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_seam_under_concurrent_sends_has_no_gap_and_no_duplicate() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a = b.connect(&alice, "a1").await;
    let bc = Arc::new(b.connect(&bob, "b1").await);
    bc.ok("send", json!({"to": alice, "body": 0, "cid": "m0"}))
        .await;
    let since = off(&a.next_message("m0").await);
    a.close().await;
    drop(a);

    let n = 150;
    let frames: Vec<Value> = (1..=n)
        .map(|i| json!({"op": "send", "to": alice, "body": i, "cid": format!("m{i}")}))
        .collect();
    let sender = {
        let bc = bc.clone();
        tokio::spawn(async move { bc.pipeline(frames, 8).await })
    };
    // reconnect while the sends are flowing
    bc.wait_frames(Duration::from_secs(10), "30 acks", |all| {
        all.iter().filter(|f| f["ok"] == json!(true)).count() >= 30
    })
    .await;
    let a = b.connect_since(&alice, "a1", since).await;
    let acks = sender.await.expect("sender task");
    assert_eq!(
        acks.iter().map(seq).collect::<Vec<_>>(),
        (2..=n + 1).collect::<Vec<u64>>()
    );
    let last = format!("m{n}");
    if !a.replay.iter().any(|m| m["cid"] == json!(last)) {
        a.next_message(&last).await;
    }
    let mut got = messages(&a.replay, Some(&conv));
    got.extend(messages(&a.after(&a.sync), Some(&conv)));
    assert_eq!(
        got.iter().map(seq).collect::<Vec<_>>(),
        (2..=n + 1).collect::<Vec<u64>>()
    );
    assert_eq!(
        got.iter().map(off).collect::<Vec<_>>(),
        acks.iter().map(off).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_at_head_replays_nothing() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    a.ok("send", json!({"to": bob, "body": "x", "cid": "c1"}))
        .await;
    let head = b.health().await["head"].as_u64().unwrap();
    a.close().await;
    let a = b.connect_since(&alice, "a1", head).await;
    assert_eq!(a.hello_reply["resumed"], json!(true));
    assert_eq!(a.hello_reply["reset"], json!(false));
    assert!(messages(&a.replay, None).is_empty(), "{:?}", a.replay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn since_beyond_head_is_a_reset_with_reason_unknown_offset() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    a.ok("send", json!({"to": bob, "body": "x", "cid": "c1"}))
        .await;
    let head = b.health().await["head"].as_u64().unwrap();
    let a2 = b.connect_since(&alice, "a2", head + 1000).await;
    let r = &a2.hello_reply;
    assert_eq!(r["resumed"], json!(false), "{r}");
    assert_eq!(r["reset"], json!(true), "{r}");
    assert_eq!(r["reason"], json!("unknown_offset"), "{r}");
    assert!(a2.replay.is_empty(), "{:?}", a2.replay);
    assert_eq!(a2.sync["head"], r["head"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_over_max_replay_events_is_a_reset_with_reason_over_limit() {
    let b = TestBroker::start_with(|c| c.limits.max_replay_events = 5).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let since = a.hello_reply["head"].as_u64().unwrap();
    a.close().await;
    let bc = b.connect(&bob, "b1").await;
    bc.pipeline(send_frames(&alice, "m", 10), 10).await;
    let a = b.connect_since(&alice, "a1", since).await;
    let r = &a.hello_reply;
    assert_eq!(r["resumed"], json!(false), "{r}");
    assert_eq!(r["reset"], json!(true), "{r}");
    assert_eq!(r["reason"], json!("over_limit"), "{r}");
    assert!(
        a.replay.is_empty(),
        "{} replayed despite the reset",
        a.replay.len()
    );
}

// ---------------------------------------------------------------------------------------------
// heartbeat

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_that_answers_pings_is_kept_alive() {
    let b = TestBroker::start_with(|c| {
        c.heartbeat.interval_ms = 200;
        c.heartbeat.timeout_ms = 600;
    })
    .await;
    let c = b.connect(&uid("alice"), "d1").await;
    // the reader keeps reading, so tungstenite answers every ping; a negative check
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        !c.is_closed(),
        "closed with {:?} although pings were answered",
        c.close_code()
    );
    assert!(
        c.pings() >= 2,
        "only {} pings in 2 s at a 200 ms interval",
        c.pings()
    );
    c.ok("unread", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_that_goes_silent_is_closed_by_the_heartbeat() {
    let b = TestBroker::start_with(|c| {
        c.heartbeat.interval_ms = 200;
        c.heartbeat.timeout_ms = 600;
    })
    .await;
    let c = b.connect(&uid("alice"), "d1").await;
    c.pause_reading(); // no more pongs
    tokio::time::sleep(Duration::from_millis(2000)).await;
    c.resume_reading();
    c.wait_closed().await; // any close code, or none: the session is gone
    assert!(c.is_closed());
}
