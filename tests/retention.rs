//! Retention: compaction moves the floor and deletes what is below it, never past an SQL
//! sink's checkpoint or what the oldest snapshot needs; a `hello` with a `since` below the
//! floor gets `reset: expired`, `/v1/events` below it answers 410; the floor survives a
//! restart; `log compact` returns the freed space to the file system; `retention.cron` runs
//! it on schedule, and `""` turns the schedule off.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use switchboard::retention::Hold;

/// `n` messages from a to b (each acked, so durable); returns the last offset.
async fn chat(a: &Client, b_user: &str, tag: &str, n: usize) -> u64 {
    let mut last = 0;
    for i in 0..n {
        let r = a
            .ok(
                "send",
                json!({"to": b_user, "body": {"t": "x".repeat(200), "i": i}, "cid": format!("{tag}{i}")}),
            )
            .await;
        last = off(&r);
    }
    last
}

fn stats(v: &serde_json::Value) -> (u64, u64) {
    (
        v["floor"].as_u64().expect("floor"),
        v["head"].as_u64().expect("head"),
    )
}

#[tokio::test]
async fn compaction_moves_the_floor_and_a_since_below_it_gets_reset() {
    // max_bytes = 1: the limit asks for everything; only the snapshot it takes holds it.
    let b = TestBroker::start_with(|c| {
        c.retention.max_bytes = 1;
        c.snapshot.every_events = 0;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let head = chat(&a, &bob, "c", 20).await;
    let rep = b.broker().compact().await.expect("compaction runs");
    assert_eq!(rep.wanted, Some(head + 1), "{rep:?}");
    assert_eq!(rep.floor, head + 1, "{rep:?}");
    assert_eq!(rep.deleted, head, "{rep:?}");
    assert_eq!(rep.held, None, "{rep:?}");

    let s = b.http().get("/v1/stats").await.json();
    assert_eq!(stats(&s), (head + 1, head), "{s}");
    // Behind the floor: reset, no replay.
    let old = b.connect_since(&bob, "b1", 3).await;
    assert_eq!(old.hello_reply["reset"], json!(true), "{}", old.hello_reply);
    assert_eq!(old.hello_reply["reason"], json!("expired"));
    assert_eq!(old.hello_reply["resumed"], json!(false));
    assert_eq!(old.find("sync").len(), 1);
    assert!(messages(&old.all(), None).is_empty());
    old.close().await;
    // At the floor - 1 nothing is missing: a normal resume.
    let cur = b.connect_since(&bob, "b2", head).await;
    assert_eq!(
        cur.hello_reply["resumed"],
        json!(true),
        "{}",
        cur.hello_reply
    );
    // The HTTP log below the floor: 410 expired; at floor - 1: 200.
    b.http()
        .get("/v1/events?after=0")
        .await
        .assert_error(410, "expired");
    let r = b.http().get(&format!("/v1/events?after={head}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // History no longer has the deleted messages; sequence numbers go on.
    let h = a.ok("history", json!({"conv": dm(&alice, &bob)})).await;
    assert_eq!(h["messages"], json!([]), "{h}");
    let r = a
        .ok("send", json!({"to": bob, "body": "after", "cid": "after"}))
        .await;
    assert_eq!(seq(&r), 21, "{r}");
    // A cid whose event is gone is free again (dedupe lasts as long as the event).
    let r = a
        .ok("send", json!({"to": bob, "body": "again", "cid": "c0"}))
        .await;
    assert_eq!(r["dup"], json!(false), "{r}");
    drop((a, cur));

    // The floor is durable: a restart serves the same floor and state.
    let b = b.restart().await;
    let s = b.http().get("/v1/stats").await.json();
    assert_eq!(s["floor"], json!(head + 1), "{s}");
    let again = b.connect_since(&bob, "b3", 3).await;
    assert_eq!(again.hello_reply["reason"], json!("expired"));
    let a = b.connect(&alice, "a2").await;
    let r = a
        .ok("send", json!({"to": bob, "body": "later", "cid": "later"}))
        .await;
    assert_eq!(seq(&r), 23, "{r}");
}

#[tokio::test]
async fn max_age_deletes_only_older_events() {
    let b = TestBroker::start_with(|c| {
        // Long enough that the new messages and the compaction fit in it on a loaded
        // machine (at 1 s the parallel test run once aged the new ones out too).
        c.retention.max_age_s = 3;
        c.snapshot.every_events = 0;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let old_head = chat(&a, &bob, "o", 10).await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let first_new = chat(&a, &bob, "n", 1).await;
    chat(&a, &bob, "m", 4).await;
    let rep = b.broker().compact().await.expect("compaction runs");
    assert_eq!(rep.floor, first_new, "{rep:?}");
    assert_eq!(rep.deleted, old_head, "{rep:?}");
    // The five recent messages are all still there.
    let h = a.ok("history", json!({"conv": dm(&alice, &bob)})).await;
    assert_eq!(h["messages"].as_array().map(Vec::len), Some(5), "{h}");
    assert_eq!(h["messages"][0]["seq"], json!(11), "{h}");
    // A second run right away has nothing to do.
    let rep = b.broker().compact().await.expect("compaction runs");
    assert_eq!((rep.wanted, rep.deleted), (None, 0), "{rep:?}");
}

#[tokio::test]
async fn max_bytes_bounds_the_retained_events() {
    // Each message here is about 300 bytes encoded with its indices: keep roughly 30.
    let b = TestBroker::start_with(|c| {
        c.retention.max_bytes = 10_000;
        c.snapshot.every_events = 0;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let head = chat(&a, &bob, "c", 120).await;
    let rep = b.broker().compact().await.expect("compaction runs");
    let kept = head + 1 - rep.floor;
    assert!(rep.floor > 1 && kept > 0, "{rep:?}");
    let per_event = 10_000 / kept;
    assert!(
        (200..2_000).contains(&per_event),
        "kept {kept} events under 10000 bytes: {rep:?}"
    );
    let h = a
        .ok("history", json!({"conv": dm(&alice, &bob), "limit": 200}))
        .await;
    assert_eq!(
        h["messages"].as_array().map(Vec::len),
        Some(kept as usize),
        "{h}"
    );
}

#[tokio::test]
async fn the_oldest_snapshot_holds_the_floor() {
    let b = TestBroker::start_with(|c| {
        c.retention.max_bytes = 1;
        c.snapshot.every_events = 10;
        c.snapshot.keep = 2;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    chat(&a, &bob, "c", 35).await;
    // Snapshots are written in the background: wait for the two newest.
    let dir = switchboard::snapshot::dir_of(&b.cfg.storage.dir);
    let mut oldest = 0;
    for _ in 0..200 {
        if let Some((o, n)) = switchboard::snapshot::range(&dir) {
            if n >= 30 && o >= 20 {
                oldest = o;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        oldest >= 20,
        "snapshots: {:?}",
        switchboard::snapshot::list(&dir)
    );
    let rep = b.broker().compact().await.expect("compaction runs");
    assert_eq!(rep.floor, oldest + 1, "{rep:?}");
    assert_eq!(rep.held, Some(Hold::Snapshot), "{rep:?}");
    assert_eq!(rep.deleted, oldest, "{rep:?}");
}

#[tokio::test]
async fn a_sink_that_never_checkpointed_holds_the_floor() {
    // A PostgreSQL sink whose database is down: its checkpoint is unknown, so nothing moves.
    let b = TestBroker::start_with(|c| {
        c.retention.max_bytes = 1;
        c.snapshot.every_events = 0;
        c.sync.postgres.url =
            "host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=1".into();
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let head = chat(&a, &bob, "c", 5).await;
    let rep = b.broker().compact().await.expect("compaction runs");
    assert_eq!(rep.wanted, Some(head + 1), "{rep:?}");
    assert_eq!(rep.floor, 1, "{rep:?}");
    assert_eq!(rep.held, Some(Hold::Sink("postgres")), "{rep:?}");
    assert_eq!(rep.deleted, 0, "{rep:?}");
    let again = b.connect_since(&bob, "b1", 0).await;
    assert_eq!(
        again.hello_reply["resumed"],
        json!(true),
        "{}",
        again.hello_reply
    );
    assert_eq!(messages(&again.all(), None).len(), 5);
}

const PG_ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3";

/// A client of the local PostgreSQL, or `None` (the test is skipped, unless
/// `SWITCHBOARD_REQUIRE_DB` is set).
async fn pg(test: &str) -> Option<tokio_postgres::Client> {
    match tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            Some(client)
        }
        Err(e) => {
            if std::env::var_os("SWITCHBOARD_REQUIRE_DB").is_some() {
                panic!("{test}: PostgreSQL at 127.0.0.1:5432: {e} (SWITCHBOARD_REQUIRE_DB is set)");
            }
            eprintln!("skipped: {test}: PostgreSQL at 127.0.0.1:5432: {e}");
            None
        }
    }
}

#[tokio::test]
async fn a_postgres_checkpoint_holds_the_floor_until_the_sink_catches_up() {
    let Some(admin) = pg("a_postgres_checkpoint_holds_the_floor_until_the_sink_catches_up").await
    else {
        return;
    };
    let schema = uid("ret").replace('-', "_").to_lowercase();
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .expect("create schema");
    let url = format!(
        "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3 options='-c search_path={schema}'"
    );
    let b = TestBroker::start_with(|c| {
        c.retention.max_bytes = 1;
        c.snapshot.every_events = 0;
        c.sync.postgres.url = url;
        c.sync.batch_ms = 10;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let first = chat(&a, &bob, "c", 10).await;
    // Wait until the sink has everything so far.
    let q = format!("SELECT off FROM {schema}.sync_checkpoint WHERE sink = 'postgres'");
    let mut cp = 0i64;
    for _ in 0..400 {
        if let Ok(rows) = admin.query(q.as_str(), &[]).await {
            if let Some(r) = rows.first() {
                cp = r.get(0);
                if cp as u64 >= first {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(cp as u64, first, "the sink caught up");
    // Hold the sink's checkpoint row: its next batch cannot commit.
    let (mut locker, conn) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls)
        .await
        .expect("second connection");
    tokio::spawn(conn);
    let tx = locker.transaction().await.expect("begin");
    tx.batch_execute(&format!(
        "LOCK TABLE {schema}.sync_checkpoint IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .expect("lock");
    let head = chat(&a, &bob, "d", 10).await;
    let rep = b.broker().compact().await.expect("compaction runs");
    assert_eq!(rep.floor, first + 1, "{rep:?}");
    assert_eq!(rep.held, Some(Hold::Sink("postgres")), "{rep:?}");
    // Released, the sink catches up and the next run goes all the way.
    tx.rollback().await.expect("unlock");
    let mut ok = false;
    for _ in 0..400 {
        let s = b.http().get("/v1/stats").await.json();
        if s["sync"]["postgres"]["checkpoint"] == json!(head) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ok, "the sink caught up after the lock");
    let rep = b.broker().compact().await.expect("compaction runs");
    assert_eq!((rep.floor, rep.held), (head + 1, None), "{rep:?}");
    let _ = admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await;
}

#[tokio::test]
async fn log_compact_returns_the_freed_space_and_the_broker_serves_from_it() {
    let mut b = TestBroker::start_with(|c| {
        c.retention.max_bytes = 1;
        c.snapshot.every_events = 0;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let mut head = 0;
    for round in 0..10 {
        let frames: Vec<_> = (0..200)
            .map(|i| json!({"op": "send", "to": bob, "body": {"t": "y".repeat(1000)}, "cid": format!("p{round}-{i}")}))
            .collect();
        for r in a.pipeline(frames, 64).await {
            assert_eq!(r["ok"], json!(true), "{r}");
            head = head.max(off(&r));
        }
    }
    let rep = b.broker().compact().await.expect("compaction runs");
    assert_eq!((rep.floor, rep.deleted), (head + 1, head), "{rep:?}");
    drop(a);
    b.shutdown().await;
    let dir = b.cfg.storage.dir.clone();
    let report = switchboard::logtool::compact(&dir).expect("log compact");
    let before = report["bytes_before"].as_u64().expect("bytes_before");
    let after = report["bytes_after"].as_u64().expect("bytes_after");
    eprintln!("log compact: {before} -> {after} bytes ({head} events deleted)");
    assert!(after * 2 < before, "{report}");
    let store = switchboard::logtool::open_existing(&dir).expect("open");
    let v =
        switchboard::logtool::verify(&store, Some(&switchboard::snapshot::dir_of(&dir)), |_| {})
            .expect("verify");
    assert!(v.faults.is_empty(), "{:?}", v.faults);
    drop(store);
    let b = b.restart().await;
    let s = b.http().get("/v1/stats").await.json();
    assert_eq!(stats(&s), (head + 1, head), "{s}");
    let a = b.connect(&alice, "a2").await;
    let r = a
        .ok("send", json!({"to": bob, "body": 1, "cid": "z"}))
        .await;
    assert!(off(&r) > head, "{r}");
}

/// The harness turns the schedules off (`test_config`); this is the test that they run when
/// set: `retention.cron` every second compacts with no explicit call, asking for the
/// snapshot it needs on the way.
#[tokio::test]
async fn compaction_runs_on_its_schedule() {
    let b = TestBroker::start_with(|c| {
        c.retention.max_bytes = 1;
        c.retention.cron = "* * * * * *".to_string();
        c.snapshot.every_events = 0;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let head = chat(&a, &bob, "s", 20).await;
    // Bounded: the first tick is at most a second away; allow several.
    let mut floor = 0;
    for _ in 0..200 {
        floor = stats(&b.http().get("/v1/stats").await.json()).0;
        if floor > head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(floor, head + 1, "no scheduled compaction reached the head");
}

/// With `retention.cron = ""` and a limit set, the broker starts and compacts only when
/// asked.
#[tokio::test]
async fn an_empty_retention_cron_compacts_only_when_asked() {
    let b = TestBroker::start_with(|c| {
        c.retention.max_bytes = 1;
        c.retention.cron = String::new();
        c.snapshot.every_events = 0;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let head = chat(&a, &bob, "e", 20).await;
    // Two seconds is two ticks of the every-second schedule the test above uses.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = b.http().get("/v1/stats").await.json();
    assert_eq!(stats(&s).0, 1, "nothing compacted without a schedule: {s}");
    let rep = b.broker().compact().await.expect("compaction runs");
    assert_eq!(rep.floor, head + 1, "{rep:?}");
}
