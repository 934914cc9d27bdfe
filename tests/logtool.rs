//! `switchboard log`: the real binary on data directories filled through a real broker.
//!
//! - stats / dump / tail / verify on a stopped broker's directory;
//! - verify fails (non-zero, naming the fault) after an inbox index entry is deleted and
//!   after a byte of an event is flipped;
//! - a backup taken through the API while a client sends restores into a new directory
//!   where a broker serves the same history up to the backup's head;
//! - on a running broker's directory the offline tools refuse with "use --url", while
//!   `stats`, `tail` and `tail -f` work through the API.
//!
//! Every wait is bounded; nothing asserts on wall-clock durations.

mod common;

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bin, dm, run_to_end, test_config, uid, TestBroker};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const RUNNING: &str = "the broker is running; use --url";

/// `switchboard <args>` with a clean environment.
fn command(args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.args(args).env_clear().env("NO_COLOR", "1");
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", path);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn log(args: &[&str]) -> (ExitStatus, String, String) {
    let mut all = vec!["log"];
    all.extend_from_slice(args);
    run_to_end(command(&all), RUN_TIMEOUT).await
}

/// Like [`log`], retrying for a few seconds while an in-process broker that was just shut
/// down (or a test's sled handle) still holds the directory.
async fn log_stopped(args: &[&str]) -> (ExitStatus, String, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = log(args).await;
        if r.0.success() || !r.2.contains(RUNNING) || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens the sled database at `dir`, retrying while the lock is still held.
async fn open_sled(dir: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if Instant::now() < deadline => {
                eprintln!("sled::open({}): {e}; retrying", dir.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("sled::open({}): {e}", dir.display()),
        }
    }
}

fn ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn offs(events: &[Value]) -> Vec<u64> {
    events.iter().map(common::off).collect()
}

fn data_dir(tb: &TestBroker) -> PathBuf {
    tb.cfg.storage.dir.clone()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Messages (`n` direct ones with cids, one receipt, one room message, one notice).
/// Returns (alice, bob, messages written).
async fn fill(tb: &TestBroker, n: usize) -> (String, String, u64) {
    let (a, b) = (uid("alice"), uid("bob"));
    let ca = tb.connect(&a, "pa").await;
    let cb = tb.connect(&b, "pb").await;
    for i in 0..n {
        ca.ok(
            "send",
            json!({"to": b, "body": {"i": i}, "cid": format!("c{i}")}),
        )
        .await;
    }
    cb.ok(
        "receipt",
        json!({"conv": dm(&a, &b), "kind": "read", "seq": 2}),
    )
    .await;
    let http = tb.http();
    let room = http.create_room("ops", &[&a, &b]).await;
    let r = http
        .post(
            &format!("/v1/rooms/{room}/messages"),
            json!({"from": a, "body": "hello room", "cid": "r1"}),
        )
        .await;
    assert!(r.is_success(), "publish: {}", r.text);
    let r = http
        .post(
            &format!("/v1/users/{b}/notices"),
            json!({"type": "t", "data": 1}),
        )
        .await;
    assert!(r.is_success(), "notice: {}", r.text);
    (a, b, n as u64 + 1)
}

#[tokio::test]
async fn stats_dump_tail_and_verify_on_a_stopped_broker() {
    let mut tb = TestBroker::start().await;
    let (_a, b, messages) = fill(&tb, 12).await;
    tb.shutdown().await;
    let dir = s(&data_dir(&tb));

    let (st, out, err) = log_stopped(&["stats", "--dir", &dir, "--json"]).await;
    assert!(st.success(), "stats: {err}");
    let stats: Value = serde_json::from_str(&out).expect("stats JSON");
    let head = stats["head"].as_u64().expect("head");
    assert_eq!(stats["floor"], json!(1), "{stats}");
    assert_eq!(stats["events"], json!(head), "{stats}");
    assert_eq!(stats["by_type"]["message"], json!(messages), "{stats}");
    assert_eq!(stats["by_type"]["receipt"], json!(1), "{stats}");
    assert_eq!(stats["by_type"]["notice"], json!(1), "{stats}");
    assert_eq!(stats["index"]["conv_seq"], json!(messages), "{stats}");
    assert_eq!(stats["index"]["dedupe"], json!(messages), "{stats}");
    assert!(stats["index"]["inbox"].as_u64().unwrap() >= 2 * messages);
    assert!(stats["bytes_on_disk"].as_u64().unwrap() > 0);

    let (st, out, err) = log_stopped(&["stats", "--dir", &dir]).await;
    assert!(st.success(), "stats table: {err}");
    assert!(out.contains("head") && out.contains("message"), "{out}");

    // dump: the whole log, a range, a type filter.
    let (st, out, err) = log_stopped(&["dump", "--dir", &dir]).await;
    assert!(st.success(), "dump: {err}");
    let all = ndjson(&out);
    assert_eq!(offs(&all), (1..=head).collect::<Vec<_>>());
    let (_, out, _) = log_stopped(&["dump", "--dir", &dir, "--from", "2", "--to", "4"]).await;
    assert_eq!(offs(&ndjson(&out)), vec![2, 3, 4]);
    let (_, out, _) = log_stopped(&["dump", "--dir", &dir, "--type", "message,notice"]).await;
    let typed = ndjson(&out);
    assert_eq!(typed.len() as u64, messages + 1);
    assert!(typed
        .iter()
        .all(|e| e["ev"] == "message" || e["ev"] == "notice"));
    let notice = typed.iter().find(|e| e["ev"] == "notice").expect("notice");
    assert_eq!(notice["to"], json!([b]), "the audience is in the dump");
    let first = typed.iter().find(|e| e["cid"] == "c0").expect("c0");
    for k in [
        "ev", "off", "ts", "conv", "seq", "from", "device", "cid", "body", "to",
    ] {
        assert!(first.get(k).is_some(), "missing {k} in {first}");
    }

    // tail: the last N, and -f on a stopped broker prints and exits.
    for extra in [&[][..], &["-f"][..]] {
        let mut args = vec!["tail", "--dir", &dir, "-n", "3"];
        args.extend_from_slice(extra);
        let (st, out, err) = log_stopped(&args).await;
        assert!(st.success(), "tail {extra:?}: {err}");
        let tail = ndjson(&out);
        assert_eq!(offs(&tail), vec![head - 2, head - 1, head]);
        assert_eq!(tail, all[all.len() - 3..].to_vec());
    }

    let (st, out, err) = log_stopped(&["verify", "--dir", &dir]).await;
    assert!(st.success(), "verify of a good log: {out}\n{err}");
    assert!(
        out.contains("ok:") && out.contains("State rebuilt"),
        "{out}"
    );
}

#[tokio::test]
async fn verify_names_a_deleted_inbox_entry() {
    let mut tb = TestBroker::start().await;
    fill(&tb, 5).await;
    tb.shutdown().await;
    let dir = data_dir(&tb);
    let (st, out, err) = log_stopped(&["verify", "--dir", &s(&dir)]).await;
    assert!(st.success(), "verify before the damage: {out}\n{err}");

    let (user, off) = {
        let db = open_sled(&dir).await;
        let tree = db.open_tree("log").expect("log tree");
        let (k, _) = tree
            .scan_prefix([b'i'])
            .next()
            .expect("an inbox entry")
            .expect("read inbox entry");
        let len = u16::from_be_bytes([k[1], k[2]]) as usize;
        let user = String::from_utf8(k[3..3 + len].to_vec()).expect("utf8 user");
        let off = u64::from_be_bytes(k[3 + len..].try_into().expect("8 bytes"));
        tree.remove(&k).expect("remove");
        db.flush().expect("flush");
        (user, off)
    };

    let (st, out, err) = log_stopped(&["verify", "--dir", &s(&dir)]).await;
    assert!(!st.success(), "verify must fail: {out}");
    assert!(err.contains("fault"), "{err}");
    let fault = out
        .lines()
        .find(|l| l.starts_with("FAULT"))
        .unwrap_or_else(|| panic!("no FAULT line: {out}"));
    assert!(
        fault.contains("inbox") && fault.contains(&user) && fault.contains(&format!("event {off}")),
        "the fault names the entry ({user}, {off}): {out}"
    );
}

#[tokio::test]
async fn verify_catches_a_flipped_byte_in_an_event() {
    let mut tb = TestBroker::start().await;
    fill(&tb, 3).await;
    tb.shutdown().await;
    let dir = data_dir(&tb);
    {
        let db = open_sled(&dir).await;
        let tree = db.open_tree("log").expect("log tree");
        let mut key = vec![b'e'];
        key.extend_from_slice(&2u64.to_be_bytes());
        let mut v = tree.get(&key).expect("get").expect("event 2").to_vec();
        let last = v.len() - 1;
        v[last] ^= 0x20;
        tree.insert(&key, v).expect("insert");
        db.flush().expect("flush");
    }
    let (st, out, _) = log_stopped(&["verify", "--dir", &s(&dir)]).await;
    assert!(!st.success(), "verify must fail: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAULT event 2:") && l.contains("checksum")),
        "{out}"
    );
    assert!(out.contains("State NOT rebuilt"), "{out}");
}

#[tokio::test]
async fn verify_checks_snapshots() {
    let mut tb = TestBroker::start().await;
    fill(&tb, 3).await;
    tb.shutdown().await;
    let dir = data_dir(&tb);
    let snaps = dir.join("snapshots");
    std::fs::create_dir_all(&snaps).expect("mkdir snapshots");
    std::fs::write(
        snaps.join(format!("{:020}.snap", 2)),
        b"SBSNAP1\nnot a snapshot",
    )
    .expect("write snapshot");
    let (st, out, _) = log_stopped(&["verify", "--dir", &s(&dir)]).await;
    assert!(!st.success(), "verify must fail: {out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAULT snapshot") && l.contains("not loadable")),
        "{out}"
    );
}

#[tokio::test]
async fn a_backup_taken_under_load_restores_the_same_history() {
    let tb = TestBroker::start().await;
    let (a, b) = (uid("alice"), uid("bob"));
    let ca = Arc::new(tb.connect(&a, "pa").await);
    let _cb = tb.connect(&b, "pb").await;
    let conv = dm(&a, &b);

    // A client sends in the background until told to stop (at most 150 messages).
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let sender = {
        let (ca, stop, acked, b) = (ca.clone(), stop.clone(), acked.clone(), b.clone());
        tokio::spawn(async move {
            for i in 0..150u64 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                ca.ok(
                    "send",
                    json!({"to": b, "body": {"i": i}, "cid": format!("l{i}")}),
                )
                .await;
                acked.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked.load(Ordering::SeqCst) < 20 {
        assert!(Instant::now() < deadline, "20 sends not acked within 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let acked_before = acked.load(Ordering::SeqCst);

    let work = tempfile::tempdir().expect("tempdir");
    let backup = work.path().join("backup");
    let (st, out, err) = log(&[
        "backup",
        &s(&backup),
        "--url",
        &tb.base_url(),
        "--api-key",
        &tb.api_key,
    ])
    .await;
    assert!(st.success(), "online backup: {out}\n{err}");
    let report: Value = serde_json::from_str(&out).expect("backup report JSON");
    assert_eq!(report["verified"], json!(true), "{report}");
    let h = report["head"].as_u64().expect("head");
    assert_eq!(report["as_of_head"], json!(h), "{report}");
    stop.store(true, Ordering::SeqCst);
    eprintln!("backup {report}; acked before it: {acked_before}");
    tokio::time::timeout(Duration::from_secs(15), sender)
        .await
        .expect("sender stops")
        .expect("sender ok");

    // The copy is a complete, valid log up to `h`.
    let (st, out, err) = log(&["stats", "--dir", &s(&backup), "--json"]).await;
    assert!(st.success(), "stats of the backup: {err}");
    let stats: Value = serde_json::from_str(&out).expect("stats JSON");
    assert_eq!(
        (stats["floor"].clone(), stats["head"].clone()),
        (json!(1), json!(h))
    );
    let (st, out, _) = log(&["verify", "--dir", &s(&backup)]).await;
    assert!(st.success(), "verify of the backup: {out}");
    // It carries its own durable watermark at its head (start-up refuses it if it shrinks).
    let wm = std::fs::read(backup.join("watermark")).expect("the backup has a watermark");
    assert_eq!(
        wm.get(..8),
        Some(&h.to_be_bytes()[..]),
        "watermark at the head"
    );

    // A second backup into the same directory is refused.
    let (st, _, err) = log(&[
        "backup",
        &s(&backup),
        "--url",
        &tb.base_url(),
        "--api-key",
        &tb.api_key,
    ])
    .await;
    assert!(!st.success() && err.contains("not empty"), "{err}");

    let path = format!("/v1/conversations/{conv}/messages?limit=200");
    let original = tb.http().get(&path).await;
    assert_eq!(original.status, 200, "{}", original.text);
    let original: Vec<Value> = original.json()["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| common::off(m) <= h)
        .cloned()
        .collect();
    assert!(
        original.len() as u64 >= acked_before,
        "acked before the backup are in it"
    );

    // Restore into a fresh directory; a second restore there is refused without --force.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let cfg2 = test_config(&dir2);
    let data2 = s(&cfg2.storage.dir);
    let (st, out, err) = log(&["restore", &s(&backup), "--dir", &data2]).await;
    assert!(st.success(), "restore: {out}\n{err}");
    let (st, _, err) = log(&["restore", &s(&backup), "--dir", &data2]).await;
    assert!(!st.success() && err.contains("not empty"), "{err}");
    let (st, out, err) = log(&["restore", &s(&backup), "--dir", &data2, "--force"]).await;
    assert!(st.success(), "restore --force: {out}\n{err}");

    let restored = TestBroker::start_config(dir2, cfg2).await;
    let r = restored.http().get(&path).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let served = r.json()["messages"].as_array().expect("messages").clone();
    assert_eq!(served, original, "history served from the restored log");
    // And over the protocol, to a member.
    let cb2 = restored.connect(&b, "pb2").await;
    let hist = cb2.ok("history", json!({"conv": conv, "limit": 200})).await;
    assert_eq!(hist["messages"].as_array().expect("messages"), &original);
}

#[tokio::test]
async fn a_running_broker_is_refused_offline_and_served_online() {
    let tb = TestBroker::start().await;
    let (a, b, _) = fill(&tb, 4).await;
    let dir = s(&data_dir(&tb));
    for cmd in ["stats", "verify", "dump", "tail"] {
        let (st, _, err) = log(&[cmd, "--dir", &dir]).await;
        assert!(!st.success(), "{cmd} on a running broker's dir must fail");
        assert!(err.contains(RUNNING), "{cmd}: {err}");
    }

    let url = tb.base_url();
    let key = tb.api_key.clone();
    let (st, out, err) = log(&["stats", "--url", &url, "--api-key", &key, "--json"]).await;
    assert!(st.success(), "online stats: {err}");
    let stats: Value = serde_json::from_str(&out).expect("stats JSON");
    let head = stats["head"].as_u64().expect("head");
    assert!(head > 0);
    let (st, out, _) = log(&["stats", "--url", &url, "--api-key", "wrong"]).await;
    assert!(!st.success(), "a wrong key is refused: {out}");

    let (st, out, err) = log(&["tail", "-n", "2", "--url", &url, "--api-key", &key]).await;
    assert!(st.success(), "online tail: {err}");
    let tail = ndjson(&out);
    assert_eq!(tail.len(), 2, "{out}");
    assert!(common::off(&tail[1]) >= head && tail.iter().all(|e| e.get("to").is_some()));

    // tail -f: prints the last one, then what arrives, until killed.
    let mut child = command(&[
        "log",
        "tail",
        "-f",
        "-n",
        "1",
        "--url",
        &url,
        "--api-key",
        &key,
    ])
    .spawn()
    .expect("spawn tail -f");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("first line within 10 s")
        .expect("read")
        .expect("a line");
    let first: Value = serde_json::from_str(&first).expect("JSON line");
    let ca = tb.connect(&a, "pa2").await;
    ca.ok("send", json!({"to": b, "body": "live", "cid": "follow-1"}))
        .await;
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).expect("JSON line");
            if v["cid"] == "follow-1" {
                return Some(v);
            }
        }
        None
    })
    .await
    .expect("the new message within 10 s")
    .expect("tail -f ended early");
    assert!(common::off(&found) > common::off(&first));
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}
