//! The backend HTTP API (protocol.md section 8, section 10 rules 14 and 22-25): every
//! endpoint's success and error paths. `/health` and `/metrics` without a key; notices
//! (`live`, durable, replayed); presence; contacts; disconnect (4003); rooms (create,
//! members, publish); conversation history paging; `/v1/events` (NDJSON, MessagePack,
//! `after`/`limit`/`types`, long-poll); connections; stats; 404 and 401 everywhere.

mod common;

use std::io::Cursor;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The NDJSON lines of a `/v1/events` answer.
fn ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l}: {e}")))
        .collect()
}

fn offs(events: &[Value]) -> Vec<u64> {
    events.iter().map(off).collect()
}

/// `POST /v1/users/{user}/notices`, asserting 200; returns the answer.
async fn notice(b: &Endpoint, user: &str, kind: &str, data: Value) -> Value {
    let r = b
        .http()
        .post(
            &format!("/v1/users/{user}/notices"),
            json!({"type": kind, "data": data}),
        )
        .await;
    assert_eq!(r.status, 200, "notice: {}", r.text);
    r.json()
}

/// The broker's head as `/health` reports it.
async fn head(b: &Endpoint) -> u64 {
    b.health().await["head"].as_u64().expect("head")
}

/// A long string that is over `limits.max_body_bytes` (16 KiB) once JSON-encoded.
fn oversized() -> Value {
    json!("x".repeat(16 * 1024 + 1))
}

// ---------------------------------------------------------------------------------------------
// health and metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_reports_status_uptime_connections_head_and_version_without_a_key() {
    let b = TestBroker::start().await;
    let h = b.health().await;
    assert_keys(
        &h,
        &["status", "uptime_s", "connections", "head", "version"],
    );
    assert_eq!(h["status"], json!("ok"));
    assert!(h["uptime_s"].is_u64(), "{h}");
    assert_eq!(h["connections"], json!(0), "{h}");
    assert!(h["head"].is_u64(), "{h}");
    assert!(h["version"].as_str().is_some_and(|v| !v.is_empty()), "{h}");
    let alice = uid("alice");
    let _a1 = b.connect(&alice, "a1").await;
    let _a2 = b.connect(&alice, "a2").await;
    let _no_hello = b.open().await;
    let n = notice(&b, &alice, "t", json!(1)).await;
    let h = b.health().await;
    assert_eq!(h["connections"], json!(2), "only sessions past hello: {h}");
    assert!(
        head(&b).await >= off(&n),
        "head {h} behind an acked notice {n}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_is_prometheus_text_with_the_events_appended_counter() {
    let b = TestBroker::start().await;
    notice(&b, &uid("alice"), "t", json!(1)).await;
    let r = b.http_anonymous().get("/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.content_type.starts_with("text/plain"),
        "content type {}",
        r.content_type
    );
    assert!(
        r.text.contains("switchboard_events_appended_total"),
        "no events counter in: {}",
        r.text
    );
}

// ---------------------------------------------------------------------------------------------
// notices

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notice_reaches_every_live_device_and_counts_them() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b
        .connect_with(&alice, ConnectOpts::device("a2").msgpack())
        .await;
    let n = notice(&b, &alice, "billing", json!({"due": 3})).await;
    assert!(n["off"].is_u64(), "{n}");
    assert_eq!(n["live"], json!(2), "{n}");
    for dev in [&a1, &a2] {
        let e = dev.next_where("notice", "off", n["off"].clone()).await;
        assert_keys(&e, &["ev", "off", "ts", "type", "data"]);
        assert!(e["ts"].is_u64(), "{e}");
        assert_eq!(e["type"], json!("billing"));
        assert_eq!(e["data"], json!({"due": 3}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notice_to_a_user_with_no_device_is_live_0_durable_and_replayed_on_resume() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let a = b.connect(&alice, "a1").await;
    let since = a.hello_reply["head"].as_u64().expect("head");
    a.close().await;
    let n = notice(&b, &alice, "welcome", json!(null)).await;
    assert_eq!(n["live"], json!(0), "{n}");
    let a = b.connect_since(&alice, "a1", since).await;
    let notices: Vec<&Value> = a.replay.iter().filter(|e| e["ev"] == "notice").collect();
    assert_eq!(notices.len(), 1, "{:?}", a.replay);
    assert_eq!(notices[0]["off"], n["off"]);
    assert_eq!(notices[0]["type"], json!("welcome"));
    assert_eq!(notices[0]["data"], json!(null));
    // a user never connected: also durable, replayed from 0
    let bob = uid("bob");
    let n = notice(&b, &bob, "first", json!([1, 2])).await;
    assert_eq!(n["live"], json!(0), "{n}");
    let bc = b.connect_since(&bob, "b1", 0).await;
    let replayed: Vec<&Value> = bc.replay.iter().filter(|e| e["ev"] == "notice").collect();
    assert_eq!(replayed.len(), 1, "{:?}", bc.replay);
    assert_eq!(replayed[0]["data"], json!([1, 2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notice_errors_bad_json_missing_type_bad_user_and_no_key() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let path = format!("/v1/users/{alice}/notices");
    b.http()
        .post_raw(&path, b"{not json")
        .await
        .assert_error(400, "bad_request");
    b.http()
        .post(&path, json!({"data": 1}))
        .await
        .assert_error(400, "bad_request");
    b.http()
        .post(&path, json!({"type": 7, "data": 1}))
        .await
        .assert_error(400, "bad_request");
    b.http()
        .post("/v1/users/a:b/notices", json!({"type": "t"}))
        .await
        .assert_error(400, "bad_request");
    b.http()
        .post(&path, json!({"type": "t", "data": oversized()}))
        .await
        .assert_error(413, "too_large");
    b.http_anonymous()
        .post(&path, json!({"type": "t"}))
        .await
        .assert_error(401, "unauthorized");
    b.http()
        .with_key("wrong")
        .post(&path, json!({"type": "t"}))
        .await
        .assert_error(401, "unauthorized");
    // none of them was appended
    let a = b.connect_since(&alice, "a1", 0).await;
    assert_eq!(
        a.replay.iter().filter(|e| e["ev"] == "notice").count(),
        0,
        "{:?}",
        a.replay
    );
}

// ---------------------------------------------------------------------------------------------
// presence and contacts

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_query_shows_status_devices_and_last_seen_and_offline_for_a_stranger() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let a1 = b
        .connect_with(&alice, ConnectOpts::device("a1").platform("ios"))
        .await;
    a1.ok("presence", json!({"status": "busy"})).await;
    let r = b.http().get(&format!("/v1/users/{alice}/presence")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let p = r.json();
    assert_eq!(p["user"], json!(alice));
    assert_eq!(p["status"], json!("busy"));
    assert_eq!(p["devices"], json!([{"device": "a1", "platform": "ios"}]));
    assert!(p["last_seen"].is_u64(), "{p}");

    let ghost = uid("ghost");
    let r = b.http().get(&format!("/v1/users/{ghost}/presence")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let p = r.json();
    assert_eq!(
        (&p["status"], &p["devices"], &p["last_seen"]),
        (&json!("offline"), &json!([]), &json!(null)),
        "{p}"
    );
    b.http()
        .get("/v1/users/a:b/presence")
        .await
        .assert_error(400, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contacts_put_replaces_the_list_and_rejects_bad_bodies_and_ids() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let path = format!("/v1/users/{alice}/contacts");
    let r = b.http().put_json(&path, json!({"contacts": [bob]})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let bc = b.connect(&bob, "b1").await;
    let ac = b.connect(&alice, "a1").await;
    bc.next_event("presence", |e| {
        e["user"] == alice && e["status"] == "online"
    })
    .await;

    for bad in [
        json!({"contacts": "bob"}),
        json!({"contacts": [1]}),
        json!({}),
        json!([bob]),
        json!({"contacts": ["x:y"]}),
        json!({"contacts": [""]}),
    ] {
        b.http()
            .put_json(&path, bad.clone())
            .await
            .assert_error(400, "bad_request");
    }
    b.http()
        .send(reqwest::Method::PUT, &path, Some(b"{nope".to_vec()))
        .await
        .assert_error(400, "bad_request");
    b.http()
        .put_json("/v1/users/a:b/contacts", json!({"contacts": [bob]}))
        .await
        .assert_error(400, "bad_request");
    b.http_anonymous()
        .put_json(&path, json!({"contacts": []}))
        .await
        .assert_error(401, "unauthorized");

    // still contacts: the refused calls changed nothing
    ac.ok("presence", json!({"status": "away"})).await;
    bc.next_event("presence", |e| e["user"] == alice && e["status"] == "away")
        .await;

    // replaced by an empty list: bob no longer sees alice
    let r = b.http().put_json(&path, json!({"contacts": []})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    ac.ok("presence", json!({"status": "busy"})).await;
    let cid = uid("s");
    let n = notice(&b, &bob, "sentinel", json!(cid)).await;
    let s = bc.next_where("notice", "off", n["off"].clone()).await;
    let busy: Vec<Value> = bc
        .before(&s)
        .into_iter()
        .filter(|f| f["ev"] == "presence" && f["user"] == alice && f["status"] == "busy")
        .collect();
    assert_eq!(
        busy,
        Vec::<Value>::new(),
        "seen after the contacts were removed"
    );
    let b2 = b.connect(&bob, "b2").await;
    let listed = b2.snapshot["users"]
        .as_array()
        .expect("users")
        .iter()
        .any(|u| u["user"] == alice);
    assert!(!listed, "{}", b2.snapshot);
}

// ---------------------------------------------------------------------------------------------
// disconnect

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_with_a_reason_closes_that_users_sockets_4003_and_leaves_others() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b
        .connect_with(&alice, ConnectOpts::device("a2").msgpack())
        .await;
    let bc = b.connect(&bob, "b1").await;
    let r = b
        .http()
        .post(
            &format!("/v1/users/{alice}/disconnect"),
            json!({"reason": "banned for a test"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(a1.wait_closed().await, Some(4003));
    assert_eq!(a2.wait_closed().await, Some(4003));
    bc.ok("unread", json!({})).await;
    assert!(!bc.is_closed());
    // the kicked user may come back
    let a3 = b.connect(&alice, "a1").await;
    a3.ok("unread", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disconnect_without_a_body_also_closes_4003_and_bad_input_is_refused() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    let path = format!("/v1/users/{alice}/disconnect");
    b.http()
        .post_raw(&path, b"{bad")
        .await
        .assert_error(400, "bad_request");
    b.http_anonymous()
        .post_empty(&path)
        .await
        .assert_error(401, "unauthorized");
    assert!(!a1.is_closed(), "refused calls closed the socket");
    let r = b.http().post_empty(&path).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(a1.wait_closed().await, Some(4003));
    bc.ok("unread", json!({})).await;
    // a user with no socket: nothing to close, still fine
    let r = b
        .http()
        .post_empty(&format!("/v1/users/{}/disconnect", uid("ghost")))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

// ---------------------------------------------------------------------------------------------
// rooms

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_create_is_201_then_409_for_the_same_id_and_400_for_a_bad_id() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let ac = b.connect(&alice, "a1").await;
    let room = uid("room");
    let r = b
        .http()
        .post(
            "/v1/rooms",
            json!({"id": room, "name": "Ops", "members": [alice, bob]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    // Alice gets her own `joined`, not Bob's: the next room.member she sees after hers is
    // Carol's, added later (creation is O(members), not O(members^2)).
    let e = ac.next_event("room.member", |_| true).await;
    assert_eq!(e["user"], json!(alice), "{e}");
    assert_eq!(e["change"], json!("joined"), "{e}");
    assert_eq!(e["room"], json!(room), "{e}");
    assert_eq!(e["conv"], json!(format!("room:{room}")), "{e}");
    assert!(e["off"].is_u64(), "{e}");
    let carol = uid("carol");
    let r = b
        .http()
        .put(&format!("/v1/rooms/{room}/members/{carol}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let e = ac.next_event("room.member", |_| true).await;
    assert_eq!(e["user"], json!(carol), "{e}");
    // The roster is one GET away.
    let r = b.http().get(&format!("/v1/rooms/{room}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let info = r.json();
    let mut want = vec![alice.clone(), bob.clone(), carol.clone()];
    want.sort();
    assert_eq!(info["members"], json!(want), "{info}");
    assert_eq!(info["name"], json!("Ops"), "{info}");
    assert_eq!(info["conv"], json!(format!("room:{room}")), "{info}");
    b.http()
        .get("/v1/rooms/no-such-room")
        .await
        .assert_error(404, "not_found");
    b.http()
        .post(
            "/v1/rooms",
            json!({"id": room, "name": "again", "members": []}),
        )
        .await
        .assert_error(409, "conflict");
    for bad in [
        json!({"id": "", "name": "x", "members": []}),
        json!({"id": "r".repeat(129), "name": "x", "members": []}),
        json!({"name": "no id", "members": []}),
        json!({"id": 5, "name": "x"}),
        json!({"id": uid("room"), "name": "x", "members": ["a:b"]}),
    ] {
        b.http()
            .post("/v1/rooms", bad)
            .await
            .assert_error(400, "bad_request");
    }
    b.http()
        .post_raw("/v1/rooms", b"not json")
        .await
        .assert_error(400, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_member_add_and_remove_answer_200_emit_events_and_are_idempotent() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let room = b.http().create_room("R", &[&alice, &bob]).await;
    let ac = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    let cc = b.connect(&carol, "c1").await;
    let member = format!("/v1/rooms/{room}/members/{carol}");

    let r = b.http().put(&member).await;
    assert_eq!(r.status, 200, "{}", r.text);
    for dev in [&ac, &bc, &cc] {
        let e = dev.next_where("room.member", "user", carol.as_str()).await;
        assert_eq!(e["change"], json!("joined"), "{e}");
        assert_eq!(e["room"], json!(room), "{e}");
        assert_eq!(e["conv"], json!(format!("room:{room}")), "{e}");
    }
    let again = b.http().put(&member).await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json()["changed"], json!(false), "{}", again.text);
    cc.ok(
        "send",
        json!({"conv": format!("room:{room}"), "body": "in", "cid": "c1"}),
    )
    .await;

    let r = b
        .http()
        .delete(&format!("/v1/rooms/{room}/members/{bob}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for dev in [&ac, &cc] {
        let e = dev.next_where("room.member", "user", bob.as_str()).await;
        assert_eq!(e["change"], json!("left"), "{e}");
    }
    let again = b
        .http()
        .delete(&format!("/v1/rooms/{room}/members/{bob}"))
        .await;
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(again.json()["changed"], json!(false), "{}", again.text);
    bc.err(
        "send",
        json!({"conv": format!("room:{room}"), "body": "out", "cid": "b1"}),
        "forbidden",
    )
    .await;
    // exactly one joined for carol and one left for bob reached alice
    let n = notice(&b, &alice, "sentinel", json!(0)).await;
    let s = ac.next_where("notice", "off", n["off"].clone()).await;
    let changes: Vec<(Value, Value)> = ac
        .before(&s)
        .into_iter()
        .filter(|f| f["ev"] == "room.member" && (f["user"] == carol || f["user"] == bob))
        .map(|f| (f["user"].clone(), f["change"].clone()))
        .collect();
    assert_eq!(
        changes,
        [(json!(carol), json!("joined")), (json!(bob), json!("left"))]
    );

    let ghost_room = uid("nope");
    for r in [
        b.http()
            .put(&format!("/v1/rooms/{ghost_room}/members/{carol}"))
            .await,
        b.http()
            .delete(&format!("/v1/rooms/{ghost_room}/members/{carol}"))
            .await,
    ] {
        r.assert_error(404, "not_found");
    }
    b.http()
        .put(&format!("/v1/rooms/{room}/members/a:b"))
        .await
        .assert_error(400, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_publish_answers_the_send_reply_dedupes_and_refuses_bad_calls() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let room = b.http().create_room("R", &[&alice, &bob]).await;
    let conv = format!("room:{room}");
    let bc = b.connect(&bob, "b1").await;
    let path = format!("/v1/rooms/{room}/messages");

    let r = b
        .http()
        .post(&path, json!({"from": alice, "body": {"x": 1}, "cid": "h1"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let ack = r.json();
    assert_keys(&ack, &["off", "conv", "seq", "ts", "dup"]);
    assert_eq!(ack["conv"], json!(conv));
    assert_eq!(ack["seq"], json!(1));
    assert_eq!(ack["dup"], json!(false));
    assert!(ack["ts"].is_u64(), "{ack}");
    let e = bc.next_message("h1").await;
    assert_keys(&e, MESSAGE_KEYS);
    assert_eq!(e["off"], ack["off"]);
    assert_eq!(e["from"], json!(alice));
    assert_eq!(e["device"], json!(null));
    assert_eq!(e["body"], json!({"x": 1}));

    let r = b
        .http()
        .post(&path, json!({"from": alice, "body": "other", "cid": "h1"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let dup = r.json();
    assert_eq!(dup["dup"], json!(true), "{dup}");
    for k in ["off", "conv", "seq", "ts"] {
        assert_eq!(dup[k], ack[k], "dup {k}: {dup} vs {ack}");
    }
    let r = b
        .http()
        .post(&path, json!({"from": bob, "body": "no cid"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["seq"], json!(2), "{}", r.text);

    b.http()
        .post(&path, json!({"from": carol, "body": "x"}))
        .await
        .assert_error(403, "forbidden");
    b.http()
        .post(
            &format!("/v1/rooms/{}/messages", uid("nope")),
            json!({"from": alice, "body": "x"}),
        )
        .await
        .assert_error(404, "not_found");
    b.http()
        .post(&path, json!({"from": alice, "body": oversized()}))
        .await
        .assert_error(413, "too_large");
    b.http()
        .post(&path, json!({"body": "no from"}))
        .await
        .assert_error(400, "bad_request");
    b.http()
        .post(&path, json!({"from": alice, "body": 1, "cid": ""}))
        .await
        .assert_error(400, "bad_request");
    // nothing of the refused calls was appended
    let h = b
        .http()
        .get(&format!("/v1/conversations/{conv}/messages"))
        .await;
    let seqs: Vec<u64> = h.json()["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(seq)
        .collect();
    assert_eq!(seqs, [1, 2]);
}

// ---------------------------------------------------------------------------------------------
// conversation history

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conversation_messages_page_with_exclusive_before_limit_and_more() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    for i in 0..5 {
        a.ok(
            "send",
            json!({"to": bob, "body": i, "cid": format!("c{i}")}),
        )
        .await;
    }
    let conv = dm(&alice, &bob);
    let page = |q: &str| {
        let (http, path) = (b.http(), format!("/v1/conversations/{conv}/messages{q}"));
        async move {
            let r = http.get(&path).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text);
            let v = r.json();
            let seqs: Vec<u64> = v["messages"]
                .as_array()
                .unwrap_or_else(|| panic!("{v}"))
                .iter()
                .map(seq)
                .collect();
            (seqs, v["more"].clone(), v)
        }
    };
    let (seqs, more, v) = page("?before=5&limit=2").await;
    assert_eq!((seqs, more), (vec![3, 4], json!(true)));
    let ws = a
        .ok("history", json!({"conv": conv, "before": 5, "limit": 2}))
        .await;
    assert_eq!(v["messages"], ws["messages"], "HTTP and history differ");
    for m in v["messages"].as_array().unwrap() {
        assert_keys(m, MESSAGE_KEYS);
    }
    let (seqs, more, _) = page("").await;
    assert_eq!((seqs, more), (vec![1, 2, 3, 4, 5], json!(false)));
    let (seqs, more, _) = page("?before=3").await;
    assert_eq!((seqs, more), (vec![1, 2], json!(false)));
    let (seqs, more, _) = page("?limit=1").await;
    assert_eq!((seqs, more), (vec![5], json!(true)));
    let (seqs, more, _) = page("?before=1").await;
    assert_eq!((seqs, more), (vec![], json!(false)));

    for q in ["?limit=0", "?limit=201", "?limit=abc", "?before=-1"] {
        b.http()
            .get(&format!("/v1/conversations/{conv}/messages{q}"))
            .await
            .assert_error(400, "bad_request");
    }
    for bad in [
        "nope",
        "dm:onlyone",
        &format!("dm:{}:{}", "zz", "aa"),
        "room:",
    ] {
        b.http()
            .get(&format!("/v1/conversations/{bad}/messages"))
            .await
            .assert_error(400, "bad_request");
    }
    b.http()
        .get(&format!("/v1/conversations/room:{}/messages", uid("nope")))
        .await
        .assert_error(404, "not_found");
    let room = b.http().create_room("R", &[&alice]).await;
    let (seqs, more, _) = page("").await;
    assert_eq!(seqs.len(), 5, "{more}");
    let r = b
        .http()
        .get(&format!("/v1/conversations/room:{room}/messages"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json(), json!({"messages": [], "more": false}));
}

// ---------------------------------------------------------------------------------------------
// /v1/events

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_ndjson_honours_after_limit_and_types_and_carries_the_audience() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let h0 = head(&b).await;
    let mut notice_offs = Vec::new();
    for i in 0..5 {
        notice_offs.push(off(&notice(&b, &alice, "n", json!(i)).await));
    }
    let room = b.http().create_room("R", &[&alice, &bob]).await;
    let r = b
        .http()
        .post(
            &format!("/v1/rooms/{room}/messages"),
            json!({"from": bob, "body": "m", "cid": "e1"}),
        )
        .await;
    let msg_off = off(&r.json());

    let r = b
        .http()
        .get(&format!("/v1/events?after={h0}&limit=2&types=notice"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.content_type.starts_with("application/x-ndjson"),
        "{}",
        r.content_type
    );
    let evs = ndjson(&r.text);
    assert_eq!(offs(&evs), notice_offs[..2]);
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["ev"], json!("notice"));
        assert_eq!(e["type"], json!("n"));
        assert_eq!(e["data"], json!(i));
        assert!(e["ts"].is_u64(), "{e}");
        assert_eq!(e["to"], json!([alice]), "{e}");
    }
    let r = b
        .http()
        .get(&format!(
            "/v1/events?after={}&limit=100&types=notice",
            notice_offs[1]
        ))
        .await;
    assert_eq!(offs(&ndjson(&r.text)), notice_offs[2..]);

    let r = b
        .http()
        .get(&format!(
            "/v1/events?after={h0}&limit=100&types=message,receipt"
        ))
        .await;
    let evs = ndjson(&r.text);
    assert_eq!(offs(&evs), [msg_off]);
    assert_eq!(evs[0]["ev"], json!("message"));
    assert_eq!(evs[0]["conv"], json!(format!("room:{room}")));
    let mut to: Vec<String> = serde_json::from_value(evs[0]["to"].clone()).expect("to");
    to.sort();
    let mut members = vec![alice.clone(), bob.clone()];
    members.sort();
    assert_eq!(to, members);

    // unfiltered: everything after `after`, strictly increasing, each with a `to` list
    let r = b
        .http()
        .get(&format!("/v1/events?after={h0}&limit=1000"))
        .await;
    let evs = ndjson(&r.text);
    let all = offs(&evs);
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    assert!(all.iter().all(|&o| o > h0), "{all:?}");
    for o in notice_offs.iter().chain([&msg_off]) {
        assert!(all.contains(o), "{o} missing from {all:?}");
    }
    for e in &evs {
        assert!(e["to"].is_array(), "no `to` list: {e}");
    }
    // `after` defaults to 0: the log from its first event
    let r = b.http().get("/v1/events?limit=1").await;
    let first = ndjson(&r.text);
    assert_eq!(first.len(), 1, "{}", r.text);
    assert!(off(&first[0]) <= all[0], "{first:?}");
    // nothing after the last notice but the message, which is filtered out
    let r = b
        .http()
        .get(&format!("/v1/events?after={msg_off}&types=notice"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(ndjson(&r.text), Vec::<Value>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_with_accept_msgpack_are_a_stream_of_maps() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let h0 = head(&b).await;
    let mut notice_offs = Vec::new();
    for i in 0..3 {
        notice_offs.push(off(&notice(&b, &alice, "n", json!({"i": i})).await));
    }
    let r = b
        .http()
        .get_bytes(
            &format!("/v1/events?after={h0}&limit=10&types=notice"),
            "application/msgpack",
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.content_type.starts_with("application/msgpack"),
        "{}",
        r.content_type
    );
    let mut cur = Cursor::new(&r.body[..]);
    let mut items = Vec::new();
    while (cur.position() as usize) < r.body.len() {
        let v: Value = rmp_serde::from_read(&mut cur).expect("one MessagePack map per event");
        assert!(v.is_object(), "not a map: {v}");
        items.push(v);
    }
    assert_eq!(offs(&items), notice_offs);
    for (i, e) in items.iter().enumerate() {
        assert_eq!(e["ev"], json!("notice"));
        assert_eq!(e["data"], json!({"i": i}));
        assert_eq!(e["to"], json!([alice]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_refuse_a_bad_limit_wait_ms_or_after() {
    let b = TestBroker::start().await;
    for q in [
        "limit=0",
        "limit=1001",
        "limit=x",
        "wait_ms=70000",
        "wait_ms=60001",
        "wait_ms=-5",
        "after=abc",
    ] {
        b.http()
            .get(&format!("/v1/events?{q}"))
            .await
            .assert_error(400, "bad_request");
    }
    let r = b.http().get("/v1/events?limit=1000&wait_ms=0").await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_long_poll_with_nothing_new_waits_then_answers_empty() {
    let b = TestBroker::start().await;
    let h0 = head(&b).await;
    let t0 = Instant::now();
    let r = b
        .http()
        .get(&format!("/v1/events?after={h0}&wait_ms=600"))
        .await;
    let elapsed = t0.elapsed();
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(ndjson(&r.text), Vec::<Value>::new());
    assert!(
        elapsed >= Duration::from_millis(360),
        "answered after {elapsed:?}: no long-poll"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_long_poll_returns_as_soon_as_a_notice_is_appended() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let h0 = head(&b).await;
    let http = b.http();
    let t0 = Instant::now();
    let poll = tokio::spawn(async move {
        http.get(&format!("/v1/events?after={h0}&wait_ms=10000"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !poll.is_finished(),
        "the long-poll returned with nothing new"
    );
    let n = notice(&b, &alice, "wake", json!(1)).await;
    let r = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long-poll was not woken by the notice")
        .expect("poll task");
    let elapsed = t0.elapsed();
    assert_eq!(r.status, 200, "{}", r.text);
    let evs = ndjson(&r.text);
    assert_eq!(offs(&evs), [off(&n)], "{}", r.text);
    assert_eq!(evs[0]["type"], json!("wake"));
    assert!(
        elapsed < Duration::from_secs(5),
        "returned after {elapsed:?}, not when the notice came"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_long_poll_filtered_by_types_is_not_woken_by_other_events() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let room = b.http().create_room("R", &[&alice, &bob]).await;
    let h0 = head(&b).await;
    let http = b.http();
    let poll = tokio::spawn(async move {
        http.get(&format!(
            "/v1/events?after={h0}&types=message&wait_ms=10000"
        ))
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    notice(&b, &alice, "not-a-message", json!(1)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !poll.is_finished(),
        "a types=message long-poll returned on a notice"
    );
    let r = b
        .http()
        .post(
            &format!("/v1/rooms/{room}/messages"),
            json!({"from": bob, "body": "now", "cid": "m1"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let msg_off = off(&r.json());
    let r = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .expect("the long-poll was not woken by the message")
        .expect("poll task");
    assert_eq!(r.status, 200, "{}", r.text);
    let evs = ndjson(&r.text);
    assert_eq!(offs(&evs), [msg_off], "{}", r.text);
    assert_eq!(evs[0]["ev"], json!("message"));
}

// ---------------------------------------------------------------------------------------------
// connections and stats

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_count_sessions_users_and_platforms() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let _a1 = b
        .connect_with(&alice, ConnectOpts::device("a1").platform("web"))
        .await;
    let _a2 = b
        .connect_with(&alice, ConnectOpts::device("a2").platform("android"))
        .await;
    let bc = b
        .connect_with(&bob, ConnectOpts::device("b1").platform("ios"))
        .await;
    let _no_hello = b.open().await;
    let r = b.http().get("/v1/connections").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let c = r.json();
    assert_eq!(c["total"], json!(3), "{c}");
    assert_eq!(c["users"], json!(2), "{c}");
    let by: serde_json::Map<String, Value> = c["by_platform"]
        .as_object()
        .unwrap_or_else(|| panic!("{c}"))
        .iter()
        .filter(|(_, v)| v.as_u64() != Some(0))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        Value::Object(by),
        json!({"web": 1, "android": 1, "ios": 1}),
        "{c}"
    );

    bc.close().await;
    let deadline = Instant::now() + TIMEOUT;
    let c = loop {
        let c = b.http().get("/v1/connections").await.json();
        if c["total"] == 2 || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(c["total"], json!(2), "{c}");
    assert_eq!(c["users"], json!(1), "{c}");
    assert_eq!(c["by_platform"]["ios"], json!(0), "{c}");
    assert_eq!(b.health().await["connections"], json!(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_report_head_event_count_log_bytes_and_queue_sizes() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let _a = b.connect(&alice, "a1").await;
    let n = notice(&b, &alice, "t", json!(1)).await;
    let r = b.http().get("/v1/stats").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.content_type.starts_with("application/json"),
        "{}",
        r.content_type
    );
    let s = r.json();
    assert_keys(&s, &["head", "events", "log_bytes"]);
    let head = s["head"].as_u64().unwrap_or_else(|| panic!("{s}"));
    assert!(head >= off(&n), "{s}");
    assert!(s["events"].as_u64().is_some_and(|e| e >= 1), "{s}");
    assert!(s["log_bytes"].is_u64(), "{s}");
    let queues: Vec<&String> = s
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.contains("queue"))
        .collect();
    assert!(!queues.is_empty(), "no queue size in {s}");
    for k in queues {
        assert!(s[k.as_str()].is_u64(), "{k} is not a size: {s}");
    }
}

// ---------------------------------------------------------------------------------------------
// routing and auth

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_routes_are_404_with_a_json_error() {
    let b = TestBroker::start().await;
    b.http_anonymous()
        .get("/nope")
        .await
        .assert_error(404, "not_found");
    for path in ["/v1/nope", "/v1/users/alice", "/v1/rooms/x/members", "/v1/"] {
        let r = b.http().get(path).await;
        r.assert_error(404, "not_found");
        assert!(
            r.content_type.starts_with("application/json"),
            "{path}: {}",
            r.content_type
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_v1_route_is_401_without_the_key_or_with_a_wrong_one() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let room = uid("room");
    let a1 = b.connect(&alice, "a1").await;
    let calls: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (
            reqwest::Method::POST,
            format!("/v1/users/{alice}/notices"),
            Some(json!({"type": "t", "data": 1})),
        ),
        (
            reqwest::Method::GET,
            format!("/v1/users/{alice}/presence"),
            None,
        ),
        (
            reqwest::Method::PUT,
            format!("/v1/users/{alice}/contacts"),
            Some(json!({"contacts": [bob]})),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/users/{alice}/disconnect"),
            None,
        ),
        (
            reqwest::Method::POST,
            "/v1/rooms".to_string(),
            Some(json!({"id": room, "name": "x", "members": [alice]})),
        ),
        (
            reqwest::Method::PUT,
            format!("/v1/rooms/{room}/members/{bob}"),
            None,
        ),
        (
            reqwest::Method::DELETE,
            format!("/v1/rooms/{room}/members/{bob}"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("/v1/rooms/{room}/messages"),
            Some(json!({"from": alice, "body": "x"})),
        ),
        (
            reqwest::Method::GET,
            format!("/v1/conversations/{}/messages", dm(&alice, &bob)),
            None,
        ),
        (reqwest::Method::GET, "/v1/events?after=0".to_string(), None),
        (reqwest::Method::GET, "/v1/connections".to_string(), None),
        (reqwest::Method::GET, "/v1/stats".to_string(), None),
        (reqwest::Method::GET, "/v1/nope".to_string(), None),
    ];
    let wrong = format!("wrong-{}", b.api_key);
    for http in [
        b.http_anonymous(),
        b.http().with_key(&wrong),
        b.http().with_key(""),
        b.http().with_key(&b.api_key[..b.api_key.len() - 1]),
    ] {
        for (method, path, body) in &calls {
            http.send(
                method.clone(),
                path,
                body.as_ref().map(|v| v.to_string().into_bytes()),
            )
            .await
            .assert_error(401, "unauthorized");
        }
    }
    // a key in another scheme is no key either
    let r = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/v1/stats", b.base_url()))
        .header("Authorization", format!("Basic {}", b.api_key))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 401);
    // none of the refused calls took effect
    assert!(!a1.is_closed(), "a refused disconnect closed the socket");
    let r = b
        .http()
        .post(
            "/v1/rooms",
            json!({"id": room, "name": "x", "members": [alice]}),
        )
        .await;
    assert_eq!(r.status, 201, "a refused create made the room: {}", r.text);
    let a = b.connect_since(&alice, "a2", 0).await;
    assert!(
        !a.replay.iter().any(|e| e["ev"] == "notice"),
        "a refused notice was appended: {:?}",
        a.replay
    );
}

#[tokio::test]
async fn a_json_body_that_is_not_an_object_is_400_and_changes_nothing() {
    let b = TestBroker::start().await;
    let http = b.http();
    let room = uid("room");
    let cases = [
        (
            reqwest::Method::POST,
            "/v1/rooms".to_string(),
            format!("[\"{room}\"]"),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/users/{}/notices", uid("u")),
            "[\"t\",1]".to_string(),
        ),
        (
            reqwest::Method::PUT,
            format!("/v1/users/{}/contacts", uid("u")),
            "[[\"bob\"]]".to_string(),
        ),
        (
            reqwest::Method::POST,
            format!("/v1/users/{}/disconnect", uid("u")),
            "[]".to_string(),
        ),
    ];
    let head = b.health().await["head"].clone();
    for (method, path, body) in cases {
        let r = http.send(method, &path, Some(body.into_bytes())).await;
        r.assert_error(400, "bad_request");
    }
    assert_eq!(
        b.health().await["head"],
        head,
        "a refused body appended an event"
    );
    let r = http
        .put_json(&format!("/v1/rooms/{room}/members/{}", uid("x")), json!({}))
        .await;
    r.assert_error(404, "not_found");
}

#[tokio::test]
async fn a_known_route_with_another_method_is_405_naming_the_allowed_ones() {
    let b = TestBroker::start().await;
    let http = b.http();
    for (method, path, allow) in [
        (reqwest::Method::DELETE, "/v1/rooms".to_string(), "POST"),
        (reqwest::Method::POST, "/v1/stats".to_string(), "GET"),
        (
            reqwest::Method::GET,
            format!("/v1/rooms/r/members/{}", uid("u")),
            "PUT, DELETE",
        ),
        (reqwest::Method::POST, "/health".to_string(), "GET"),
    ] {
        let r = http.send(method, &path, None).await;
        assert_eq!(r.status, 405, "{path}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "bad_request");
        let raw = reqwest::Client::new()
            .request(reqwest::Method::PATCH, format!("{}{}", b.base_url(), path))
            .header("Authorization", format!("Bearer {}", b.api_key))
            .send()
            .await
            .unwrap();
        assert_eq!(raw.status().as_u16(), 405);
        assert_eq!(raw.headers()["allow"], allow);
    }
    let r = http.get("/v1/no/such/route").await;
    r.assert_error(404, "not_found");
}
