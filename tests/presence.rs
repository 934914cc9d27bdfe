//! Presence (protocol.md section 5, section 8 presence and contacts, section 10 rules 12-14):
//! online on connect with a device count, the grace period before `offline` (no flap on a
//! quick reconnect, none while another device stays), chosen statuses (away, busy,
//! invisible, kept across devices), the snapshot after hello, who sees whom (contacts from
//! the token or the HTTP API, dm peers, room co-members, never strangers), presence across
//! a broker restart, presence events in a resume replay, and the trusted HTTP view.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Fields every `presence` event carries.
const PRESENCE_KEYS: &[&str] = &["ev", "off", "ts", "user", "status", "devices", "last_seen"];

/// Grace of the restart tests: long enough for a reconnect to land inside it.
const RESTART_GRACE_MS: u64 = 1000;

/// Connects `user` with a `contacts` claim.
async fn connect_c(b: &Endpoint, user: &str, device: &str, contacts: &[&str]) -> Client {
    b.connect_with(user, ConnectOpts::device(device).contacts(contacts))
        .await
}

/// Bob connected first, then alice; each lists the other as a contact. Bob has seen
/// alice come online when this returns.
async fn contacts_pair(b: &Endpoint) -> (String, String, Client, Client) {
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = connect_c(b, &bob, "b1", &[&alice]).await;
    let ac = connect_c(b, &alice, "a1", &[&bob]).await;
    presence(&bc, &alice, "online").await;
    (alice, bob, ac, bc)
}

/// The next `presence` push about `user` with `status`.
async fn presence(c: &Client, user: &str, status: &str) -> Value {
    c.next_event("presence", |e| e["user"] == user && e["status"] == status)
        .await
}

/// The next `presence` push about `user`, whatever its status.
async fn any_presence(c: &Client, user: &str) -> Value {
    c.next_event("presence", |e| e["user"] == user).await
}

/// Takes `user`'s `presence` pushes in arrival order until one satisfies `pred`; returns it.
/// Later pushes stay queued, so the next [`any_presence`] is one that came after it.
async fn until(c: &Client, user: &str, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let e = any_presence(c, user).await;
        if pred(&e) {
            return e;
        }
    }
}

/// `presence` events about `user` among `frames`.
fn presence_of(frames: &[Value], user: &str) -> Vec<Value> {
    frames
        .iter()
        .filter(|f| f["ev"] == "presence" && f["user"] == user)
        .cloned()
        .collect()
}

fn check_presence(e: &Value, user: &str, status: &str, devices: u64) {
    assert_keys(e, PRESENCE_KEYS);
    assert_eq!(e["user"], json!(user), "{e}");
    assert_eq!(e["status"], json!(status), "{e}");
    assert_eq!(e["devices"], json!(devices), "{e}");
    assert!(e["off"].is_u64() && e["ts"].is_u64(), "{e}");
    assert!(
        e["last_seen"].is_null() || e["last_seen"].is_u64(),
        "last_seen is neither null nor unix ms: {e}"
    );
}

/// A notice to `user`, waited for on `c`: every durable push to `c` before it has arrived.
async fn sentinel(b: &Endpoint, user: &str, c: &Client) -> Value {
    let r = b
        .http()
        .post(
            &format!("/v1/users/{user}/notices"),
            json!({"type": "sentinel", "data": uid("s")}),
        )
        .await;
    assert_eq!(r.status, 200, "sentinel notice: {}", r.text);
    c.next_where("notice", "off", r.json()["off"].clone()).await
}

/// The snapshot entry of `user`, if listed.
fn snapshot_entry(c: &Client, user: &str) -> Option<Value> {
    c.snapshot["users"]
        .as_array()
        .unwrap_or_else(|| panic!("snapshot without a users array: {}", c.snapshot))
        .iter()
        .find(|u| u["user"] == user)
        .cloned()
}

/// Polls the HTTP presence of `user` until its status is `status` (bounded).
async fn http_presence_until(b: &Endpoint, user: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_millis(GRACE_MS) + TIMEOUT;
    loop {
        let r = b.http().get(&format!("/v1/users/{user}/presence")).await;
        assert_eq!(r.status, 200, "presence of {user}: {}", r.text);
        let p = r.json();
        if p["status"] == status {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "{user} not {status} over HTTP in time: {p}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// online, devices, offline after the grace

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contact_sees_online_with_the_device_count_when_a_user_connects() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let t0 = now_ms();
    let _a1 = connect_c(&b, &alice, "a1", &[&bob]).await;
    let e = presence(&bc, &alice, "online").await;
    check_presence(&e, &alice, "online", 1);
    let seen = e["last_seen"]
        .as_u64()
        .expect("last_seen is now while online");
    assert!(seen.abs_diff(t0) < 60_000, "last_seen {seen} not near {t0}");
    let _a2 = connect_c(&b, &alice, "a2", &[&bob]).await;
    let e = any_presence(&bc, &alice).await;
    check_presence(&e, &alice, "online", 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn own_devices_receive_their_own_presence_events() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let _bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let a1 = connect_c(&b, &alice, "a1", &[&bob]).await;
    check_presence(&any_presence(&a1, &alice).await, &alice, "online", 1);
    let a2 = connect_c(&b, &alice, "a2", &[&bob]).await;
    for dev in [&a1, &a2] {
        check_presence(&any_presence(dev, &alice).await, &alice, "online", 2);
    }
    a2.ok("presence", json!({"status": "away"})).await;
    for dev in [&a1, &a2] {
        check_presence(&any_presence(dev, &alice).await, &alice, "away", 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_one_of_two_devices_gives_devices_1_and_no_offline() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let a1 = connect_c(&b, &alice, "a1", &[&bob]).await;
    let _a2 = connect_c(&b, &alice, "a2", &[&bob]).await;
    until(&bc, &alice, |e| e["devices"] == 2).await;
    a1.close().await;
    let e = any_presence(&bc, &alice).await;
    check_presence(&e, &alice, "online", 1);
    tokio::time::sleep(Duration::from_millis(2 * GRACE_MS)).await;
    let s = sentinel(&b, &bob, &bc).await;
    let offline: Vec<Value> = presence_of(&bc.before(&s), &alice)
        .into_iter()
        .filter(|e| e["status"] == "offline")
        .collect();
    assert_eq!(
        offline,
        Vec::<Value>::new(),
        "offline while a2 is connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closing_every_device_gives_offline_only_after_the_grace() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let a1 = connect_c(&b, &alice, "a1", &[&bob]).await;
    let a2 = connect_c(&b, &alice, "a2", &[&bob]).await;
    until(&bc, &alice, |e| e["devices"] == 2).await;
    a1.close().await;
    a2.close().await;
    let t0 = Instant::now();
    let e = presence(&bc, &alice, "offline").await;
    let elapsed = t0.elapsed();
    check_presence(&e, &alice, "offline", 0);
    assert!(e["last_seen"].is_u64(), "offline without last_seen: {e}");
    assert!(
        elapsed >= Duration::from_millis(GRACE_MS * 6 / 10),
        "offline {elapsed:?} after the last close: no grace of {GRACE_MS} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_last_seen_is_when_the_last_device_left_not_when_the_grace_ended() {
    let b = TestBroker::start().await;
    let (alice, _bob, a1, bc) = contacts_pair(&b).await;
    let before_close = now_ms();
    a1.close().await;
    let e = presence(&bc, &alice, "offline").await;
    let received = now_ms();
    let seen = e["last_seen"].as_u64().expect("offline carries last_seen");
    assert!(
        seen + 1000 >= before_close,
        "last_seen {seen} long before the close at {before_close}"
    );
    assert!(
        received.saturating_sub(seen) >= GRACE_MS / 2,
        "last_seen {seen} is the end of the grace (event received at {received}), \
         not the moment the device left (~{before_close})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_last_seen_of_an_online_user_is_now() {
    let b = TestBroker::start().await;
    let (alice, bob, _a1, _bc) = contacts_pair(&b).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before_hello = now_ms();
    let b2 = connect_c(&b, &bob, "b2", &[&alice]).await;
    let entry = snapshot_entry(&b2, &alice).expect("alice listed");
    assert_eq!(entry["status"], json!("online"), "{entry}");
    let seen = entry["last_seen"].as_u64().expect("last_seen while online");
    assert!(
        seen + 500 >= before_hello,
        "rule 13: last_seen is now while online; snapshot at ~{before_hello} says {seen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnect_inside_the_grace_causes_no_offline_event() {
    let b = TestBroker::start().await;
    let (alice, bob, a1, bc) = contacts_pair(&b).await;
    a1.close().await;
    let _a1 = connect_c(&b, &alice, "a1", &[&bob]).await;
    tokio::time::sleep(Duration::from_millis(2 * GRACE_MS)).await;
    let s = sentinel(&b, &bob, &bc).await;
    let flaps: Vec<Value> = presence_of(&bc.before(&s), &alice)
        .into_iter()
        .filter(|e| e["status"] == "offline")
        .collect();
    assert_eq!(flaps, Vec::<Value>::new(), "a quick reconnect flapped");
}

// ---------------------------------------------------------------------------------------------
// chosen status

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn away_busy_and_back_online_are_seen_by_a_contact() {
    let b = TestBroker::start().await;
    let (alice, _bob, a1, bc) = contacts_pair(&b).await;
    for status in ["away", "busy", "online"] {
        a1.ok("presence", json!({"status": status})).await;
        let e = any_presence(&bc, &alice).await;
        check_presence(&e, &alice, status, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invisible_looks_offline_to_contacts_and_true_to_the_users_other_devices() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let a1 = connect_c(&b, &alice, "a1", &[&bob]).await;
    let a2 = connect_c(&b, &alice, "a2", &[&bob]).await;
    until(&bc, &alice, |e| e["devices"] == 2).await;
    until(&a2, &alice, |e| e["devices"] == 2).await;

    a1.ok("presence", json!({"status": "invisible"})).await;
    let e = any_presence(&bc, &alice).await;
    check_presence(&e, &alice, "offline", 0);
    let own = any_presence(&a2, &alice).await;
    check_presence(&own, &alice, "invisible", 2);
    assert_eq!(own["scope"], json!("self"), "{own}");

    // a new observer sees offline too
    let b2 = connect_c(&b, &bob, "b2", &[&alice]).await;
    let entry = snapshot_entry(&b2, &alice).expect("a contact is listed in the snapshot");
    assert_eq!(entry["status"], json!("offline"), "{entry}");
    assert_eq!(entry["devices"], json!(0), "{entry}");

    // nothing more leaks while invisible: a device leaving changes only the own view
    a2.close().await;
    let own = until(&a1, &alice, |e| {
        e["status"] == "invisible" && e["devices"] == 1
    })
    .await;
    check_presence(&own, &alice, "invisible", 1);
    assert_eq!(own["scope"], json!("self"), "{own}");
    let s = sentinel(&b, &bob, &bc).await;
    let since_invisible: Vec<Value> = bc.after(&e).into_iter().take_while(|f| f != &s).collect();
    let leaked = presence_of(&since_invisible, &alice);
    assert_eq!(leaked, Vec::<Value>::new(), "invisible leaked a status");
    for f in presence_of(&bc.all(), &alice) {
        assert_ne!(f["status"], json!("invisible"), "invisible leaked: {f}");
    }

    // visible again: the contact sees online with the real device count
    a1.ok("presence", json!({"status": "online"})).await;
    check_presence(&any_presence(&bc, &alice).await, &alice, "online", 1);
    let own = any_presence(&a1, &alice).await;
    check_presence(&own, &alice, "online", 1);
    assert_ne!(own["scope"], json!("self"), "views agree again: {own}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chosen_status_is_kept_when_a_second_device_connects() {
    let b = TestBroker::start().await;
    let (alice, bob, a1, bc) = contacts_pair(&b).await;
    a1.ok("presence", json!({"status": "away"})).await;
    presence(&bc, &alice, "away").await;
    let a2 = connect_c(&b, &alice, "a2", &[&bob]).await;
    let e = any_presence(&bc, &alice).await;
    check_presence(&e, &alice, "away", 2);
    let own = until(&a2, &alice, |e| e["devices"] == 2).await;
    check_presence(&own, &alice, "away", 2);
    let s = sentinel(&b, &bob, &bc).await;
    let seen = presence_of(&bc.before(&s), &alice);
    assert_eq!(
        seen.last().map(|e| e["status"].clone()),
        Some(json!("away")),
        "{seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// snapshot

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_after_hello_lists_visible_users_with_status_devices_and_last_seen() {
    let b = TestBroker::start().await;
    let (alice, bob, carol, dave, erin) = (
        uid("alice"),
        uid("bob"),
        uid("carol"),
        uid("dave"),
        uid("erin"),
    );
    // alice: online on two devices, away
    let a1 = connect_c(&b, &alice, "a1", &[&bob]).await;
    let _a2 = connect_c(&b, &alice, "a2", &[&bob]).await;
    a1.ok("presence", json!({"status": "away"})).await;
    // carol: was online, now offline
    let c1 = connect_c(&b, &carol, "c1", &[&bob]).await;
    c1.close().await;
    http_presence_until(&b, &carol, "offline").await;
    // dave: online, a stranger to bob
    let _d1 = b.connect(&dave, "d1").await;

    let bc = connect_c(&b, &bob, "b1", &[&alice, &carol, &erin]).await;
    let a = snapshot_entry(&bc, &alice).expect("alice listed");
    assert_keys(&a, &["user", "status", "devices", "last_seen"]);
    assert_eq!(a["status"], json!("away"), "{a}");
    assert_eq!(a["devices"], json!(2), "{a}");
    assert!(a["last_seen"].is_u64(), "{a}");
    let c = snapshot_entry(&bc, &carol).expect("offline contacts are listed too");
    assert_eq!(c["status"], json!("offline"), "{c}");
    assert_eq!(c["devices"], json!(0), "{c}");
    assert!(c["last_seen"].is_u64(), "carol was connected once: {c}");
    let e = snapshot_entry(&bc, &erin).expect("a contact never seen is listed");
    assert_eq!(e["status"], json!("offline"), "{e}");
    assert_eq!(e["devices"], json!(0), "{e}");
    assert_eq!(e["last_seen"], json!(null), "{e}");
    assert_eq!(
        snapshot_entry(&bc, &dave),
        None,
        "a stranger in the snapshot"
    );
    assert_eq!(
        snapshot_entry(&bc, &bob),
        None,
        "the user itself in the snapshot"
    );
}

// ---------------------------------------------------------------------------------------------
// audience

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contacts_set_over_http_see_presence_both_ways() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    // one-sided: alice lists bob; rule 12 makes it symmetric
    let r = b
        .http()
        .put_json(
            &format!("/v1/users/{alice}/contacts"),
            json!({"contacts": [bob]}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let bc = b.connect(&bob, "b1").await;
    assert!(snapshot_entry(&bc, &alice).is_some(), "{}", bc.snapshot);
    let ac = b.connect(&alice, "a1").await;
    let e = presence(&bc, &alice, "online").await;
    check_presence(&e, &alice, "online", 1);
    let entry = snapshot_entry(&ac, &bob).expect("bob in alice's snapshot");
    assert_eq!(entry["status"], json!("online"), "{entry}");
    assert_eq!(entry["devices"], json!(1), "{entry}");
    ac.close().await;
    check_presence(
        &presence(&bc, &alice, "offline").await,
        &alice,
        "offline",
        0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dm_peers_see_each_others_presence() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let ac = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    ac.ok("send", json!({"to": bob, "body": "hi", "cid": "c1"}))
        .await;
    ac.close().await;
    check_presence(
        &presence(&bc, &alice, "offline").await,
        &alice,
        "offline",
        0,
    );
    let ac = b.connect(&alice, "a1").await;
    check_presence(&presence(&bc, &alice, "online").await, &alice, "online", 1);
    let entry = snapshot_entry(&ac, &bob).expect("the dm peer in the snapshot");
    assert_eq!(entry["status"], json!("online"), "{entry}");
    bc.ok("presence", json!({"status": "busy"})).await;
    check_presence(&presence(&ac, &bob, "busy").await, &bob, "busy", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_co_members_see_presence_including_members_added_later() {
    let b = TestBroker::start().await;
    let (alice, bob, carol, dave) = (uid("alice"), uid("bob"), uid("carol"), uid("dave"));
    let room = b.http().create_room("R", &[&alice, &bob, &carol]).await;
    let bc = b.connect(&bob, "b1").await;
    let cc = b.connect(&carol, "c1").await;
    let ac = b.connect(&alice, "a1").await;
    for dev in [&bc, &cc] {
        check_presence(&presence(dev, &alice, "online").await, &alice, "online", 1);
    }
    let dc = b.connect(&dave, "d1").await;
    let r = b
        .http()
        .put(&format!("/v1/rooms/{room}/members/{dave}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    dc.next_where("room.member", "user", dave.as_str()).await;
    ac.ok("presence", json!({"status": "away"})).await;
    for dev in [&bc, &cc, &dc] {
        check_presence(&presence(dev, &alice, "away").await, &alice, "away", 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_sided_contacts_claim_lets_both_users_see_each_other() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    // only bob's token lists alice
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let ac = b.connect(&alice, "a1").await;
    check_presence(&presence(&bc, &alice, "online").await, &alice, "online", 1);
    let entry = snapshot_entry(&ac, &bob).expect("bob in alice's snapshot");
    assert_eq!(entry["status"], json!("online"), "{entry}");
    bc.ok("presence", json!({"status": "away"})).await;
    check_presence(&presence(&ac, &bob, "away").await, &bob, "away", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stranger_sees_neither_presence_events_nor_snapshot_entries() {
    let b = TestBroker::start().await;
    let carol = uid("carol");
    let cc = b.connect(&carol, "c1").await;
    let (alice, bob, a1, bc) = contacts_pair(&b).await;
    a1.ok("presence", json!({"status": "away"})).await;
    presence(&bc, &alice, "away").await;
    let a2 = connect_c(&b, &alice, "a2", &[&bob]).await;
    a2.close().await;
    a1.close().await;
    presence(&bc, &alice, "offline").await;
    let s = sentinel(&b, &carol, &cc).await;
    for user in [&alice, &bob] {
        assert_eq!(
            presence_of(&cc.before(&s), user),
            Vec::<Value>::new(),
            "a stranger got {user}'s presence"
        );
        assert_eq!(snapshot_entry(&cc, user), None, "{}", cc.snapshot);
    }
    let cc2 = b.connect(&carol, "c2").await;
    for user in [&alice, &bob] {
        assert_eq!(snapshot_entry(&cc2, user), None, "{}", cc2.snapshot);
    }
}

// ---------------------------------------------------------------------------------------------
// restart and durability

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_restart_a_user_who_does_not_come_back_goes_offline_after_the_grace() {
    let b = TestBroker::start_with(|c| c.presence.grace_ms = RESTART_GRACE_MS).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let ac = connect_c(&b, &alice, "a1", &[&bob]).await;
    presence(&bc, &alice, "online").await;
    let b = b.restart().await;
    let t0 = Instant::now();
    drop((ac, bc));
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let entry = snapshot_entry(&bc, &alice).expect("alice in bob's snapshot");
    assert_eq!(
        entry["status"],
        json!("online"),
        "alice was online at shutdown and the grace has not passed: {entry}"
    );
    assert_eq!(entry["devices"], json!(1), "{entry}");
    let e = bc
        .next_event_within(
            Duration::from_millis(RESTART_GRACE_MS) + TIMEOUT,
            "presence",
            |e| e["user"] == alice && e["status"] == "offline",
        )
        .await;
    check_presence(&e, &alice, "offline", 0);
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_millis(RESTART_GRACE_MS * 6 / 10),
        "offline {elapsed:?} after the restart: no grace of {RESTART_GRACE_MS} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_restart_a_user_who_reconnects_inside_the_grace_never_goes_offline() {
    let b = TestBroker::start_with(|c| c.presence.grace_ms = RESTART_GRACE_MS).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let ac = connect_c(&b, &alice, "a1", &[&bob]).await;
    presence(&bc, &alice, "online").await;
    let b = b.restart().await;
    drop((ac, bc));
    let _ac = connect_c(&b, &alice, "a1", &[&bob]).await;
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let entry = snapshot_entry(&bc, &alice).expect("alice in bob's snapshot");
    assert_eq!(entry["status"], json!("online"), "{entry}");
    tokio::time::sleep(Duration::from_millis(2 * RESTART_GRACE_MS)).await;
    let s = sentinel(&b, &bob, &bc).await;
    let flaps: Vec<Value> = presence_of(&bc.before(&s), &alice)
        .into_iter()
        .filter(|e| e["status"] == "offline")
        .collect();
    assert_eq!(flaps, Vec::<Value>::new(), "offline despite the reconnect");
    let p = b.http().get(&format!("/v1/users/{alice}/presence")).await;
    assert_eq!(p.json()["status"], json!("online"), "{}", p.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chosen_status_survives_a_restart_and_a_reconnect_inside_the_grace() {
    let b = TestBroker::start_with(|c| c.presence.grace_ms = RESTART_GRACE_MS).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let ac = connect_c(&b, &alice, "a1", &[&bob]).await;
    ac.ok("presence", json!({"status": "away"})).await;
    presence(&bc, &alice, "away").await;
    let b = b.restart().await;
    drop((ac, bc));
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let entry = snapshot_entry(&bc, &alice).expect("alice in bob's snapshot");
    assert_eq!(entry["status"], json!("away"), "{entry}");
    let _ac = connect_c(&b, &alice, "a1", &[&bob]).await;
    tokio::time::sleep(Duration::from_millis(2 * RESTART_GRACE_MS)).await;
    let s = sentinel(&b, &bob, &bc).await;
    let changed: Vec<Value> = presence_of(&bc.before(&s), &alice)
        .into_iter()
        .filter(|e| e["status"] != "away")
        .collect();
    assert_eq!(changed, Vec::<Value>::new(), "the chosen status was lost");
    let p = b.http().get(&format!("/v1/users/{alice}/presence")).await;
    assert_eq!(p.json()["status"], json!("away"), "{}", p.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_events_are_durable_and_replayed_to_a_contact_resuming_with_since() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let bc = connect_c(&b, &bob, "b1", &[&alice]).await;
    let since = bc.hello_reply["head"].as_u64().expect("head");
    bc.close().await;
    let ac = connect_c(&b, &alice, "a1", &[&bob]).await;
    ac.ok("presence", json!({"status": "away"})).await;

    let bc = b
        .connect_with(
            &bob,
            ConnectOpts::device("b1")
                .since(since)
                .contacts(&[alice.as_str()]),
        )
        .await;
    assert_eq!(bc.hello_reply["resumed"], json!(true), "{}", bc.hello_reply);
    let replayed = presence_of(&bc.replay, &alice);
    let statuses: Vec<&Value> = replayed.iter().map(|e| &e["status"]).collect();
    assert_eq!(
        statuses,
        [&json!("online"), &json!("away")],
        "replay: {replayed:?}"
    );
    check_presence(&replayed[0], &alice, "online", 1);
    check_presence(&replayed[1], &alice, "away", 1);
    assert!(off(&replayed[0]) > since && off(&replayed[1]) > off(&replayed[0]));
    // in the log, addressed to bob
    let r = b
        .http()
        .get(&format!(
            "/v1/events?after={since}&types=presence&limit=1000"
        ))
        .await;
    let logged: Vec<Value> = r
        .text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("NDJSON"))
        .filter(|e| e["user"] == alice)
        .collect();
    assert_eq!(logged.len(), 2, "{}", r.text);
    for e in &logged {
        let to = e["to"].as_array().expect("to");
        assert!(to.contains(&json!(bob)), "{e}");
    }
    // not delivered a second time live
    let s = sentinel(&b, &bob, &bc).await;
    assert_eq!(
        presence_of(&bc.before(&s), &alice).len(),
        2,
        "{:?}",
        presence_of(&bc.before(&s), &alice)
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP view

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_presence_shows_the_true_status_and_devices_with_platforms() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let a1 = b
        .connect_with(&alice, ConnectOpts::device("a1").platform("web"))
        .await;
    let a2 = b
        .connect_with(&alice, ConnectOpts::device("a2").platform("android"))
        .await;
    a1.ok("presence", json!({"status": "invisible"})).await;
    let r = b.http().get(&format!("/v1/users/{alice}/presence")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let p = r.json();
    assert_keys(&p, &["user", "status", "devices", "last_seen"]);
    assert_eq!(p["user"], json!(alice));
    assert_eq!(
        p["status"],
        json!("invisible"),
        "HTTP shows the true status: {p}"
    );
    let mut devs: Vec<(String, String)> = p["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("devices is not a list: {p}"))
        .iter()
        .map(|d| {
            (
                d["device"].as_str().unwrap_or_default().to_string(),
                d["platform"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    devs.sort();
    assert_eq!(
        devs,
        [
            ("a1".to_string(), "web".to_string()),
            ("a2".to_string(), "android".to_string())
        ]
    );
    assert!(p["last_seen"].is_u64(), "{p}");

    a1.close().await;
    a2.close().await;
    let p = http_presence_until(&b, &alice, "offline").await;
    assert_eq!(p["devices"], json!([]), "{p}");
    assert!(p["last_seen"].is_u64(), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_presence_of_a_user_never_seen_is_offline_with_no_devices_and_null_last_seen() {
    let b = TestBroker::start().await;
    let ghost = uid("ghost");
    let r = b.http().get(&format!("/v1/users/{ghost}/presence")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let p = r.json();
    assert_eq!(p["status"], json!("offline"), "{p}");
    assert_eq!(p["devices"], json!([]), "{p}");
    assert_eq!(p["last_seen"], json!(null), "{p}");
    assert!(
        p.get("last_seen").is_some(),
        "last_seen must be present: {p}"
    );
}
