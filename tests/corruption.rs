//! Corruption (issue 9 item 10): the real binary on real sled files that were altered while
//! it was stopped. Each stored event carries its offset and a crc32; with
//! `storage.check_on_start = "all"` (the default) start-up reads every event before serving.
//!
//! - a flipped bit in an event *before* the snapshot (so the tail replay never reads it):
//!   `check_on_start = "tail"` starts and would serve it (what the check protects against);
//!   the default refuses to start, naming the offset, and `log verify` names the same one;
//! - an event deleted from the middle of the log: start-up refuses naming the missing
//!   offset, `log verify` reports the jump;
//! - a log that ends before its snapshot (events lost after they were acked: a truncated or
//!   rolled-back data file): start-up refuses naming the first missing offset;
//! - the sled data file cut short or with a flipped byte on disk: the broker never serves
//!   an altered history (it refuses to start, or serves exactly the acked history).
//!
//! Every wait is bounded.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// `n` messages alice -> bob with recognisable bodies; returns (alice, bob, acks).
async fn fill(s: &ServerProcess, n: usize) -> (String, String, Vec<Value>) {
    let (a, b) = (uid("alice"), uid("bob"));
    let c = s.ep().connect(&a, "pa").await;
    let frames: Vec<Value> = (0..n)
        .map(|i| json!({"op": "send", "to": b, "body": format!("MARKER-{i:04}-{}", "z".repeat(40)), "cid": format!("c{i}")}))
        .collect();
    let acks = c.pipeline(frames, 16).await;
    assert!(acks.iter().all(|x| x["ok"] == json!(true)), "{acks:?}");
    (a, b, acks)
}

/// SIGTERM and a clean exit (which writes a snapshot at the head).
async fn stop(s: &mut ServerProcess) {
    s.send_sigterm();
    let st = s.wait_exit(Duration::from_secs(20)).await;
    assert!(st.success(), "exit {st}:\n{}", s.log());
}

/// `serve` must exit non-zero by itself; returns what it printed.
async fn serve_refused(s: &ServerProcess, extra: &[(&str, &str)]) -> String {
    let (st, out, err) = run_to_end(s.command(&["serve"], extra), RUN_TIMEOUT).await;
    assert!(
        !st.success(),
        "the broker started on a damaged log:\n{out}{err}"
    );
    format!("{out}{err}")
}

async fn verify(s: &ServerProcess) -> (bool, String) {
    let dir = s.data_dir.display().to_string();
    let (st, out, err) = run_to_end(
        s.command(&["log", "verify", "--dir", &dir], &[]),
        RUN_TIMEOUT,
    )
    .await;
    (st.success(), format!("{out}{err}"))
}

/// Opens the stopped broker's sled database (retrying while the lock is released).
fn open_sled(dir: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if Instant::now() < deadline => {
                eprintln!("sled::open: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("sled::open({}): {e}", dir.display()),
        }
    }
}

fn event_key(off: u64) -> Vec<u8> {
    let mut k = vec![b'e'];
    k.extend_from_slice(&off.to_be_bytes());
    k
}

/// Changes the stored value of event `off` with `f` (through sled, so sled's own checksums
/// stay valid: only the broker's crc32 can notice).
fn alter_event(dir: &Path, off: u64, f: impl FnOnce(&mut Vec<u8>)) {
    let db = open_sled(dir);
    let tree = db.open_tree("log").expect("log tree");
    let key = event_key(off);
    let mut v = tree
        .get(&key)
        .expect("get")
        .unwrap_or_else(|| panic!("event {off} stored"))
        .to_vec();
    f(&mut v);
    tree.insert(&key, v).expect("insert");
    db.flush().expect("flush");
}

fn remove_event(dir: &Path, off: u64) {
    let db = open_sled(dir);
    let tree = db.open_tree("log").expect("log tree");
    assert!(tree.remove(event_key(off)).expect("remove").is_some());
    db.flush().expect("flush");
}

fn snapshots(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".snap"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_before_the_snapshot_stops_start_up_naming_the_offset() {
    let mut s = ServerProcess::new();
    s.start().await;
    let (_, _, acks) = fill(&s, 20).await;
    stop(&mut s).await;
    assert!(!snapshots(&s.data_dir).is_empty(), "a snapshot at shutdown");
    let victim = off(&acks[2]);
    alter_event(&s.data_dir, victim, |v| {
        // one bit of the message body
        let at = v.len() - 10;
        v[at] ^= 0x01;
    });

    // Replaying only the tail after the snapshot never reads the altered event.
    s.extra_env
        .push(("SWITCHBOARD_STORAGE__CHECK_ON_START".into(), "tail".into()));
    s.start().await;
    stop(&mut s).await;
    s.extra_env.pop();

    let out = serve_refused(&s, &[]).await;
    assert!(
        out.contains(&format!("event {victim}: checksum mismatch")) && out.contains("damaged"),
        "the refusal names the offset:\n{out}"
    );
    let (ok, rep) = verify(&s).await;
    assert!(!ok, "verify must fail:\n{rep}");
    assert!(
        rep.lines()
            .any(|l| l.starts_with(&format!("FAULT event {victim}:")) && l.contains("checksum")),
        "{rep}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stored_under_another_offset_is_refused() {
    let mut s = ServerProcess::new();
    s.start().await;
    let (_, _, acks) = fill(&s, 8).await;
    stop(&mut s).await;
    // Event 4's value (valid checksum) copied over event 3: the stored offset disagrees.
    let (three, four) = (off(&acks[2]), off(&acks[3]));
    let db = open_sled(&s.data_dir);
    let tree = db.open_tree("log").expect("log tree");
    let v = tree.get(event_key(four)).expect("get").expect("event");
    tree.insert(event_key(three), v).expect("insert");
    db.flush().expect("flush");
    drop(tree);
    drop(db);

    let out = serve_refused(&s, &[]).await;
    assert!(
        out.contains(&format!("event {three}: record says offset {four}")),
        "{out}"
    );
    let (ok, rep) = verify(&s).await;
    assert!(
        !ok && rep.contains(&format!("FAULT event {three}:")),
        "{rep}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_event_stops_start_up_naming_the_offset() {
    let mut s = ServerProcess::new();
    s.start().await;
    let (_, _, acks) = fill(&s, 10).await;
    stop(&mut s).await;
    let victim = off(&acks[4]);
    remove_event(&s.data_dir, victim);

    let out = serve_refused(&s, &[]).await;
    assert!(
        out.contains(&format!("event {victim}: missing")),
        "the refusal names the offset:\n{out}"
    );
    let (ok, rep) = verify(&s).await;
    assert!(!ok, "{rep}");
    assert!(
        rep.contains(&format!(
            "offsets jump from {} to {}",
            victim - 1,
            victim + 1
        )),
        "{rep}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_ends_before_its_snapshot_is_refused() {
    let mut s = ServerProcess::new();
    s.start().await;
    let (_, _, acks) = fill(&s, 10).await;
    stop(&mut s).await;
    // The last events vanish (as from a data file rolled back to an older copy).
    let head = {
        let db = open_sled(&s.data_dir);
        let tree = db.open_tree("log").expect("log tree");
        let (k, _) = tree
            .range(event_key(0)..=event_key(u64::MAX))
            .next_back()
            .expect("last")
            .expect("read");
        let head = u64::from_be_bytes(k[1..9].try_into().expect("key"));
        drop(tree);
        drop(db);
        head
    };
    let last_ack = off(acks.last().expect("acks"));
    assert!(head >= last_ack);
    for o in (last_ack - 2)..=head {
        remove_event(&s.data_dir, o);
    }

    let out = serve_refused(&s, &[]).await;
    assert!(
        out.contains(&format!("event {}: missing", last_ack - 2)) && out.contains("snapshot"),
        "{out}"
    );
    let (ok, rep) = verify(&s).await;
    assert!(!ok && rep.contains("ahead of the log head"), "{rep}");
}
