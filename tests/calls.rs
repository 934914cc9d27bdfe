//! Calls (protocol.md section 6, rules 15-21, 27, 28) against a real broker on real sockets:
//! invite / accept / reject / no answer (ring_ms clamped to 1-300 s), busy invitees and busy
//! initiators, answered elsewhere on a second device, `call.signal` routing before and after
//! the accept (`to_device`, the accepted device, the initiator's inviting device), signal
//! errors and the 32 KiB data limit, media and network events, time limits, leaving,
//! dropping a participant whose last device stays gone, replay of missed call events, call
//! timers after a restart, and the `push.request` for an invitee with no live device.
//!
//! Timing: ring times and limits are 1-3 s; every wait is bounded by the harness; times are
//! compared through the events' own `ts` with loose bounds only.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Fields every `call.invite` event carries.
const INVITE_KEYS: &[&str] = &[
    "ev",
    "off",
    "ts",
    "call",
    "from",
    "device",
    "to",
    "media",
    "ring_ms",
    "time_limit_s",
    "meta",
];
/// Fields every `call.ended` event carries.
const ENDED_KEYS: &[&str] = &["ev", "off", "ts", "call", "reason", "by", "duration_ms"];

/// Sends a message from `sender` to user `to` and waits until `receiver` has it. Pushes are
/// in offset order, so everything due to `receiver` before it has then arrived.
async fn barrier(sender: &Client, to: &str, receiver: &Client) -> Value {
    let cid = uid("barrier");
    sender
        .ok(
            "send",
            json!({"to": to, "body": {"barrier": true}, "cid": cid}),
        )
        .await;
    receiver.next_message(&cid).await
}

/// `call.invite` from `c` with `media: video` plus `extra`; returns the call id.
async fn invite(c: &Client, to: &[&str], extra: Value) -> String {
    let mut fields = json!({"to": to, "media": "video"});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            fields[k] = v;
        }
    }
    let r = c.ok("call.invite", fields).await;
    let call = r["call"].as_str().expect("the invite reply has a call id");
    assert!(call.starts_with("call-"), "call id {call}");
    call.to_string()
}

/// The next `ev` push of this call.
async fn next(c: &Client, ev: &str, call: &str) -> Value {
    c.next_event(ev, |f| f["call"] == call).await
}

async fn next_within(c: &Client, timeout: Duration, ev: &str, call: &str) -> Value {
    c.next_event_within(timeout, ev, |f| f["call"] == call)
        .await
}

/// Every `ev` frame of this call received so far (taken or not).
fn seen(c: &Client, ev: &str, call: &str) -> Vec<Value> {
    c.find(ev)
        .into_iter()
        .filter(|f| f["call"] == call)
        .collect()
}

/// The `ev` frame of this call from the hello's replay, or else the next live one.
async fn replayed_or_next(c: &Client, ev: &str, call: &str, timeout: Duration) -> Value {
    match c.replay.iter().find(|f| f["ev"] == ev && f["call"] == call) {
        Some(f) => f.clone(),
        None => next_within(c, timeout, ev, call).await,
    }
}

fn ts(f: &Value) -> u64 {
    f["ts"]
        .as_u64()
        .unwrap_or_else(|| panic!("no u64 `ts` in {f}"))
}

fn ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("ndjson line {l}: {e}")))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// invite, accept, reject, no answer

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_to_one_call_rings_every_device_and_ends_with_the_duration_since_accept() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let b1 = b.connect(&bob, "b1").await;
    let b2 = b.connect(&bob, "b2").await;
    let meta = json!({"title": "standup", "n": [1, 2]});
    let r = a1
        .ok(
            "call.invite",
            json!({"to": [bob], "media": "video", "meta": meta}),
        )
        .await;
    let call = r["call"].as_str().unwrap().to_string();
    let mut invite_off = 0;
    for dev in [&a1, &a2, &b1, &b2] {
        let e = next(dev, "call.invite", &call).await;
        assert_keys(&e, INVITE_KEYS);
        assert_eq!(e["from"], json!(alice));
        assert_eq!(e["device"], json!("a1"));
        assert_eq!(e["to"], json!([bob]));
        assert_eq!(e["media"], json!("video"));
        assert_eq!(e["ring_ms"], json!(30_000), "the default ring time");
        assert_eq!(e["time_limit_s"], Value::Null);
        assert_eq!(e["meta"], meta);
        invite_off = off(&e);
    }
    assert_eq!(call, format!("call-{invite_off}"));

    b1.ok("call.accept", json!({"call": call})).await;
    let mut accepted = Value::Null;
    for dev in [&a1, &a2, &b1, &b2] {
        let e = next(dev, "call.accepted", &call).await;
        assert_keys(&e, &["ev", "off", "ts", "call", "user", "device"]);
        assert_eq!(e["user"], json!(bob));
        assert_eq!(e["device"], json!("b1"));
        accepted = e;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    a1.ok("call.end", json!({"call": call})).await;
    for dev in [&a1, &a2, &b1, &b2] {
        let e = next(dev, "call.ended", &call).await;
        assert_keys(&e, ENDED_KEYS);
        assert_eq!(e["reason"], json!("hangup"));
        assert_eq!(e["by"], json!(alice));
        let d = e["duration_ms"].as_u64().expect("duration_ms is a u64");
        assert_eq!(
            d,
            ts(&e) - ts(&accepted),
            "duration_ms is the time from the accept to the end"
        );
        assert!((250..10_000).contains(&d), "duration {d} ms");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejecting_the_only_invitee_ends_the_call_as_rejected() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let b2 = b.connect(&bob, "b2").await;
    let call = invite(&a1, &[&bob], json!({"media": "audio"})).await;
    next(&b2, "call.invite", &call).await;
    let r = b2
        .ok("call.reject", json!({"call": call, "reason": "declined"}))
        .await;
    assert_eq!(r["call"], json!(call));
    for dev in [&a1, &b1, &b2] {
        let rej = next(dev, "call.rejected", &call).await;
        assert_eq!(rej["user"], json!(bob));
        assert_eq!(rej["reason"], json!("declined"));
        let end = next(dev, "call.ended", &call).await;
        assert_keys(&end, ENDED_KEYS);
        assert_eq!(end["reason"], json!("rejected"));
        assert_eq!(end["duration_ms"], json!(0));
        assert!(off(&end) > off(&rej));
    }
    b1.err("call.accept", json!({"call": call}), "conflict")
        .await;
    b1.err("call.reject", json!({"call": call}), "conflict")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_call_ends_rejected_only_when_every_invitee_has_rejected() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let c1 = b.connect(&carol, "c1").await;
    let call = invite(&a1, &[&bob, &carol], json!({})).await;
    b1.ok("call.reject", json!({"call": call})).await;
    let rej = next(&a1, "call.rejected", &call).await;
    assert_eq!(rej["user"], json!(bob));
    assert_eq!(rej["reason"], Value::Null);
    let s = barrier(&c1, &alice, &a1).await;
    assert!(
        a1.before(&s).iter().all(|f| f["ev"] != "call.ended"),
        "one of two invitees rejecting does not end the call"
    );
    c1.ok("call.reject", json!({"call": call, "reason": "later"}))
        .await;
    for dev in [&a1, &b1, &c1] {
        let e = next(dev, "call.ended", &call).await;
        assert_eq!(e["reason"], json!("rejected"));
        assert_eq!(e["duration_ms"], json!(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unanswered_call_ends_no_answer_after_ring_ms_and_can_no_longer_be_accepted() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    // 10 ms is below the range: clamped to 1,000 (rule 18).
    let call = invite(&a1, &[&bob], json!({"ring_ms": 10})).await;
    let inv = next(&b1, "call.invite", &call).await;
    assert_eq!(inv["ring_ms"], json!(1000));
    for dev in [&a1, &b1] {
        let e = next(dev, "call.ended", &call).await;
        assert_eq!(e["reason"], json!("no_answer"));
        assert_eq!(e["by"], Value::Null);
        assert_eq!(e["duration_ms"], json!(0));
        let rang = ts(&e) - ts(&inv);
        assert!(
            (1000..4000).contains(&rang),
            "ended {rang} ms after the invite, ring_ms 1000"
        );
    }
    b1.err("call.accept", json!({"call": call}), "conflict")
        .await;
    a1.err("call.end", json!({"call": call}), "conflict").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ring_ms_above_the_range_is_clamped_to_300_seconds() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let call = invite(&a1, &[&bob], json!({"ring_ms": 10_000_000})).await;
    let e = next(&b1, "call.invite", &call).await;
    assert_eq!(e["ring_ms"], json!(300_000));
    a1.ok("call.end", json!({"call": call})).await;
    let e = next(&b1, "call.ended", &call).await;
    assert_eq!(e["reason"], json!("hangup"));
    assert_eq!(e["duration_ms"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invitee_who_never_answers_a_group_call_is_rejected_no_answer_while_the_call_goes_on() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let c1 = b.connect(&carol, "c1").await;
    let call = invite(&a1, &[&bob, &carol], json!({"ring_ms": 1000})).await;
    b1.ok("call.accept", json!({"call": call})).await;
    for dev in [&a1, &b1, &c1] {
        let e = next(dev, "call.rejected", &call).await;
        assert_eq!(e["user"], json!(carol));
        assert_eq!(e["reason"], json!("no_answer"));
    }
    c1.err("call.accept", json!({"call": call}), "conflict")
        .await;
    let s = barrier(&b1, &alice, &a1).await;
    assert!(
        seen(&a1, "call.ended", &call).is_empty(),
        "the call goes on: {:?}",
        a1.before(&s)
    );
    a1.ok("call.network", json!({"call": call, "quality": "ok"}))
        .await;
    b1.ok("call.end", json!({"call": call})).await;
    let e = next(&a1, "call.ended", &call).await;
    assert_eq!(e["by"], json!(bob));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_invite_rings_the_members_but_the_initiator() {
    let b = TestBroker::start().await;
    let (alice, bob, carol, dave) = (uid("alice"), uid("bob"), uid("carol"), uid("dave"));
    let room = b.http().create_room("R", &[&alice, &bob, &carol]).await;
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let c1 = b.connect(&carol, "c1").await;
    let d1 = b.connect(&dave, "d1").await;
    let r = a1
        .ok(
            "call.invite",
            json!({"conv": format!("room:{room}"), "media": "audio"}),
        )
        .await;
    let call = r["call"].as_str().unwrap().to_string();
    let mut want = vec![bob.clone(), carol.clone()];
    want.sort();
    for dev in [&b1, &c1] {
        let e = next(dev, "call.invite", &call).await;
        assert_eq!(e["to"], json!(want));
        assert_eq!(e["media"], json!("audio"));
    }
    d1.err(
        "call.invite",
        json!({"conv": format!("room:{room}"), "media": "audio"}),
        "forbidden",
    )
    .await;
    a1.ok("call.end", json!({"call": call})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_on_unknown_calls_are_not_found_and_an_invite_needs_someone_else() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let a1 = b.connect(&alice, "a1").await;
    for op in ["call.accept", "call.reject", "call.leave", "call.end"] {
        a1.err(op, json!({"call": "call-999999999"}), "not_found")
            .await;
    }
    a1.err(
        "call.signal",
        json!({"call": "call-999999999", "to": "bob", "kind": "offer", "data": {}}),
        "not_found",
    )
    .await;
    a1.err(
        "call.invite",
        json!({"to": [alice], "media": "audio"}),
        "bad_request",
    )
    .await;
    a1.err("call.invite", json!({"media": "audio"}), "bad_request")
        .await;
    a1.err(
        "call.invite",
        json!({"to": ["bob"], "media": "smell"}),
        "bad_request",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// busy

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invitee_in_an_active_call_is_busy_and_is_not_rung() {
    let b = TestBroker::start().await;
    let (alice, bob, carol, dave) = (uid("alice"), uid("bob"), uid("carol"), uid("dave"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let c1 = b.connect(&carol, "c1").await;
    let d1 = b.connect(&dave, "d1").await;
    let first = invite(&c1, &[&bob], json!({})).await;
    b1.ok("call.accept", json!({"call": first})).await;
    next(&c1, "call.accepted", &first).await;

    let second = invite(&a1, &[&bob, &dave], json!({})).await;
    let inv = next(&a1, "call.invite", &second).await;
    let mut both = vec![bob.clone(), dave.clone()];
    both.sort();
    assert_eq!(inv["to"], json!(both), "`to` names every invited user");
    let busy = next(&a1, "call.busy", &second).await;
    assert_keys(&busy, &["ev", "off", "ts", "call", "user"]);
    assert_eq!(busy["user"], json!(bob));
    next(&d1, "call.invite", &second).await;
    let s = barrier(&a1, &bob, &b1).await;
    assert!(
        seen(&b1, "call.invite", &second).is_empty(),
        "a busy invitee is not rung: {:?}",
        b1.before(&s)
    );
    assert!(
        seen(&a1, "call.ended", &second).is_empty(),
        "one free invitee keeps the call ringing"
    );
    // the busy invitee cannot pick it up, nor hang it up
    b1.err("call.accept", json!({"call": second}), "conflict")
        .await;
    b1.err("call.end", json!({"call": second}), "conflict")
        .await;
    d1.ok("call.accept", json!({"call": second})).await;
    next(&a1, "call.accepted", &second).await;
    a1.ok("call.end", json!({"call": second})).await;
    next(&d1, "call.ended", &second).await;
    // and never hears of the call: no accepted, no ended
    let s = barrier(&a1, &bob, &b1).await;
    let heard: Vec<Value> = b1
        .before(&s)
        .into_iter()
        .filter(|f| f["call"] == json!(second))
        .collect();
    assert!(
        heard.is_empty(),
        "a busy invitee got events of the call: {heard:?}"
    );
    c1.ok("call.end", json!({"call": first})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_every_invitee_is_busy_the_call_ends_busy_at_once() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let c1 = b.connect(&carol, "c1").await;
    let first = invite(&c1, &[&bob], json!({})).await;
    b1.ok("call.accept", json!({"call": first})).await;
    next(&c1, "call.accepted", &first).await;

    // the invite itself succeeds (rule 17)
    let second = invite(&a1, &[&bob, &carol], json!({})).await;
    let mut busy: Vec<String> = Vec::new();
    for _ in 0..2 {
        let e = next(&a1, "call.busy", &second).await;
        busy.push(e["user"].as_str().unwrap().to_string());
    }
    busy.sort();
    let mut want = vec![bob.clone(), carol.clone()];
    want.sort();
    assert_eq!(busy, want, "one call.busy per busy invitee");
    let end = next(&a1, "call.ended", &second).await;
    assert_eq!(end["reason"], json!("busy"));
    assert_eq!(end["duration_ms"], json!(0));
    let s = barrier(&a1, &bob, &b1).await;
    assert!(
        seen(&b1, "call.invite", &second).is_empty(),
        "{:?}",
        b1.before(&s)
    );
    // alice is free again: she can call someone else
    let dave = uid("dave");
    let third = invite(&a1, &[&dave], json!({})).await;
    a1.ok("call.end", json!({"call": third})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_initiator_already_in_an_active_call_gets_busy() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let b1 = b.connect(&bob, "b1").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    // ringing is not busy: alice may start a second call while the first rings
    let ringing = invite(&a2, &[&carol], json!({})).await;
    a2.ok("call.end", json!({"call": ringing})).await;

    b1.ok("call.accept", json!({"call": call})).await;
    next(&a1, "call.accepted", &call).await;
    // both sides of an active call are busy, from any device
    for (dev, who) in [(&a2, &carol), (&b1, &carol), (&a1, &bob)] {
        let r = dev
            .err(
                "call.invite",
                json!({"to": [who], "media": "audio"}),
                "busy",
            )
            .await;
        assert!(r["error"]["message"].as_str().unwrap().contains(&call));
    }
    a1.ok("call.end", json!({"call": call})).await;
    next(&a2, "call.ended", &call).await;
    let again = invite(&a2, &[&carol], json!({})).await;
    a2.ok("call.end", json!({"call": again})).await;
}

// ---------------------------------------------------------------------------------------------
// multiple devices

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answering_on_one_device_tells_the_others_and_a_second_accept_conflicts() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let b1 = b.connect(&bob, "b1").await;
    let b2 = b.connect(&bob, "b2").await;
    let b3 = b.connect(&bob, "b3").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    for dev in [&b1, &b2, &b3] {
        next(dev, "call.invite", &call).await;
    }
    b2.ok("call.accept", json!({"call": call})).await;
    // rule 15: the accepting user's other devices get both events
    for dev in [&b1, &b3] {
        let acc = next(dev, "call.accepted", &call).await;
        assert_eq!(acc["device"], json!("b2"));
        let el = next(dev, "call.answered_elsewhere", &call).await;
        assert_keys(&el, &["ev", "off", "ts", "call", "device"]);
        assert_eq!(
            el["device"],
            json!("b2"),
            "rule 27: the device that accepted"
        );
        assert_eq!(el["user"], json!(bob));
        assert!(off(&el) > off(&acc));
    }
    next(&b2, "call.accepted", &call).await;
    let r = b1
        .err("call.accept", json!({"call": call}), "conflict")
        .await;
    assert!(r["error"]["message"].as_str().unwrap().contains("b2"));
    b2.err("call.accept", json!({"call": call}), "conflict")
        .await;
    b3.err("call.reject", json!({"call": call}), "conflict")
        .await;
    let s1 = barrier(&a1, &bob, &b2).await;
    let s2 = barrier(&b1, &alice, &a2).await;
    assert!(
        seen(&b2, "call.answered_elsewhere", &call).is_empty(),
        "the accepting device: {:?}",
        b2.before(&s1)
    );
    for dev in [&a1, &a2] {
        assert!(
            seen(dev, "call.answered_elsewhere", &call).is_empty(),
            "the initiator's devices: {:?}",
            dev.all()
        );
    }
    let _ = s2;
    // the call is not disturbed by the refused accept
    a1.ok("call.end", json!({"call": call})).await;
    let e = next(&b2, "call.ended", &call).await;
    assert_eq!(e["reason"], json!("hangup"));
}

// ---------------------------------------------------------------------------------------------
// signaling

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signals_reach_the_ringing_devices_then_only_the_accepted_device_and_the_inviting_device() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let b1 = b.connect(&bob, "b1").await;
    let b2 = b.connect(&bob, "b2").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    let sig = |to: &str, to_device: Option<&str>, kind: &str, n: u32| {
        let mut f = json!({"call": call, "to": to, "kind": kind, "data": {"n": n}});
        if let Some(d) = to_device {
            f["to_device"] = json!(d);
        }
        f
    };

    // before the accept: every ringing device of the target (rule 28)
    let offer = json!({"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\n"});
    a1.ok(
        "call.signal",
        json!({"call": call, "to": bob, "kind": "offer", "data": offer}),
    )
    .await;
    for dev in [&b1, &b2] {
        let e = next(dev, "call.signal", &call).await;
        assert_keys(
            &e,
            &["ev", "off", "ts", "call", "from", "device", "kind", "data"],
        );
        assert_eq!(e["from"], json!(alice));
        assert_eq!(e["device"], json!("a1"));
        assert_eq!(e["kind"], json!("offer"));
        assert_eq!(e["data"], offer);
        assert_eq!(e["to_device"], Value::Null);
    }
    // to_device narrows it to one
    a1.ok("call.signal", sig(&bob, Some("b2"), "ice", 1)).await;
    let e = next(&b2, "call.signal", &call).await;
    assert_eq!(e["data"], json!({"n": 1}));
    assert_eq!(e["to_device"], json!("b2"));

    // bob accepts on b1
    b1.ok("call.accept", json!({"call": call})).await;
    next(&a1, "call.accepted", &call).await;
    // to bob: only b1 now
    a1.ok("call.signal", sig(&bob, None, "ice", 2)).await;
    let e = next(&b1, "call.signal", &call).await;
    assert_eq!(e["data"], json!({"n": 2}));
    assert_eq!(e["to_device"], json!("b1"));
    // the answer back to alice: only the device that invited (a1), even from a2's view
    b1.ok("call.signal", sig(&alice, None, "answer", 3)).await;
    let e = next(&a1, "call.signal", &call).await;
    assert_eq!(e["data"], json!({"n": 3}));
    assert_eq!(e["from"], json!(bob));
    assert_eq!(e["device"], json!("b1"));
    assert_eq!(e["to_device"], json!("a1"));
    // ice from alice's second device also lands on b1
    a2.ok("call.signal", sig(&bob, None, "ice", 4)).await;
    let e = next(&b1, "call.signal", &call).await;
    assert_eq!(e["data"], json!({"n": 4}));
    assert_eq!(e["device"], json!("a2"));

    // nobody got a signal meant for another device
    barrier(&a1, &bob, &b1).await;
    barrier(&a1, &bob, &b2).await;
    barrier(&b1, &alice, &a1).await;
    barrier(&b1, &alice, &a2).await;
    let data = |c: &Client| -> Vec<Value> {
        seen(c, "call.signal", &call)
            .into_iter()
            .map(|f| f["data"].clone())
            .collect()
    };
    assert_eq!(
        data(&b1),
        vec![offer.clone(), json!({"n": 2}), json!({"n": 4})]
    );
    assert_eq!(data(&b2), vec![offer, json!({"n": 1})]);
    assert_eq!(data(&a1), vec![json!({"n": 3})]);
    assert_eq!(data(&a2), Vec::<Value>::new());
    a1.ok("call.end", json!({"call": call})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_participants_may_signal_and_only_to_participants() {
    let b = TestBroker::start().await;
    let (alice, bob, mallory) = (uid("alice"), uid("bob"), uid("mallory"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let m1 = b.connect(&mallory, "m1").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    m1.err(
        "call.signal",
        json!({"call": call, "to": bob, "kind": "offer", "data": {}}),
        "forbidden",
    )
    .await;
    for op in ["call.accept", "call.reject", "call.leave", "call.end"] {
        m1.err(op, json!({"call": call}), "forbidden").await;
    }
    m1.err(
        "call.media",
        json!({"call": call, "audio": false}),
        "forbidden",
    )
    .await;
    a1.err(
        "call.signal",
        json!({"call": call, "to": mallory, "kind": "offer", "data": {}}),
        "not_found",
    )
    .await;
    let s = barrier(&a1, &mallory, &m1).await;
    assert!(m1.before(&s).iter().all(|f| f["call"] != json!(call)));
    let s = barrier(&a1, &bob, &b1).await;
    assert!(
        seen(&b1, "call.signal", &call).is_empty(),
        "{:?}",
        b1.before(&s)
    );
    a1.ok("call.end", json!({"call": call})).await;
    // after the end even participants cannot signal
    a1.err(
        "call.signal",
        json!({"call": call, "to": bob, "kind": "ice", "data": {}}),
        "conflict",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_data_up_to_32_kib_is_relayed_and_larger_is_too_large() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    // a JSON string is its length plus two quotes
    let fits = "x".repeat(32 * 1024 - 2);
    let over = "x".repeat(32 * 1024 - 1);
    a1.ok(
        "call.signal",
        json!({"call": call, "to": bob, "kind": "offer", "data": fits}),
    )
    .await;
    let e = next(&b1, "call.signal", &call).await;
    assert_eq!(e["data"].as_str().map(str::len), Some(fits.len()));
    let r = a1
        .err(
            "call.signal",
            json!({"call": call, "to": bob, "kind": "offer", "data": over}),
            "too_large",
        )
        .await;
    assert!(!a1.is_closed(), "too_large does not close the socket: {r}");
    let s = barrier(&a1, &bob, &b1).await;
    assert_eq!(
        seen(&b1, "call.signal", &call).len(),
        1,
        "{:?}",
        b1.before(&s)
    );
    a1.ok("call.end", json!({"call": call})).await;
}

// ---------------------------------------------------------------------------------------------
// media, network, time limit

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn media_events_carry_the_full_state_and_unspecified_flags_keep_their_value() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let b1 = b.connect(&bob, "b1").await;
    let b2 = b.connect(&bob, "b2").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    b1.ok("call.accept", json!({"call": call})).await;
    next(&a1, "call.accepted", &call).await;

    let r = a1
        .ok("call.media", json!({"call": call, "audio": false}))
        .await;
    assert_eq!(
        (&r["audio"], &r["video"], &r["hold"], &r["screen"]),
        (&json!(false), &json!(true), &json!(false), &json!(false))
    );
    for dev in [&a1, &a2, &b1, &b2] {
        let e = next(dev, "call.media", &call).await;
        assert_keys(
            &e,
            &[
                "ev", "off", "ts", "call", "user", "audio", "video", "hold", "screen",
            ],
        );
        assert_eq!(e["user"], json!(alice));
        assert_eq!(
            [&e["audio"], &e["video"], &e["hold"], &e["screen"]],
            [&json!(false), &json!(true), &json!(false), &json!(false)],
            "a video call starts with audio and video on: {e}"
        );
    }
    a2.ok("call.media", json!({"call": call, "screen": true}))
        .await;
    let e = next(&b1, "call.media", &call).await;
    assert_eq!(
        [&e["audio"], &e["video"], &e["hold"], &e["screen"]],
        [&json!(false), &json!(true), &json!(false), &json!(true)],
        "audio stays off: {e}"
    );
    // bob's own flags are separate from alice's
    b1.ok("call.media", json!({"call": call, "hold": true}))
        .await;
    let e = a1
        .next_event("call.media", |f| f["call"] == call && f["user"] == bob)
        .await;
    assert_eq!(e["user"], json!(bob));
    assert_eq!(
        [&e["audio"], &e["video"], &e["hold"], &e["screen"]],
        [&json!(true), &json!(true), &json!(true), &json!(false)]
    );
    let r = b1.ok("call.media", json!({"call": call})).await;
    assert_eq!(r["hold"], json!(true), "an empty update changes nothing");
    for _ in 0..2 {
        // bob's hold, then his empty update
        let e = a2
            .next_event("call.media", |f| f["call"] == call && f["user"] == bob)
            .await;
        assert_eq!(e["hold"], json!(true));
    }
    a1.ok("call.end", json!({"call": call})).await;

    // an audio call starts with video off
    let call = invite(&a1, &[&bob], json!({"media": "audio"})).await;
    b2.ok("call.media", json!({"call": call, "screen": true}))
        .await;
    let e = next(&a1, "call.media", &call).await;
    assert_eq!(
        [&e["audio"], &e["video"], &e["hold"], &e["screen"]],
        [&json!(true), &json!(false), &json!(false), &json!(true)]
    );
    a1.ok("call.end", json!({"call": call})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_quality_reaches_every_device_of_every_participant() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let a2 = b.connect(&alice, "a2").await;
    let b1 = b.connect(&bob, "b1").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    b1.ok("call.accept", json!({"call": call})).await;
    b1.ok("call.network", json!({"call": call, "quality": "poor"}))
        .await;
    for dev in [&a1, &a2, &b1] {
        let e = next(dev, "call.network", &call).await;
        assert_keys(&e, &["ev", "off", "ts", "call", "user", "quality"]);
        assert_eq!(e["user"], json!(bob));
        assert_eq!(e["quality"], json!("poor"));
    }
    b1.err(
        "call.network",
        json!({"call": call, "quality": "great"}),
        "bad_request",
    )
    .await;
    a1.ok("call.end", json!({"call": call})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_second_time_limit_warns_at_once_on_accept_then_ends_time_limit() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let call = invite(&a1, &[&bob], json!({"time_limit_s": 1})).await;
    let inv = next(&b1, "call.invite", &call).await;
    assert_eq!(inv["time_limit_s"], json!(1));
    // ringing time does not count
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let s = barrier(&b1, &alice, &a1).await;
    assert!(
        seen(&a1, "call.ended", &call).is_empty(),
        "{:?}",
        a1.before(&s)
    );
    b1.ok("call.accept", json!({"call": call})).await;
    for dev in [&a1, &b1] {
        let acc = next(dev, "call.accepted", &call).await;
        let warn = next(dev, "call.time_warning", &call).await;
        assert_keys(&warn, &["ev", "off", "ts", "call", "remaining_s"]);
        assert_eq!(warn["remaining_s"], json!(1));
        assert!(off(&warn) > off(&acc));
        assert!(ts(&warn) - ts(&acc) < 500, "warned at once on accept");
        let end = next(dev, "call.ended", &call).await;
        assert_eq!(end["reason"], json!("time_limit"));
        assert_eq!(end["by"], Value::Null);
        let d = end["duration_ms"].as_u64().unwrap();
        assert_eq!(d, ts(&end) - ts(&acc));
        assert!((950..4000).contains(&d), "duration {d} ms for a 1 s limit");
    }
    a1.err("call.end", json!({"call": call}), "conflict").await;
    a1.err(
        "call.invite",
        json!({"to": [bob], "media": "audio", "time_limit_s": 0}),
        "bad_request",
    )
    .await;
    a1.err(
        "call.invite",
        json!({"to": [bob], "media": "audio", "time_limit_s": 86_401}),
        "bad_request",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// leaving and dropping

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_three_participants_one_leaving_keeps_the_call_and_the_second_leaving_ends_it() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let c1 = b.connect(&carol, "c1").await;
    let call = invite(&a1, &[&bob, &carol], json!({})).await;
    b1.ok("call.accept", json!({"call": call})).await;
    c1.ok("call.accept", json!({"call": call})).await;
    let acc = next(&a1, "call.accepted", &call).await;
    next(&a1, "call.accepted", &call).await;

    b1.ok("call.leave", json!({"call": call})).await;
    for dev in [&a1, &b1, &c1] {
        let e = next(dev, "call.left", &call).await;
        assert_keys(&e, &["ev", "off", "ts", "call", "user"]);
        assert_eq!(e["user"], json!(bob));
    }
    let s = barrier(&c1, &alice, &a1).await;
    assert!(
        seen(&a1, "call.ended", &call).is_empty(),
        "two remain: {:?}",
        a1.before(&s)
    );
    b1.err("call.leave", json!({"call": call}), "conflict")
        .await;
    // the remaining two still talk
    a1.ok(
        "call.signal",
        json!({"call": call, "to": carol, "kind": "ice", "data": 1}),
    )
    .await;
    next(&c1, "call.signal", &call).await;

    c1.ok("call.leave", json!({"call": call})).await;
    for dev in [&a1, &b1, &c1] {
        let left = next(dev, "call.left", &call).await;
        assert_eq!(left["user"], json!(carol));
        let end = next(dev, "call.ended", &call).await;
        assert_eq!(end["reason"], json!("hangup"));
        assert_eq!(end["by"], json!(carol), "rule 19: by the last to leave");
        assert_eq!(end["duration_ms"].as_u64().unwrap(), ts(&end) - ts(&acc));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participant_whose_only_socket_stays_closed_leaves_and_the_call_ends() {
    let b = TestBroker::start_with(|c| c.calls.drop_after_ms = 300).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    b1.ok("call.accept", json!({"call": call})).await;
    next(&a1, "call.accepted", &call).await;
    b1.close().await;
    let left = next(&a1, "call.left", &call).await;
    assert_eq!(left["user"], json!(bob));
    let end = next(&a1, "call.ended", &call).await;
    assert_eq!(end["reason"], json!("hangup"));
    assert_eq!(end["by"], json!(bob));
    assert!(off(&end) > off(&left));
    // alice is free again
    let call2 = invite(&a1, &[&bob], json!({})).await;
    a1.ok("call.end", json!({"call": call2})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_participant_who_comes_back_within_drop_after_ms_stays_in_the_call() {
    let b = TestBroker::start_with(|c| c.calls.drop_after_ms = 1000).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    b1.ok("call.accept", json!({"call": call})).await;
    let acc = next(&b1, "call.accepted", &call).await;
    b1.close().await;
    drop(b1);
    let b1 = b.connect_since(&bob, "b1", off(&acc)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = barrier(&b1, &alice, &a1).await;
    assert!(
        seen(&a1, "call.left", &call).is_empty(),
        "bob came back in time: {:?}",
        a1.before(&s)
    );
    b1.ok("call.end", json!({"call": call})).await;
    let e = next(&a1, "call.ended", &call).await;
    assert_eq!(e["by"], json!(bob));
}

// ---------------------------------------------------------------------------------------------
// resuming, restarting, push

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_device_gets_what_it_missed_but_never_its_own_answered_elsewhere() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let b2 = b.connect(&bob, "b2").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    let since = off(&next(&b1, "call.invite", &call).await);
    next(&b2, "call.invite", &call).await;
    b1.ok("call.accept", json!({"call": call})).await;
    next(&b2, "call.answered_elsewhere", &call).await;
    // b1 (the answering device) drops mid-negotiation; b2 stays, so bob is not dropped
    b1.close().await;
    drop(b1);
    let offer = json!({"type": "offer", "sdp": "v=0\r\n"});
    a1.ok(
        "call.signal",
        json!({"call": call, "to": bob, "kind": "offer", "data": offer}),
    )
    .await;
    a1.ok(
        "call.signal",
        json!({"call": call, "to": bob, "kind": "ice", "data": {"c": 1}}),
    )
    .await;
    a1.ok("call.media", json!({"call": call, "video": false}))
        .await;
    next(&b2, "call.media", &call).await;

    let b1 = b.connect_since(&bob, "b1", since).await;
    let kinds: Vec<String> = b1
        .replay
        .iter()
        .filter(|f| f["call"] == json!(call))
        .map(|f| {
            let ev = f["ev"].as_str().unwrap();
            match f["kind"].as_str() {
                Some(k) => format!("{ev}:{k}"),
                None => ev.to_string(),
            }
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "call.accepted",
            "call.signal:offer",
            "call.signal:ice",
            "call.media"
        ],
        "the replay of the accepting device: {:?}",
        b1.replay
    );
    let signals: Vec<&Value> = b1
        .replay
        .iter()
        .filter(|f| f["ev"] == "call.signal")
        .collect();
    assert_eq!(signals[0]["data"], offer);
    assert_eq!(signals[1]["data"], json!({"c": 1}));

    // b2's replay from the same point has the answered_elsewhere and none of b1's signals
    let b2r = b.connect_since(&bob, "b2", since).await;
    let evs: Vec<&str> = b2r
        .replay
        .iter()
        .filter(|f| f["call"] == json!(call))
        .map(|f| f["ev"].as_str().unwrap())
        .collect();
    assert_eq!(
        evs,
        ["call.accepted", "call.answered_elsewhere", "call.media"],
        "{:?}",
        b2r.replay
    );
    // the resumed device goes on with the call
    b1.ok(
        "call.signal",
        json!({"call": call, "to": alice, "kind": "answer", "data": {}}),
    )
    .await;
    let e = next(&a1, "call.signal", &call).await;
    assert_eq!(e["kind"], json!("answer"));
    b1.ok("call.end", json!({"call": call})).await;
    next(&a1, "call.ended", &call).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ringing_call_still_ends_no_answer_on_time_after_a_restart() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let call = invite(&a1, &[&bob], json!({"ring_ms": 3000})).await;
    let inv = next(&b1, "call.invite", &call).await;
    drop((a1, b1));
    let b = b.restart().await;
    let a1 = b.connect_since(&alice, "a1", off(&inv)).await;
    let b1 = b.connect_since(&bob, "b1", off(&inv)).await;
    let end = replayed_or_next(&a1, "call.ended", &call, Duration::from_secs(8)).await;
    assert_eq!(end["reason"], json!("no_answer"));
    let rang = ts(&end) - ts(&inv);
    assert!(
        (3000..7000).contains(&rang),
        "ended {rang} ms after the invite, ring_ms 3000"
    );
    replayed_or_next(&b1, "call.ended", &call, TIMEOUT).await;
    b1.err("call.accept", json!({"call": call}), "conflict")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_active_call_survives_a_restart_and_its_duration_counts_from_the_first_accept() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let call = invite(&a1, &[&bob], json!({})).await;
    b1.ok("call.accept", json!({"call": call})).await;
    let acc = next(&a1, "call.accepted", &call).await;
    drop((a1, b1));
    let b = b.restart().await;
    let a1 = b.connect_since(&alice, "a1", off(&acc)).await;
    let b1 = b.connect_since(&bob, "b1", off(&acc)).await;
    // still active: accepting again is refused, alice is still busy
    b1.err("call.accept", json!({"call": call}), "conflict")
        .await;
    a1.err(
        "call.invite",
        json!({"to": [carol], "media": "audio"}),
        "busy",
    )
    .await;
    // routing survived too: signals to bob go to b1, to alice to a1
    a1.ok(
        "call.signal",
        json!({"call": call, "to": bob, "kind": "ice", "data": 1}),
    )
    .await;
    assert_eq!(
        next(&b1, "call.signal", &call).await["to_device"],
        json!("b1")
    );
    a1.ok("call.end", json!({"call": call})).await;
    for dev in [&a1, &b1] {
        let end = next(dev, "call.ended", &call).await;
        assert_eq!(end["reason"], json!("hangup"));
        assert_eq!(end["by"], json!(alice));
        assert_eq!(
            end["duration_ms"].as_u64().unwrap(),
            ts(&end) - ts(&acc),
            "the duration counts from the accept before the restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_time_limit_still_ends_the_call_after_a_restart() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let b1 = b.connect(&bob, "b1").await;
    let call = invite(&a1, &[&bob], json!({"time_limit_s": 3})).await;
    b1.ok("call.accept", json!({"call": call})).await;
    let acc = next(&a1, "call.accepted", &call).await;
    next(&a1, "call.time_warning", &call).await;
    drop((a1, b1));
    let b = b.restart().await;
    let a1 = b.connect_since(&alice, "a1", off(&acc)).await;
    let end = replayed_or_next(&a1, "call.ended", &call, Duration::from_secs(8)).await;
    assert_eq!(end["reason"], json!("time_limit"));
    let d = end["duration_ms"].as_u64().unwrap();
    assert!((2950..7000).contains(&d), "duration {d} ms for a 3 s limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invitee_with_no_live_device_gets_a_push_request_in_the_event_log() {
    let b = TestBroker::start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let a1 = b.connect(&alice, "a1").await;
    let c1 = b.connect(&carol, "c1").await;
    let call = invite(&a1, &[&bob, &carol], json!({"ring_ms": 20_000})).await;
    let inv = next(&a1, "call.invite", &call).await;
    next(&c1, "call.invite", &call).await;
    let r = b
        .http()
        .get(&format!(
            "/v1/events?after={}&types=push.request",
            off(&inv) - 1
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let pushes: Vec<Value> = ndjson(&r.text)
        .into_iter()
        .filter(|e| e["call"] == json!(call))
        .collect();
    assert_eq!(pushes.len(), 1, "only the offline invitee: {pushes:?}");
    let p = &pushes[0];
    assert_eq!(p["ev"], json!("push.request"));
    assert_eq!(p["user"], json!(bob));
    assert_eq!(p["kind"], json!("call"));
    assert_eq!(p["expires_at"].as_u64().unwrap(), ts(&inv) + 20_000);
    assert_eq!(p["to"], json!([]), "a push request is on nobody's socket");
    // and indeed on nobody's socket
    let s = barrier(&c1, &alice, &a1).await;
    assert!(a1.before(&s).iter().all(|f| f["ev"] != "push.request"));
    // bob comes online: he is rung by the replay of his inbox, not pushed
    let b1 = b.connect_since(&bob, "b1", off(&inv) - 1).await;
    assert!(b1.replay.iter().any(|f| f["ev"] == "call.invite"));
    assert!(b1.replay.iter().all(|f| f["ev"] != "push.request"));
    a1.ok("call.end", json!({"call": call})).await;
}
