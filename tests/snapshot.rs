//! Snapshots: State loaded from the newest snapshot plus the log tail equals State rebuilt
//! by replaying the whole log, after a random workload; a corrupt snapshot falls back to an
//! older one or a full replay; a broker restarts on a snapshot and serves the same state.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::json;
use switchboard::log::Store;
use switchboard::snapshot::{self, Loaded};

/// Runs a random but reproducible workload: messages, receipts, rooms, presence, calls.
async fn workload(b: &TestBroker, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let users: Vec<String> = (0..4).map(|i| uid(&format!("u{i}"))).collect();
    let mut clients = Vec::new();
    for u in &users {
        clients.push(b.connect(u, "d1").await);
    }
    let room = uid("room");
    let r = b
        .http()
        .post(
            "/v1/rooms",
            json!({"id": room, "name": "R", "members": [users[0], users[1], users[2]]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    for i in 0..120 {
        let a = rng.gen_range(0..users.len());
        let to = (a + rng.gen_range(1..users.len())) % users.len();
        match rng.gen_range(0..10) {
            0..=4 => {
                clients[a]
                    .ok(
                        "send",
                        json!({"to": users[to], "body": {"i": i}, "cid": format!("c{i}")}),
                    )
                    .await;
            }
            5 if a < 3 => {
                clients[a]
                    .ok(
                        "send",
                        json!({"conv": format!("room:{room}"), "body": i, "cid": format!("r{i}")}),
                    )
                    .await;
            }
            6 => {
                let conv = dm(&users[a], &users[to]);
                clients[a]
                    .ok(
                        "receipt",
                        json!({"conv": conv, "kind": "read", "seq": rng.gen_range(1..5)}),
                    )
                    .await;
            }
            7 => {
                let status = ["away", "busy", "online", "invisible"][rng.gen_range(0..4)];
                clients[a].ok("presence", json!({"status": status})).await;
            }
            8 => {
                let r = clients[a]
                    .request("call.invite", json!({"to": [users[to]], "media": "audio"}))
                    .await;
                if r["ok"] == json!(true) {
                    let call = r["call"].clone();
                    if rng.gen_bool(0.5) {
                        clients[a].ok("call.end", json!({"call": call})).await;
                    }
                }
            }
            _ => {
                b.http()
                    .post(
                        &format!("/v1/users/{}/notices", users[to]),
                        json!({"type": "t", "data": i}),
                    )
                    .await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_from_a_snapshot_and_the_tail_equals_a_full_replay_after_a_random_workload() {
    let mut b = TestBroker::start_with(|c| c.snapshot.every_events = 37).await;
    workload(&b, 7).await;
    let dir = b.cfg.storage.dir.clone();
    b.shutdown().await;
    let store = Store::open(&dir, switchboard::config::Durability::Flush, 5).unwrap();
    let full = switchboard::sequencer::rebuild(&store).unwrap();
    assert!(full.head > 100, "the workload wrote {} events", full.head);
    let (loaded, how) = snapshot::load(&store, &snapshot::dir_of(&dir)).unwrap();
    assert!(matches!(how, Loaded::Snapshot { .. }), "{how:?}");
    assert_eq!(loaded, full, "snapshot at shutdown + tail != full replay");
    // every kept snapshot plus its tail gives the same state too
    let files = snapshot::list(&snapshot::dir_of(&dir));
    assert_eq!(files.len(), 2, "snapshot.keep = 2: {files:?}");
    for f in files {
        let s = snapshot::read(&f).unwrap();
        assert!(s.head <= full.head);
        let (s, _) = snapshot::replay_from(&store, s).unwrap();
        assert_eq!(s, full, "{}", f.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_snapshot_falls_back_and_the_broker_serves_the_same_history() {
    let mut b = TestBroker::start_with(|c| c.snapshot.every_events = 25).await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    for i in 0..60 {
        a.ok(
            "send",
            json!({"to": bob, "body": i, "cid": format!("c{i}")}),
        )
        .await;
    }
    let before = a
        .ok("history", json!({"conv": dm(&alice, &bob), "limit": 200}))
        .await;
    drop(a);
    let dir = b.cfg.storage.dir.clone();
    b.shutdown().await;
    let snaps = snapshot::list(&snapshot::dir_of(&dir));
    let newest = snaps.last().expect("a snapshot was written").clone();
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&newest, bytes).unwrap();
    {
        let store = Store::open(&dir, switchboard::config::Durability::Flush, 5).unwrap();
        assert!(
            snapshot::read(&newest).is_err(),
            "the flipped byte is caught"
        );
        let full = switchboard::sequencer::rebuild(&store).unwrap();
        let (loaded, how) = snapshot::load(&store, &snapshot::dir_of(&dir)).unwrap();
        assert_eq!(loaded, full);
        match how {
            Loaded::Snapshot { off, .. } => assert!(off < full.head, "fell back to an older one"),
            Loaded::Full { replayed } => assert_eq!(replayed, full.head),
        }
        // garbage everywhere: a full replay
        for f in snapshot::list(&snapshot::dir_of(&dir)) {
            std::fs::write(&f, b"not a snapshot").unwrap();
        }
        let (loaded, how) = snapshot::load(&store, &snapshot::dir_of(&dir)).unwrap();
        assert_eq!(
            how,
            Loaded::Full {
                replayed: full.head
            }
        );
        assert_eq!(loaded, full);
    }
    let b = b.restart().await;
    let a = b.connect(&alice, "a1").await;
    let after = a
        .ok("history", json!({"conv": dm(&alice, &bob), "limit": 200}))
        .await;
    assert_eq!(after["messages"], before["messages"]);
    let next = a
        .ok("send", json!({"to": bob, "body": "next", "cid": "next"}))
        .await;
    assert_eq!(next["seq"], json!(61));
}

/// The harness turns `snapshot.cron` off (`test_config`); set, it snapshots on its own: an
/// every-second schedule writes a snapshot file at the head with no explicit request.
#[tokio::test]
async fn snapshots_are_taken_on_their_schedule() {
    let b = TestBroker::start_with(|c| {
        c.snapshot.cron = "* * * * * *".to_string();
        c.snapshot.every_events = 0;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let r = a
        .ok("send", json!({"to": bob, "body": "x", "cid": "c1"}))
        .await;
    let head = off(&r);
    let dir = snapshot::dir_of(&b.cfg.storage.dir);
    let mut newest = None;
    for _ in 0..200 {
        newest = snapshot::list(&dir)
            .last()
            .and_then(|p| snapshot::off_of(p));
        if newest >= Some(head) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        newest >= Some(head),
        "no scheduled snapshot at {head}: {newest:?}"
    );
}
