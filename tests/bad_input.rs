//! Bad input and limits (protocol.md sections 1, 2, 8 errors, 10 rule 4): frames that are not
//! JSON/MessagePack (1007), the wrong frame type for the subprotocol (1003), unknown ops and
//! wrong field types (`bad_request`, with `re` or `re: null`), cid length, bodies over 16 KiB
//! (`too_large`, socket kept), frames over `limits.max_frame_bytes` whole or fragmented (1009),
//! a slow consumer (4008, then a full catch-up with `since`), and HTTP API errors (401, 400,
//! 404, 413).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// frames that are not frames

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_json_text_frame_closes_1007() {
    let b = TestBroker::start().await;
    let c = b.connect(&uid("alice"), "d1").await;
    c.send_raw(Message::Text("this is {not json".into()))
        .await
        .unwrap();
    assert_eq!(c.wait_closed().await, Some(1007));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_json_text_frame_before_hello_closes_1007() {
    let b = TestBroker::start().await;
    let c = b.open().await;
    c.send_raw(Message::Text("{{{".into())).await.unwrap();
    assert_eq!(c.wait_closed().await, Some(1007));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_msgpack_binary_frame_closes_1007() {
    let b = TestBroker::start().await;
    let c = b
        .connect_with(&uid("alice"), ConnectOpts::device("d1").msgpack())
        .await;
    c.send_raw(Message::Binary(vec![0xc1, 0xc1, 0xc1]))
        .await
        .unwrap(); // 0xc1 is never used
    assert_eq!(c.wait_closed().await, Some(1007));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn binary_frame_on_the_json_subprotocol_closes_1003() {
    let b = TestBroker::start().await;
    let c = b.connect(&uid("alice"), "d1").await;
    let frame = json!({"op": "unread", "id": 5}).to_string().into_bytes();
    c.send_raw(Message::Binary(frame)).await.unwrap();
    assert_eq!(c.wait_closed().await, Some(1003));
    assert!(
        c.all().iter().all(|f| f["re"] != json!(5)),
        "the binary frame was answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_frame_on_the_msgpack_subprotocol_closes_1003() {
    let b = TestBroker::start().await;
    let c = b
        .connect_with(&uid("alice"), ConnectOpts::device("d1").msgpack())
        .await;
    c.send_raw(Message::Text(json!({"op": "unread", "id": 5}).to_string()))
        .await
        .unwrap();
    assert_eq!(c.wait_closed().await, Some(1003));
}

// ---------------------------------------------------------------------------------------------
// bad frames that keep the socket

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_op_is_bad_request_with_re_and_keeps_the_socket() {
    let b = TestBroker::start().await;
    let c = b.connect(&uid("alice"), "d1").await;
    let r = c.request_frame(json!({"op": "teleport", "id": 7})).await;
    assert_eq!(r["re"], json!(7));
    assert_error(&r, "bad_request");
    c.ok("unread", json!({})).await;
    assert!(!c.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_frame_without_id_gets_an_error_with_re_null() {
    let b = TestBroker::start().await;
    let c = b.connect(&uid("alice"), "d1").await;
    c.send(&json!({"op": "teleport"})).await;
    let e = c
        .next_push_within(TIMEOUT, "error with re null", |f| {
            f.get("re").is_some() && f["ok"] == json!(false)
        })
        .await;
    assert!(e["re"].is_null(), "{e}");
    assert_error(&e, "bad_request");
    c.ok("unread", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn successful_frame_without_id_gets_no_reply() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    a.send(&json!({"op": "send", "to": bob, "body": "quiet", "cid": "q1"}))
        .await;
    bc.next_message("q1").await;
    a.ok("unread", json!({})).await; // frames are answered in order: any reply to q1 is in by now
    let stray: Vec<Value> = a
        .all()
        .into_iter()
        .filter(|f| {
            f.get("re").is_some()
                && f["re"] != json!(1)
                && f["re"].as_u64().is_none_or(|id| id < 100)
        })
        .collect();
    assert!(
        stray.is_empty(),
        "a frame without id was answered: {stray:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_field_types_are_bad_request_before_any_membership_check() {
    let b = TestBroker::start().await;
    let c = b.connect(&uid("alice"), "d1").await;
    // conversations here do not exist / are not alice's: the shape is checked first
    let frames = [
        json!({"op": 5}),
        json!({"id": 3}),
        json!({"op": "send", "to": 123, "body": "x", "cid": "c1"}),
        json!({"op": "send", "to": "bob", "body": "x", "cid": 99}),
        json!({"op": "send", "to": ["bob"], "body": "x", "cid": "c1"}),
        json!({"op": "receipt", "conv": "dm:a:b", "kind": "read", "seq": "three"}),
        json!({"op": "receipt", "conv": "dm:a:b", "kind": "seen", "seq": 1}),
        json!({"op": "receipt", "conv": "dm:a:b", "kind": "read", "seq": -1}),
        json!({"op": "typing", "conv": "dm:a:b", "on": "yes"}),
        json!({"op": "history", "conv": "dm:a:b", "limit": "ten"}),
        json!({"op": "history", "conv": 42}),
        json!({"op": "conversations", "limit": "all"}),
        json!({"op": "presence", "status": 7}),
        json!({"op": "presence", "status": "sleeping"}),
        json!({"op": "call.invite", "to": "bob", "media": "video"}),
        json!({"op": "call.invite", "to": ["bob"], "media": "hologram"}),
        json!({"op": "call.accept", "call": 12}),
    ];
    for (i, frame) in frames.iter().enumerate() {
        let id = 1000 + i as u64;
        let mut f = frame.clone();
        f["id"] = json!(id);
        let r = c.request_frame(f).await;
        assert_eq!(r["re"], json!(id), "{frame}: {r}");
        assert_eq!(r["ok"], json!(false), "{frame} was accepted: {r}");
        assert_eq!(r["error"]["code"], json!("bad_request"), "{frame}: {r}");
        assert!(r["error"]["message"].is_string(), "{r}");
    }
    c.ok("unread", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn send_without_cid_is_bad_request() {
    // section 4 marks optional fields; `cid` of `send` is not one of them
    let b = TestBroker::start().await;
    let c = b.connect(&uid("alice"), "d1").await;
    c.err(
        "send",
        json!({"to": uid("bob"), "body": "x"}),
        "bad_request",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_that_is_not_an_object_is_bad_request_with_re_null() {
    let b = TestBroker::start().await;
    let c = b.connect(&uid("alice"), "d1").await;
    for text in ["[1, 2, 3]", "42", "\"hello\"", "null"] {
        c.send_raw(Message::Text(text.to_string())).await.unwrap();
        let e = c
            .next_push_within(TIMEOUT, &format!("error for {text}"), |f| {
                f["ok"] == json!(false)
            })
            .await;
        assert!(e.get("re").is_some_and(Value::is_null), "{text}: {e}");
        assert_error(&e, "bad_request");
    }
    c.ok("unread", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cid_must_be_1_to_64_chars() {
    let b = TestBroker::start().await;
    let c = b.connect(&uid("alice"), "d1").await;
    let bob = uid("bob");
    c.err(
        "send",
        json!({"to": bob, "body": "x", "cid": ""}),
        "bad_request",
    )
    .await;
    c.err(
        "send",
        json!({"to": bob, "body": "x", "cid": "x".repeat(65)}),
        "bad_request",
    )
    .await;
    let ok = c
        .ok(
            "send",
            json!({"to": bob, "body": "x", "cid": "x".repeat(64)}),
        )
        .await;
    assert_eq!(ok["seq"], json!(1), "a refused send used a seq: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn body_over_16_kib_is_too_large_and_keeps_the_socket() {
    let b = TestBroker::start().await;
    let c = b.connect(&uid("alice"), "d1").await;
    let bob = uid("bob");
    c.err(
        "send",
        json!({"to": bob, "body": "x".repeat(17 * 1024), "cid": "big"}),
        "too_large",
    )
    .await;
    assert!(!c.is_closed());
    let ok = c
        .ok(
            "send",
            json!({"to": bob, "body": "x".repeat(15 * 1024), "cid": "fits"}),
        )
        .await;
    assert_eq!(ok["seq"], json!(1));
}

// ---------------------------------------------------------------------------------------------
// frame size limit

fn big_send(id: u64, to: &str, body_len: usize) -> String {
    json!({"op": "send", "id": id, "to": to, "body": "z".repeat(body_len), "cid": format!("c{id}")})
        .to_string()
}

/// `text` cut into `n` nearly equal byte pieces (ASCII only).
fn pieces(text: &str, n: usize) -> Vec<Vec<u8>> {
    let bytes = text.as_bytes();
    let size = bytes.len().div_ceil(n);
    bytes.chunks(size).map(<[u8]>::to_vec).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frame_over_max_frame_bytes_closes_1009() {
    let b = TestBroker::start_with(|c| c.limits.max_frame_bytes = 4096).await;
    let c = b.connect(&uid("alice"), "d1").await;
    let bob = uid("bob");
    c.ok(
        "send",
        json!({"to": bob, "body": "y".repeat(3000), "cid": "fits"}),
    )
    .await;
    c.send_raw(Message::Text(big_send(2, &bob, 5000)))
        .await
        .unwrap();
    assert_eq!(c.wait_closed().await, Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fragmented_message_under_the_limit_is_reassembled() {
    let b = TestBroker::start_with(|c| c.limits.max_frame_bytes = 4096).await;
    let c = b.connect(&uid("alice"), "d1").await;
    let text = big_send(3, &uid("bob"), 3000);
    c.send_fragments(Kind::Text, &pieces(&text, 3))
        .await
        .unwrap();
    let reply = c.reply_to(3).await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(reply["seq"], json!(1));
    assert_eq!(
        reply["conv"].as_str().map(|c| c.starts_with("dm:")),
        Some(true),
        "{reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fragmented_message_over_max_frame_bytes_closes_1009() {
    let b = TestBroker::start_with(|c| c.limits.max_frame_bytes = 4096).await;
    let c = b.connect(&uid("alice"), "d1").await;
    // three fragments of ~2 KB: each under the limit, the message over it
    let text = big_send(4, &uid("bob"), 6000);
    let parts = pieces(&text, 3);
    assert!(parts.iter().all(|p| p.len() < 4096));
    let _ = c.send_fragments(Kind::Text, &parts).await; // the server may close mid-way
    assert_eq!(c.wait_closed().await, Some(1009));
    assert!(
        c.all().iter().all(|f| f["re"] != json!(4)),
        "the oversized message was answered"
    );
}

// ---------------------------------------------------------------------------------------------
// slow consumer

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumer_is_closed_4008_and_catches_up_with_since() {
    let b = TestBroker::start_with(|c| c.limits.outbound_queue = 32).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    // a tiny receive buffer, so the server's writes back up after a few frames
    let opts = OpenOpts {
        protocols: vec![JSON_PROTO.to_string()],
        recv_buffer: Some(4096),
        ..Default::default()
    };
    let mut slow = b.open_with(opts).await.expect("upgrade");
    slow.hello(Some(&b.token(&alice)), "a1", None).await;
    let head = slow.hello_reply["head"].as_u64().unwrap();
    let flooder = b.connect(&bob, "b1").await;

    slow.pause_reading();
    // ~9 MB: more than the kernel's socket buffers can absorb (tcp_wmem max is 4 MB)
    let n = 600;
    let frames: Vec<Value> = (0..n)
        .map(|i| json!({"op": "send", "to": alice, "body": {"i": i, "pad": "p".repeat(15_000)}, "cid": format!("f{i}")}))
        .collect();
    // a slow consumer never slows the sender down: every send is acked while alice sleeps.
    // The flooder gets an ack and its own message event per send: a window of 4 keeps that
    // far under the queue of 32, so only the sleeping consumer overflows.
    let acks = flooder.pipeline(frames, 4).await;
    assert!(
        acks.iter().all(|a| a["ok"] == json!(true)),
        "a flood send failed"
    );
    slow.resume_reading();
    assert_eq!(
        slow.wait_closed_within(Duration::from_secs(15)).await,
        Some(4008)
    );

    // what alice processed is a gapless prefix of the flood
    let seen = messages(&slow.all(), Some(&conv));
    assert!(
        seen.len() < n,
        "all {n} messages fit: the consumer was not slow"
    );
    let ack_offs: Vec<u64> = acks.iter().map(off).collect();
    let seen_offs: Vec<u64> = seen.iter().map(off).collect();
    assert_eq!(
        seen_offs,
        ack_offs[..seen.len()],
        "gap or reorder before the 4008 close"
    );

    // a reconnect with `since` fills in the rest, exactly once
    let since = seen_offs.last().copied().unwrap_or(head);
    let fresh = b.connect_since(&alice, "a1", since).await;
    let replayed = messages(&fresh.replay, Some(&conv));
    let mut all_offs = seen_offs.clone();
    all_offs.extend(replayed.iter().map(off));
    assert_eq!(
        all_offs, ack_offs,
        "seen + replay is not every flood message once"
    );
    let seqs: Vec<u64> = seen.iter().chain(&replayed).map(seq).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// HTTP API errors

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v1_without_or_with_a_wrong_api_key_is_401_unauthorized() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let calls: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (
            reqwest::Method::GET,
            format!("/v1/users/{alice}/presence"),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("/v1/users/{alice}/notices"),
            Some(json!({"type": "t", "data": 1})),
        ),
        (reqwest::Method::GET, "/v1/connections".to_string(), None),
        (
            reqwest::Method::GET,
            "/v1/events?after=0&limit=1".to_string(),
            None,
        ),
        (
            reqwest::Method::POST,
            "/v1/rooms".to_string(),
            Some(json!({"id": uid("room"), "name": "x", "members": [alice]})),
        ),
    ];
    let wrong = b.http().with_key(&format!("wrong-{}", b.api_key));
    for http in [b.http_anonymous(), wrong] {
        for (method, path, body) in &calls {
            let r = http
                .send(
                    method.clone(),
                    path,
                    body.as_ref().map(|v| v.to_string().into_bytes()),
                )
                .await;
            r.assert_error(401, "unauthorized");
        }
    }
    // and nothing happened: the room was not created
    let r = b
        .http()
        .post("/v1/rooms", calls[4].2.clone().unwrap())
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_needs_no_api_key() {
    let b = TestBroker::start().await;
    let h = b.health().await;
    assert_eq!(h["status"], json!("ok"));
    for k in ["uptime_s", "connections", "head"] {
        assert!(h[k].is_number(), "{k}: {h}");
    }
    assert!(h["version"].as_str().is_some_and(|v| !v.is_empty()), "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v1_bad_json_is_400_bad_request() {
    let b = TestBroker::start().await;
    let r = b
        .http()
        .post_raw(&format!("/v1/users/{}/notices", uid("x")), b"{not json")
        .await;
    r.assert_error(400, "bad_request");
    let r = b.http().post_raw("/v1/rooms", b"[1,2]").await;
    r.assert_error(400, "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v1_unknown_room_is_404_not_found() {
    let b = TestBroker::start().await;
    let http = b.http();
    let room = uid("nope");
    http.put(&format!("/v1/rooms/{room}/members/{}", uid("x")))
        .await
        .assert_error(404, "not_found");
    http.delete(&format!("/v1/rooms/{room}/members/{}", uid("x")))
        .await
        .assert_error(404, "not_found");
    http.post(
        &format!("/v1/rooms/{room}/messages"),
        json!({"from": uid("x"), "body": "hi"}),
    )
    .await
    .assert_error(404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v1_body_over_max_body_bytes_is_413() {
    let b = TestBroker::start_with(|c| c.server.max_body_bytes = 1024).await;
    let alice = uid("alice");
    let http = b.http();
    let r = http
        .post(
            &format!("/v1/users/{alice}/notices"),
            json!({"type": "t", "data": "d".repeat(4000)}),
        )
        .await;
    r.assert_error(413, "too_large");
    let r = http
        .post(
            &format!("/v1/users/{alice}/notices"),
            json!({"type": "t", "data": "small"}),
        )
        .await;
    assert!(r.is_success(), "{} {}", r.status, r.text);
}
