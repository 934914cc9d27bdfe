//! Limits at their edges (issue 9, item 3): the per-session rate limit (`rate_limited`,
//! nothing applied, then 4009), `limits.max_devices_per_user` (`busy`, 1008),
//! `limits.max_connections` (`unavailable`, 1013), `limits.max_room_members` (400 on
//! create, 409 on add), and the HTTP slowloris guards `server.header_timeout_ms` and
//! `server.body_timeout_ms` (408 `timeout`). Each test first shows the edge itself passes
//! (the last allowed frame, device, member, a slow-but-in-time request), then that one more
//! is refused. The other limits have their edge tests beside the feature they guard:
//! `max_frame_bytes`, `max_body_bytes`, `server.max_body_bytes` and `outbound_queue` in
//! tests/bad_input.rs, `hello_timeout_ms` and `max_replay_events` in tests/session.rs.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------
// per-session rate limit

/// The `message` events of `conv` on `c`, by cid.
fn cids(c: &Client, conv: &str) -> Vec<String> {
    messages(&c.all(), Some(conv))
        .iter()
        .map(|m| m["cid"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frames_over_the_rate_get_rate_limited_and_are_not_applied_then_a_refill_passes() {
    // 2 at once, then one token every 50 ms; strikes far away
    let b = TestBroker::start_with(|c| {
        c.limits.rate_per_s = 20;
        c.limits.rate_burst = 2;
        c.limits.rate_strikes = 1000;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;

    // three frames in one write burst: the bucket holds two
    let frames: Vec<Value> = (1..=3)
        .map(|i| json!({"op": "send", "id": 100 + i, "to": bob, "body": i, "cid": format!("r{i}")}))
        .collect();
    for f in &frames {
        a.send(f).await;
    }
    let replies = [
        a.reply_to(101).await,
        a.reply_to(102).await,
        a.reply_to(103).await,
    ];
    let ok = replies.iter().filter(|r| r["ok"] == json!(true)).count();
    let limited: Vec<&Value> = replies.iter().filter(|r| r["ok"] == json!(false)).collect();
    assert!(ok >= 2, "the burst of 2 was not allowed: {replies:?}");
    assert!(
        !limited.is_empty(),
        "three frames at once passed a bucket of two: {replies:?}"
    );
    for r in &limited {
        assert_error(r, "rate_limited");
    }

    // the socket stays; after a refill a frame passes again
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ack = a
        .ok("send", json!({"to": bob, "body": "after", "cid": "after"}))
        .await;
    assert!(!a.is_closed());

    // nothing of a limited frame was applied: bob got exactly the acked messages, and the
    // history has exactly them
    bc.next_message("after").await;
    let mut acked: Vec<String> = replies
        .iter()
        .zip(1..)
        .filter(|(r, _)| r["ok"] == json!(true))
        .map(|(_, i)| format!("r{i}"))
        .collect();
    acked.push("after".into());
    assert_eq!(cids(&bc, &conv), acked, "a rate-limited send was delivered");
    let h = bc.ok("history", json!({"conv": conv, "limit": 50})).await;
    let stored: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["cid"].as_str().unwrap())
        .collect();
    assert_eq!(stored, acked, "a rate-limited send was stored");
    assert_eq!(
        seq(&ack),
        acked.len() as u64,
        "seq counts only applied sends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consecutive_rate_limited_frames_close_the_session_4009_and_a_new_one_may_connect() {
    // one token a second: the frames below arrive in far less than that
    let b = TestBroker::start_with(|c| {
        c.limits.rate_per_s = 1;
        c.limits.rate_burst = 5;
        c.limits.rate_strikes = 3;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    let n = 12u64;
    for i in 1..=n {
        let f = json!({"op": "send", "id": i, "to": bob, "body": i, "cid": format!("s{i}")});
        if a.send_raw(a.encode(&f)).await.is_err() {
            break;
        }
    }
    assert_eq!(a.wait_closed().await, Some(4009), "{}", a.close_reason());
    // the refusals are answered before the close; acks still in the sequencer when the
    // session closes may be lost with it (the sends are durable: a resend with the same
    // cid answers `dup`)
    let limited: Vec<u64> = a
        .all()
        .into_iter()
        .filter(|f| f["re"].as_u64().is_some() && f["ok"] == json!(false))
        .map(|f| {
            assert_error(&f, "rate_limited");
            f["re"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(
        limited.len(),
        3,
        "exactly `rate_strikes` refusals before the close: {limited:?}"
    );
    // what was applied is the burst (plus any refill): a prefix of the sends, none of the
    // refused ones
    let conv = dm(&alice, &bob);
    let h = bc.ok("history", json!({"conv": conv, "limit": 50})).await;
    let stored: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_u64().unwrap())
        .collect();
    // The refusals are consecutive frames right after the burst (5, plus any refill).
    let first = limited[0];
    assert!((6..=8).contains(&first), "refusals: {limited:?}");
    assert_eq!(limited, (first..first + 3).collect::<Vec<_>>());
    // What was applied is a prefix of the accepted sends and none of the refused ones.
    // Accepted sends still queued for the sequencer when the session closed may be
    // dropped with it (never acked, so a client resends them with the same cid).
    assert!(
        !stored.is_empty() && stored.len() < first as usize,
        "burst of 5 (plus refills): {stored:?}, refusals from {first}"
    );
    assert_eq!(stored, (1..=stored.len() as u64).collect::<Vec<_>>());
    // the close is per session: alice may come back at once with a fresh bucket
    let again = b.connect(&alice, "a1").await;
    again
        .ok("send", json!({"to": bob, "body": "back", "cid": "back"}))
        .await;
}

// ---------------------------------------------------------------------------------------------
// devices per user, connections

/// Opens a socket and says hello as `user`/`device`; returns the client and the reply.
async fn try_hello(b: &TestBroker, user: &str, device: &str) -> (Client, Value) {
    let c = b.open().await;
    let r = c
        .request_frame(json!({"op": "hello", "id": 1, "token": b.token(user), "device": device}))
        .await;
    (c, r)
}

/// Retries a hello until it succeeds (the sequencer drops a closed session shortly after
/// the socket ends), bounded by [`TIMEOUT`].
async fn hello_eventually(b: &TestBroker, user: &str, device: &str) -> Client {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let (c, r) = try_hello(b, user, device).await;
        if r["ok"] == json!(true) {
            return c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "hello still refused: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_past_max_devices_per_user_is_busy_then_closed_1008() {
    let b = TestBroker::start_with(|c| c.limits.max_devices_per_user = 2).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let _a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    // the third distinct device
    let (a3, r) = try_hello(&b, &alice, "a3").await;
    assert_eq!(r["re"], json!(1));
    assert_error(&r, "busy");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_devices_per_user"),
        "{r}"
    );
    assert_eq!(a3.wait_closed().await, Some(1008));
    // the limit is per user: bob is not affected
    let _b1 = b.connect(&bob, "b1").await;
    // the same device reconnecting replaces its socket: not a new device
    let a2b = b.connect(&alice, "a2").await;
    assert_eq!(a2.wait_closed().await, Some(4000));
    // once a device leaves, another may come
    a2b.close().await;
    let a3 = hello_eventually(&b, &alice, "a3").await;
    a3.ok("unread", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hello_past_max_connections_is_unavailable_then_closed_1013() {
    let b = TestBroker::start_with(|c| c.limits.max_connections = 2).await;
    let first = b.connect(&uid("u"), "d").await;
    let _second = b.connect(&uid("u"), "d").await;
    let (third, r) = try_hello(&b, &uid("u"), "d").await;
    assert_error(&r, "unavailable");
    assert_eq!(third.wait_closed().await, Some(1013));
    assert_eq!(b.health().await["connections"], json!(2));
    first.close().await;
    let again = hello_eventually(&b, &uid("u"), "d").await;
    again.ok("unread", json!({})).await;
}

// ---------------------------------------------------------------------------------------------
// room size

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rooms_hold_at_most_max_room_members() {
    let b = TestBroker::start_with(|c| c.limits.max_room_members = 3).await;
    let api = b.http();
    let users: Vec<String> = (0..4).map(|_| uid("m")).collect();
    // one over: refused, and nothing is created
    let too_many = uid("room");
    let r = api
        .post(
            "/v1/rooms",
            json!({"id": too_many, "name": "x", "members": users}),
        )
        .await;
    r.assert_error(400, "bad_request");
    assert!(r.text.contains("max_room_members"), "{}", r.text);
    api.put(&format!("/v1/rooms/{too_many}/members/{}", users[0]))
        .await
        .assert_error(404, "not_found");
    // duplicates count once: three distinct members is the edge and fits
    let room = uid("room");
    let mut three: Vec<&str> = users[..3].iter().map(String::as_str).collect();
    three.push(users[0].as_str());
    let r = api
        .post(
            "/v1/rooms",
            json!({"id": room, "name": "x", "members": three}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    // a fourth: 409, the room unchanged
    let r = api
        .put(&format!("/v1/rooms/{room}/members/{}", users[3]))
        .await;
    r.assert_error(409, "conflict");
    assert!(r.text.contains("max_room_members"), "{}", r.text);
    let c3 = b.connect(&users[3], "d").await;
    c3.err(
        "send",
        json!({"conv": format!("room:{room}"), "body": "x", "cid": "c"}),
        "forbidden",
    )
    .await;
    // a member already in it is not an addition
    let r = api
        .put(&format!("/v1/rooms/{room}/members/{}", users[0]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["changed"], json!(false));
    // one leaves, the fourth fits
    let r = api
        .delete(&format!("/v1/rooms/{room}/members/{}", users[0]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = api
        .put(&format!("/v1/rooms/{room}/members/{}", users[3]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["changed"], json!(true));
}

// ---------------------------------------------------------------------------------------------
// HTTP slowloris guards

/// Reads from `s` until EOF, bounded by `within`; returns what came (None: still open).
async fn read_to_eof(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_head_slower_than_header_timeout_is_cut_off() {
    let b = TestBroker::start_with(|c| c.server.header_timeout_ms = 400).await;
    // in time, though with a pause inside the head: answered
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"Connection: close\r\n\r\n").await.unwrap();
    let answer = read_to_eof(&mut s, TIMEOUT).await.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // a head that never ends: the connection is closed without serving it
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let answer = read_to_eof(&mut s, TIMEOUT)
        .await
        .expect("the connection is still open long after header_timeout_ms");
    assert!(
        !answer.contains("200 OK"),
        "an incomplete head was served: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_body_slower_than_body_timeout_gets_408_and_the_connection_ends() {
    let b = TestBroker::start_with(|c| c.server.body_timeout_ms = 400).await;
    let body = json!({"id": uid("room"), "name": "x", "members": [uid("m")]}).to_string();
    let head = format!(
        "POST /v1/rooms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        b.api_key,
        body.len()
    );
    // slow but in time: created
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&body.as_bytes()[5..]).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(TIMEOUT, s.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");

    // a body that stops half way: 408 `timeout`, then the connection is closed
    let body = json!({"id": uid("room"), "name": "x", "members": []}).to_string();
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    let head = format!(
        "POST /v1/rooms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        b.api_key,
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body.as_bytes()[..5]).await.unwrap();
    let answer = read_to_eof(&mut s, TIMEOUT)
        .await
        .expect("the connection is still open long after body_timeout_ms");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"timeout\""), "{answer}");
    // and nothing was created
    let room: Value = serde_json::from_str(&body).unwrap();
    let r = b
        .http()
        .put(&format!(
            "/v1/rooms/{}/members/{}",
            room["id"].as_str().unwrap(),
            uid("m")
        ))
        .await;
    r.assert_error(404, "not_found");
}
