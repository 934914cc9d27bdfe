//! Messaging (protocol.md section 4, section 8 rooms and notices, section 10 rules 7-11 and
//! 22-23, 25): the send reply, delivery to every device of both users but not the sending
//! device, sorted dm ids, gapless seq under pipelined concurrent sends, cid dedupe, receipts
//! (monotonic, clamped, silent when lower), typing (ephemeral, never to the typist's devices,
//! auto-cleared), history paging, conversations (order, paging, unread, read_seq), unread
//! counts, rooms over HTTP (201/409, room.member events, membership, publish with
//! `device: null`) and notices over HTTP (`live`, durable, replayed).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Sends a message from `sender` to user `to` and waits until `receiver` has it. Pushes are
/// in offset order, so everything due to `receiver` before it has then arrived.
async fn sentinel(sender: &Client, to: &str, receiver: &Client) -> Value {
    let cid = uid("sentinel");
    sender
        .ok(
            "send",
            json!({"to": to, "body": {"sentinel": true}, "cid": cid}),
        )
        .await;
    receiver.next_message(&cid).await
}

// ---------------------------------------------------------------------------------------------
// send and delivery

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_reply_carries_off_conv_seq_ts_and_dup_false() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let t0 = now_ms();
    let ack = a
        .ok(
            "send",
            json!({"to": bob, "body": {"text": "hi"}, "cid": "c1"}),
        )
        .await;
    assert_keys(&ack, &["re", "ok", "off", "conv", "seq", "ts", "dup"]);
    assert_eq!(ack["conv"], json!(dm(&alice, &bob)));
    assert_eq!(ack["seq"], json!(1));
    assert_eq!(ack["dup"], json!(false));
    assert!(off(&ack) > 0);
    let ts = ack["ts"].as_u64().expect("ts is unix ms");
    assert!(ts.abs_diff(t0) < 60_000, "ts {ts} is not unix ms near {t0}");
    let second = a
        .ok("send", json!({"to": bob, "body": 2, "cid": "c2"}))
        .await;
    assert_eq!(second["seq"], json!(2));
    assert!(off(&second) > off(&ack));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn message_reaches_every_device_of_both_users_including_the_sender() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let b1 = b.connect(&bob, "b1").await;
    let b2 = b.connect(&bob, "b2").await;
    let body = json!({"text": "hi bob", "n": 1});
    let ack = a1
        .ok("send", json!({"to": bob, "body": body, "cid": "c1"}))
        .await;
    for dev in [&b1, &b2, &a2] {
        let e = dev.next_message("c1").await;
        assert_keys(&e, MESSAGE_KEYS);
        assert_eq!(e["off"], ack["off"]);
        assert_eq!(e["ts"], ack["ts"]);
        assert_eq!(e["conv"], json!(conv));
        assert_eq!(e["seq"], json!(1));
        assert_eq!(e["from"], json!(alice));
        assert_eq!(e["device"], json!("a1"));
        assert_eq!(e["cid"], json!("c1"));
        assert_eq!(e["body"], body);
    }
    // the sending device gets the event too (same off as its ack), exactly once
    let s = sentinel(&b1, &alice, &a1).await;
    let own: Vec<Value> = messages(&a1.before(&s), None)
        .into_iter()
        .filter(|m| m["cid"] == "c1")
        .collect();
    assert_eq!(
        own.len(),
        1,
        "the sending device must get its message once: {own:?}"
    );
    assert_eq!(own[0]["off"], ack["off"]);

    let reply = b2
        .ok(
            "send",
            json!({"conv": conv, "body": "hi alice", "cid": "c2"}),
        )
        .await;
    assert_eq!(reply["conv"], json!(conv));
    assert_eq!(reply["seq"], json!(3)); // c1, the sentinel, c2
    for dev in [&a1, &a2, &b1] {
        let e = dev.next_message("c2").await;
        assert_eq!(e["from"], json!(bob));
        assert_eq!(e["device"], json!("b2"));
        assert_eq!(e["seq"], json!(3));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dm_conversation_id_is_the_two_user_ids_sorted() {
    let b = TestBroker::start().await;
    let (zed, amy) = (uid("zed"), uid("amy"));
    let z = b.connect(&zed, "d1").await;
    let ack = z
        .ok("send", json!({"to": amy, "body": "hi", "cid": "c1"}))
        .await;
    assert_eq!(ack["conv"], json!(format!("dm:{amy}:{zed}")));
    let a = b.connect(&amy, "d1").await;
    let back = a
        .ok("send", json!({"to": zed, "body": "hi", "cid": "c1"}))
        .await;
    assert_eq!(back["conv"], ack["conv"]);
    assert_eq!(back["seq"], json!(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_to_a_user_never_seen_is_allowed_and_kept() {
    let b = TestBroker::start().await;
    let (alice, ghost) = (uid("alice"), uid("ghost"));
    let a = b.connect(&alice, "a1").await;
    let ack = a
        .ok(
            "send",
            json!({"to": ghost, "body": "are you there", "cid": "c1"}),
        )
        .await;
    assert_eq!(ack["seq"], json!(1));
    let g = b.connect(&ghost, "g1").await;
    let h = g.ok("history", json!({"conv": dm(&alice, &ghost)})).await;
    let cids: Vec<&Value> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["cid"])
        .collect();
    assert_eq!(cids, [&json!("c1")]);
    let u = g.ok("unread", json!({})).await;
    assert_eq!(u["total"], json!(1));
    assert_eq!(u["convs"], json!({dm(&alice, &ghost): 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn body_may_be_any_json_value() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    let bodies = [
        json!("text"),
        json!(0),
        json!(-12.5),
        json!(true),
        json!(null),
        json!([]),
        json!([1, [2, [3]]]),
        json!({"deep": {"er": [null, false]}}),
    ];
    for (i, body) in bodies.iter().enumerate() {
        a.ok(
            "send",
            json!({"to": bob, "body": body, "cid": format!("c{i}")}),
        )
        .await;
    }
    for (i, body) in bodies.iter().enumerate() {
        let e = bc.next_message(&format!("c{i}")).await;
        assert_eq!(&e["body"], body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seq_is_gapless_under_pipelined_concurrent_sends() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let conv = dm(&alice, &bob);
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    let n = 60;
    let (acks_a, acks_b) = tokio::join!(
        a.pipeline(send_frames(&bob, "a", n), n),
        bc.pipeline(send_frames(&alice, "b", n), n)
    );
    let mut seqs: Vec<u64> = acks_a.iter().chain(&acks_b).map(seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=2 * n as u64).collect::<Vec<_>>());
    // rule 2: one connection's frames are applied in the order received
    for acks in [&acks_a, &acks_b] {
        let s: Vec<u64> = acks.iter().map(seq).collect();
        assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
        assert!(acks
            .iter()
            .all(|x| x["conv"] == json!(conv) && x["dup"] == json!(false)));
    }
    // seq order is offset order
    let mut by_seq: Vec<&Value> = acks_a.iter().chain(&acks_b).collect();
    by_seq.sort_by_key(|x| seq(x));
    let offs: Vec<u64> = by_seq.iter().map(|x| off(x)).collect();
    assert!(
        offs.windows(2).all(|w| w[0] < w[1]),
        "seq order is not offset order: {offs:?}"
    );
    // bob gets alice's messages once each, in seq order
    bc.next_message(&format!("a{}", n - 1)).await;
    let got: Vec<u64> = messages(&bc.all(), Some(&conv))
        .iter()
        .filter(|m| m["from"] == json!(alice))
        .map(seq)
        .collect();
    assert_eq!(got, acks_a.iter().map(seq).collect::<Vec<_>>());
    // another conversation starts at 1
    let other = a
        .ok("send", json!({"to": carol, "body": "x", "cid": "other"}))
        .await;
    assert_eq!(other["seq"], json!(1));
    assert_eq!(other["conv"], json!(dm(&alice, &carol)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_cid_returns_the_original_and_creates_no_event() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let bc = b.connect(&bob, "b1").await;
    let first = a1
        .ok("send", json!({"to": bob, "body": "once", "cid": "same"}))
        .await;
    assert_eq!(first["dup"], json!(false));
    let again = a1
        .ok("send", json!({"to": bob, "body": "once", "cid": "same"}))
        .await;
    assert_eq!(again["dup"], json!(true));
    for k in ["off", "conv", "seq", "ts"] {
        assert_eq!(again[k], first[k], "{k}: {first} vs {again}");
    }
    // another device, another body: still the same message
    let third = a2
        .ok(
            "send",
            json!({"to": bob, "body": "different", "cid": "same"}),
        )
        .await;
    assert_eq!(third["dup"], json!(true));
    assert_eq!(third["off"], first["off"]);
    assert_eq!(third["seq"], first["seq"]);
    // rule 7: per user across conversations: the original conv comes back
    let fourth = a1
        .ok(
            "send",
            json!({"to": uid("carol"), "body": "x", "cid": "same"}),
        )
        .await;
    assert_eq!(fourth["dup"], json!(true));
    for k in ["off", "conv", "seq", "ts"] {
        assert_eq!(fourth[k], first[k], "{k}: {first} vs {fourth}");
    }
    // the same cid from another user is another message
    let other = bc
        .ok("send", json!({"to": alice, "body": "mine", "cid": "same"}))
        .await;
    assert_eq!(other["dup"], json!(false));
    assert_eq!(seq(&other), seq(&first) + 1);
    let s = sentinel(&a1, &bob, &bc).await;
    let from_alice: Vec<u64> = messages(&bc.before(&s), None)
        .iter()
        .filter(|m| m["from"] == json!(alice))
        .map(off)
        .collect();
    assert_eq!(from_alice, [off(&first)], "a duplicate produced an event");
}

// ---------------------------------------------------------------------------------------------
// receipts

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receipts_reach_every_device_and_never_go_backwards() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let b1 = b.connect(&bob, "b1").await;
    let b2 = b.connect(&bob, "b2").await;
    for i in 1..=4 {
        a1.ok(
            "send",
            json!({"to": bob, "body": i, "cid": format!("c{i}")}),
        )
        .await;
    }
    let r = b1
        .ok(
            "receipt",
            json!({"conv": conv, "kind": "delivered", "seq": 4}),
        )
        .await;
    assert_eq!(
        (&r["conv"], &r["kind"], &r["seq"]),
        (&json!(conv), &json!("delivered"), &json!(4))
    );
    for dev in [&a1, &a2, &b2] {
        let e = dev.next_where("receipt", "kind", "delivered").await;
        assert_keys(&e, RECEIPT_KEYS);
        assert_eq!(e["conv"], json!(conv));
        assert_eq!(e["user"], json!(bob));
        assert_eq!(e["seq"], json!(4));
        assert!(e["off"].is_u64() && e["ts"].is_u64(), "{e}");
    }
    b1.ok("receipt", json!({"conv": conv, "kind": "read", "seq": 3}))
        .await;
    for dev in [&a1, &a2, &b2] {
        let e = dev.next_where("receipt", "kind", "read").await;
        assert_eq!((&e["user"], &e["seq"]), (&json!(bob), &json!(3)));
    }
    // lower than recorded: success with the recorded seq, and no event (rule 9)
    let low = b1
        .ok("receipt", json!({"conv": conv, "kind": "read", "seq": 1}))
        .await;
    assert_eq!(low["seq"], json!(3), "{low}");
    let low = b1
        .ok(
            "receipt",
            json!({"conv": conv, "kind": "delivered", "seq": 2}),
        )
        .await;
    assert_eq!(low["seq"], json!(4), "{low}");
    let same = b1
        .ok("receipt", json!({"conv": conv, "kind": "read", "seq": 3}))
        .await;
    assert_eq!(same["seq"], json!(3), "{same}");
    let s = sentinel(&b1, &alice, &a2).await;
    let receipts: Vec<Value> = a2
        .before(&s)
        .into_iter()
        .filter(|f| f["ev"] == "receipt")
        .collect();
    assert_eq!(
        receipts.len(),
        2,
        "a receipt not above the recorded one produced an event: {receipts:?}"
    );
    let u = b2.ok("unread", json!({})).await;
    assert_eq!(u["convs"][&conv], json!(1), "read 3 of 4: {u}");
    b2.ok("receipt", json!({"conv": conv, "kind": "read", "seq": 4}))
        .await;
    let e = a1
        .next_event("receipt", |e| e["kind"] == "read" && e["seq"] == 4)
        .await;
    assert_eq!(e["user"], json!(bob));
    let u = b1.ok("unread", json!({})).await;
    assert!(u["convs"].get(&conv).is_none(), "{u}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receipt_above_the_last_seq_is_clamped() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    for i in 0..3 {
        a.ok(
            "send",
            json!({"to": bob, "body": i, "cid": format!("c{i}")}),
        )
        .await;
    }
    let r = bc
        .ok("receipt", json!({"conv": conv, "kind": "read", "seq": 99}))
        .await;
    assert_eq!(r["seq"], json!(3), "{r}");
    assert_eq!(r["conv"], json!(conv));
    assert_eq!(r["kind"], json!("read"));
    let e = a.next_event("receipt", |_| true).await;
    assert_eq!(
        (&e["seq"], &e["kind"], &e["user"]),
        (&json!(3), &json!("read"), &json!(bob))
    );
    // a new message is unread again: the clamp did not pre-read it
    a.ok("send", json!({"to": bob, "body": 4, "cid": "c4"}))
        .await;
    let u = bc.ok("unread", json!({})).await;
    assert_eq!(u["total"], json!(1), "{u}");
}

// ---------------------------------------------------------------------------------------------
// typing

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typing_reaches_other_members_live_devices_only_and_is_never_replayed() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let b1 = b.connect(&bob, "b1").await;
    let b2 = b.connect(&bob, "b2").await;
    a1.ok("send", json!({"to": bob, "body": "hi", "cid": "c0"}))
        .await;
    let since = off(&b2.next_message("c0").await);
    b2.close().await;
    a1.ok("typing", json!({"conv": conv, "on": true})).await;
    let e = b1.next_event("typing", |_| true).await;
    assert_keys(&e, &["ev", "conv", "user", "on"]);
    assert_eq!(
        (&e["conv"], &e["user"], &e["on"]),
        (&json!(conv), &json!(alice), &json!(true))
    );
    assert!(e.get("off").is_none(), "typing carries off: {e}");
    a1.send(&json!({"op": "typing", "conv": conv, "on": false}))
        .await; // no id: no reply
    let e = b1.next_event("typing", |_| true).await;
    assert_eq!((&e["user"], &e["on"]), (&json!(alice), &json!(false)));
    assert!(e.get("off").is_none());
    // rule 11: never to the typist's own devices
    let s = sentinel(&b1, &alice, &a2).await;
    assert!(a2.find("typing").is_empty(), "{:?}", a2.find("typing"));
    assert!(a1.find("typing").is_empty(), "{:?}", a1.find("typing"));
    // not replayed
    let b2 = b.connect_since(&bob, "b2", since).await;
    assert!(
        b2.replay.iter().all(|f| f["ev"] != "typing"),
        "{:?}",
        b2.replay
    );
    assert_eq!(
        messages(&b2.replay, None)
            .iter()
            .map(off)
            .collect::<Vec<_>>(),
        [off(&s)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typing_is_cleared_by_the_server_when_not_renewed() {
    let b = TestBroker::start_with(|c| c.typing.expire_ms = 300).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    a.ok("send", json!({"to": bob, "body": "hi", "cid": "c0"}))
        .await;
    a.ok("typing", json!({"conv": conv, "on": true})).await;
    let on = bc.next_event("typing", |_| true).await;
    assert_eq!(on["on"], json!(true));
    let off_ev = bc.next_event("typing", |_| true).await; // alice sends nothing more
    assert_eq!(
        (&off_ev["conv"], &off_ev["user"], &off_ev["on"]),
        (&json!(conv), &json!(alice), &json!(false))
    );
    assert!(off_ev.get("off").is_none());
    assert!(
        a.find("typing").is_empty(),
        "typist got typing events: {:?}",
        a.find("typing")
    );
}

// ---------------------------------------------------------------------------------------------
// history

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_pages_newest_last_with_exclusive_before() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    let mut live = std::collections::HashMap::new();
    for i in 1..=7u64 {
        let cid = format!("c{i}");
        if i % 2 == 1 {
            a.ok("send", json!({"to": bob, "body": {"i": i}, "cid": cid}))
                .await;
            live.insert(i, bc.next_message(&cid).await);
        } else {
            bc.ok("send", json!({"to": alice, "body": {"i": i}, "cid": cid}))
                .await;
            live.insert(i, a.next_message(&cid).await);
        }
    }
    let seqs = |h: &Value| {
        h["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(seq)
            .collect::<Vec<_>>()
    };
    let h = bc.ok("history", json!({"conv": conv, "limit": 3})).await;
    assert_eq!(seqs(&h), [5, 6, 7]);
    assert_eq!(h["more"], json!(true));
    for m in h["messages"].as_array().unwrap() {
        assert_eq!(m, &live[&seq(m)], "history differs from the live event");
    }
    let h = a
        .ok("history", json!({"conv": conv, "before": 5, "limit": 3}))
        .await;
    assert_eq!(seqs(&h), [2, 3, 4]);
    assert_eq!(h["more"], json!(true));
    let h = a
        .ok("history", json!({"conv": conv, "before": 2, "limit": 3}))
        .await;
    assert_eq!(seqs(&h), [1]);
    assert_eq!(h["more"], json!(false));
    let h = a.ok("history", json!({"conv": conv, "before": 1})).await;
    assert_eq!(seqs(&h), Vec::<u64>::new());
    assert_eq!(h["more"], json!(false));
    let h = a.ok("history", json!({"conv": conv})).await;
    assert_eq!(seqs(&h), (1..=7).collect::<Vec<_>>());
    assert_eq!(h["more"], json!(false));
    assert!(h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["ev"] == "message" && m["conv"] == json!(conv)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_default_limit_is_50_with_more_flag() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a = b.connect(&alice, "a1").await;
    a.pipeline(send_frames(&bob, "c", 52), 52).await;
    let h = a.ok("history", json!({"conv": conv})).await;
    let seqs: Vec<u64> = h["messages"].as_array().unwrap().iter().map(seq).collect();
    assert_eq!(seqs, (3..=52).collect::<Vec<_>>());
    assert_eq!(h["more"], json!(true));
    let h = a.ok("history", json!({"conv": conv, "limit": 200})).await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 52);
    assert_eq!(h["more"], json!(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_of_a_conversation_you_are_not_in_is_forbidden() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    a.ok("send", json!({"to": bob, "body": "private", "cid": "c1"}))
        .await;
    let m = b.connect(&uid("mallory"), "m1").await;
    m.err("history", json!({"conv": dm(&alice, &bob)}), "forbidden")
        .await;
    // rule 8: a room that does not exist is not_found
    m.err(
        "history",
        json!({"conv": format!("room:{}", uid("nope"))}),
        "not_found",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// conversations and unread

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conversations_are_listed_most_recently_active_first_with_paging() {
    let b = TestBroker::start().await;
    let (alice, bob, carol, dave) = (uid("alice"), uid("bob"), uid("carol"), uid("dave"));
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    let cc = b.connect(&carol, "c1").await;
    let room = b.http().create_room("Ops", &[&alice, &bob, &carol]).await;
    let room_conv = format!("room:{room}");
    bc.ok("send", json!({"to": alice, "body": "1", "cid": "x1"}))
        .await;
    bc.ok("send", json!({"to": alice, "body": "2", "cid": "x2"}))
        .await;
    a.ok(
        "receipt",
        json!({"conv": dm(&alice, &bob), "kind": "read", "seq": 1}),
    )
    .await;
    a.ok("send", json!({"to": dave, "body": "3", "cid": "x3"}))
        .await;
    cc.ok("send", json!({"conv": room_conv, "body": "4", "cid": "x4"}))
        .await;
    let last_carol = cc
        .ok("send", json!({"to": alice, "body": "5", "cid": "x5"}))
        .await;

    let p1 = a.ok("conversations", json!({"limit": 3})).await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 3, "{p1}");
    assert!(p1["cursor"].is_string(), "first page cursor: {p1}");
    let mut items: Vec<Value> = p1["items"].as_array().unwrap().clone();
    let mut cursor = p1["cursor"].clone();
    for _ in 0..3 {
        if cursor.is_null() {
            break;
        }
        let page = a
            .ok("conversations", json!({"limit": 3, "cursor": cursor}))
            .await;
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        cursor = page["cursor"].clone();
    }
    assert!(cursor.is_null(), "paging did not end with a null cursor");
    let convs: Vec<&str> = items.iter().map(|i| i["conv"].as_str().unwrap()).collect();
    let (d_carol, d_dave, d_bob) = (dm(&alice, &carol), dm(&alice, &dave), dm(&alice, &bob));
    assert_eq!(
        convs,
        [
            d_carol.as_str(),
            room_conv.as_str(),
            d_dave.as_str(),
            d_bob.as_str()
        ]
    );
    let it = |c: &str| items.iter().find(|i| i["conv"] == c).unwrap().clone();
    let c = it(&d_carol);
    assert_eq!((&c["kind"], &c["peer"]), (&json!("dm"), &json!(carol)));
    assert_eq!(c["last"]["off"], last_carol["off"]);
    assert_eq!(c["last"]["ev"], json!("message"));
    assert_eq!((&c["unread"], &c["read_seq"]), (&json!(1), &json!(0)));
    let r = it(&room_conv);
    assert_eq!((&r["kind"], &r["name"]), (&json!("room"), &json!("Ops")));
    assert_eq!((&r["unread"], &r["last"]["cid"]), (&json!(1), &json!("x4")));
    let d = it(&d_dave);
    assert_eq!((&d["unread"], &d["peer"]), (&json!(0), &json!(dave)));
    let bo = it(&d_bob);
    assert_eq!((&bo["unread"], &bo["read_seq"]), (&json!(1), &json!(1)));
    assert_eq!(
        (&bo["last"]["seq"], &bo["last"]["from"]),
        (&json!(2), &json!(bob))
    );
    let whole = a.ok("conversations", json!({"limit": 200})).await;
    let all: Vec<&str> = whole["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["conv"].as_str().unwrap())
        .collect();
    assert_eq!(all, convs);
    assert!(whole["cursor"].is_null(), "{whole}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_without_messages_is_active_from_its_creation_with_last_null() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let http = b.http();
    let old_room = http.create_room("Old", &[&alice]).await;
    let a = b.connect(&alice, "a1").await;
    a.ok("send", json!({"to": bob, "body": "x", "cid": "c1"}))
        .await;
    let new_room = http.create_room("New", &[&alice]).await;
    let list = a.ok("conversations", json!({"limit": 50})).await;
    let items = list["items"].as_array().unwrap();
    let convs: Vec<&Value> = items.iter().map(|i| &i["conv"]).collect();
    assert_eq!(
        convs,
        [
            &json!(format!("room:{new_room}")),
            &json!(dm(&alice, &bob)),
            &json!(format!("room:{old_room}"))
        ]
    );
    assert!(items[0]["last"].is_null(), "{}", items[0]);
    assert_eq!(items[0]["unread"], json!(0));
    assert!(items[2]["last"].is_null(), "{}", items[2]);
    assert!(list["cursor"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unread_counts_only_others_messages_above_the_read_receipt() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    let cc = b.connect(&carol, "c1").await;
    for i in 0..3 {
        bc.ok(
            "send",
            json!({"to": alice, "body": i, "cid": format!("b{i}")}),
        )
        .await;
    }
    a.ok(
        "send",
        json!({"to": bob, "body": "own messages never count", "cid": "a0"}),
    )
    .await;
    for i in 0..2 {
        cc.ok(
            "send",
            json!({"to": alice, "body": i, "cid": format!("c{i}")}),
        )
        .await;
    }
    let (ab, ac) = (dm(&alice, &bob), dm(&alice, &carol));
    let u = a.ok("unread", json!({})).await;
    assert_eq!(u["total"], json!(5), "{u}");
    assert_eq!(u["convs"], json!({ab.clone(): 3, ac.clone(): 2}));
    a.ok("receipt", json!({"conv": ab, "kind": "read", "seq": 2}))
        .await;
    let u = a.ok("unread", json!({})).await;
    assert_eq!(u["total"], json!(3));
    assert_eq!(u["convs"], json!({ab.clone(): 1, ac.clone(): 2}));
    // delivered receipts do not change unread
    a.ok(
        "receipt",
        json!({"conv": ac, "kind": "delivered", "seq": 2}),
    )
    .await;
    let u = a.ok("unread", json!({})).await;
    assert_eq!(u["total"], json!(3));
    // rule 10: only non-zero counts are listed
    a.ok("receipt", json!({"conv": ac, "kind": "read", "seq": 2}))
        .await;
    let u = a.ok("unread", json!({})).await;
    assert_eq!(u["convs"], json!({ab.clone(): 1}), "{u}");
    assert_eq!(u["total"], json!(1));
    let ub = bc.ok("unread", json!({})).await;
    assert_eq!(ub["total"], json!(1), "{ub}");
    assert_eq!(ub["convs"], json!({ab: 1}), "{ub}");
}

// ---------------------------------------------------------------------------------------------
// rooms over HTTP

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_create_answers_201_and_an_existing_id_409_conflict() {
    let b = TestBroker::start().await;
    let http = b.http();
    let room = uid("room");
    let r = http
        .post(
            "/v1/rooms",
            json!({"id": room, "name": "Ops", "members": [uid("a")]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = http
        .post(
            "/v1/rooms",
            json!({"id": room, "name": "Again", "members": []}),
        )
        .await;
    r.assert_error(409, "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_creation_emits_joined_to_each_initial_member() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    let room = b.http().create_room("Ops", &[&alice, &bob]).await;
    for (dev, user) in [(&a, &alice), (&bc, &bob)] {
        let e = dev.next_where("room.member", "user", user.as_str()).await;
        assert_eq!(
            e["room"],
            json!(room),
            "rule 22: `room` is the bare id: {e}"
        );
        assert_eq!(e["conv"], json!(format!("room:{room}")), "{e}");
        assert_eq!(e["change"], json!("joined"));
        assert!(e["off"].is_u64() && e["ts"].is_u64(), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_member_add_and_remove_emit_events_and_gate_sending() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let http = b.http();
    let room = http.create_room("Ops", &[&alice, &bob]).await;
    let conv = format!("room:{room}");
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let bc = b.connect(&bob, "b1").await;
    let cc = b.connect(&carol, "c1").await;
    let ack = a1
        .ok(
            "send",
            json!({"conv": conv, "body": "hello room", "cid": "r1"}),
        )
        .await;
    assert_eq!((&ack["conv"], &ack["seq"]), (&json!(conv), &json!(1)));
    for dev in [&a2, &bc] {
        let e = dev.next_message("r1").await;
        assert_eq!(
            (&e["conv"], &e["from"], &e["off"]),
            (&json!(conv), &json!(alice), &ack["off"])
        );
    }
    cc.err(
        "send",
        json!({"conv": conv, "body": "let me in", "cid": "x"}),
        "forbidden",
    )
    .await;

    let r = http.put(&format!("/v1/rooms/{room}/members/{carol}")).await;
    assert!(r.is_success(), "{} {}", r.status, r.text);
    for dev in [&a1, &bc, &cc] {
        let e = dev.next_where("room.member", "user", carol.as_str()).await;
        assert_eq!(
            (&e["room"], &e["conv"], &e["change"]),
            (&json!(room), &json!(conv), &json!("joined"))
        );
        assert!(e["off"].is_u64());
    }
    let ack = cc
        .ok("send", json!({"conv": conv, "body": "hi all", "cid": "r2"}))
        .await;
    assert_eq!(ack["seq"], json!(2));
    bc.next_message("r2").await;

    let r = http
        .delete(&format!("/v1/rooms/{room}/members/{bob}"))
        .await;
    assert!(r.is_success(), "{} {}", r.status, r.text);
    for dev in [&a1, &cc] {
        let e = dev.next_where("room.member", "user", bob.as_str()).await;
        assert_eq!((&e["room"], &e["change"]), (&json!(room), &json!("left")));
    }
    bc.err(
        "send",
        json!({"conv": conv, "body": "still here?", "cid": "r3"}),
        "forbidden",
    )
    .await;
    a1.ok(
        "send",
        json!({"conv": conv, "body": "bye bob", "cid": "r4"}),
    )
    .await;
    let s = sentinel(&cc, &bob, &bc).await;
    assert!(
        messages(&bc.before(&s), None)
            .iter()
            .all(|m| m["cid"] != "r4"),
        "a removed member still gets room messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_to_a_room_that_does_not_exist_is_not_found() {
    let b = TestBroker::start().await;
    let a = b.connect(&uid("alice"), "a1").await;
    a.err(
        "send",
        json!({"conv": format!("room:{}", uid("nope")), "body": "x", "cid": "c1"}),
        "not_found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receipt_and_typing_in_someone_elses_conversation_are_forbidden() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let ack = a
        .ok("send", json!({"to": bob, "body": "x", "cid": "c1"}))
        .await;
    let m = b.connect(&uid("mallory"), "m1").await;
    m.err(
        "receipt",
        json!({"conv": ack["conv"], "kind": "read", "seq": 1}),
        "forbidden",
    )
    .await;
    m.err(
        "typing",
        json!({"conv": ack["conv"], "on": true}),
        "forbidden",
    )
    .await;
    m.err(
        "send",
        json!({"conv": ack["conv"], "body": "x", "cid": "c2"}),
        "forbidden",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_publish_over_http_has_the_send_reply_shape_and_a_null_device() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let http = b.http();
    let room = http.create_room("Ops", &[&alice, &bob]).await;
    let bc = b.connect(&bob, "b1").await;
    let path = format!("/v1/rooms/{room}/messages");
    let r = http
        .post(&path, json!({"from": alice, "body": {"x": 1}, "cid": "h1"}))
        .await;
    assert!(r.is_success(), "{} {}", r.status, r.text);
    let ack = r.json();
    assert_keys(&ack, &["off", "conv", "seq", "ts", "dup"]);
    assert_eq!(
        (&ack["seq"], &ack["conv"], &ack["dup"]),
        (&json!(1), &json!(format!("room:{room}")), &json!(false))
    );
    let e = bc.next_message("h1").await;
    assert_keys(&e, MESSAGE_KEYS);
    assert_eq!(
        (&e["from"], &e["body"], &e["off"], &e["ts"]),
        (&json!(alice), &json!({"x": 1}), &ack["off"], &ack["ts"])
    );
    assert!(e["device"].is_null(), "device of an HTTP publish: {e}");
    let r = http
        .post(&path, json!({"from": alice, "body": {"x": 1}, "cid": "h1"}))
        .await;
    assert!(r.is_success(), "{}", r.text);
    assert_eq!(
        (&r.json()["dup"], &r.json()["off"]),
        (&json!(true), &ack["off"])
    );
    let r = http
        .post(&path, json!({"from": bob, "body": "no cid"}))
        .await;
    assert!(r.is_success(), "{}", r.text);
    assert_eq!(r.json()["seq"], json!(2));
    let r = http
        .post(&path, json!({"from": carol, "body": "not a member"}))
        .await;
    r.assert_error(403, "forbidden");
}

// ---------------------------------------------------------------------------------------------
// notices over HTTP

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notice_counts_the_live_devices_it_reached() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let r = b
        .http()
        .post(
            &format!("/v1/users/{alice}/notices"),
            json!({"type": "billing", "data": {"due": 3}}),
        )
        .await;
    assert!(r.is_success(), "{} {}", r.status, r.text);
    let body = r.json();
    assert!(body["off"].is_u64(), "{body}");
    assert_eq!(body["live"], json!(2), "{body}");
    for dev in [&a1, &a2] {
        let e = dev.next_event("notice", |_| true).await;
        assert_eq!(e["off"], body["off"]);
        assert!(e["ts"].is_u64());
        assert_eq!(
            (&e["type"], &e["data"]),
            (&json!("billing"), &json!({"due": 3}))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notice_for_an_offline_user_is_durable_and_replayed() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let a = b.connect(&alice, "a1").await;
    let since = a.hello_reply["head"].as_u64().unwrap();
    a.close().await;
    drop(a);
    // the close is asynchronous on the server: wait until alice has no live device
    let http = b.http();
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let p = http
            .get(&format!("/v1/users/{alice}/presence"))
            .await
            .json();
        if p["devices"] == json!([]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice still has devices: {p}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = http
        .post(
            &format!("/v1/users/{alice}/notices"),
            json!({"type": "welcome", "data": null}),
        )
        .await;
    assert!(r.is_success(), "{}", r.text);
    assert_eq!(r.json()["live"], json!(0));
    let n_off = off(&r.json());
    let a = b.connect_since(&alice, "a1", since).await;
    let notices: Vec<&Value> = a.replay.iter().filter(|e| e["ev"] == "notice").collect();
    assert_eq!(notices.len(), 1, "{:?}", a.replay);
    assert_eq!(off(notices[0]), n_off);
    assert_eq!(
        (&notices[0]["type"], &notices[0]["data"]),
        (&json!("welcome"), &Value::Null)
    );
}
