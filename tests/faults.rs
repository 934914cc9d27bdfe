//! I/O faults (issue 9 item 9): the real binary under libfiu's POSIX preload (Debian
//! `fiu-utils`), with failure points switched on and off in the running broker through
//! `fiu-ctrl`.
//!
//! - ENOSPC on every `pwrite` (sled's writes), or EIO on every `sync_file_range` (how sled
//!   makes each log write stable) and `fsync`/`fdatasync`: while
//!   the fault lasts every send is answered `unavailable` and nothing new is delivered;
//! - when the fault ends the broker takes writes again by itself: sled's I/O errors are
//!   sticky, so it reopens the store (`switchboard_store_reopens_total{outcome="ok"}`);
//! - every message is then delivered exactly once, acked or not: resends with the same
//!   cid find what reached the disk, the history after a restart holds each once, in
//!   order, and `log verify` passes.
//!
//! Without `fiu-run` installed the tests say SKIPPED (under `CI=true` they fail). Every wait
//! is bounded.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PRELOAD: [&str; 2] = [
    "/usr/lib/fiu/fiu_run_preload.so",
    "/usr/lib/fiu/fiu_posix_preload.so",
];

/// Whether libfiu is installed; says SKIPPED (or fails under CI) when it is not.
fn fiu_installed(test: &str) -> bool {
    let ok = PRELOAD.iter().all(|p| Path::new(p).exists())
        && std::process::Command::new("fiu-ctrl")
            .arg("-h")
            .output()
            .is_ok();
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "{test}: fiu-utils is not installed, and CI must run this test"
        );
        eprintln!("SKIPPED {test}: fiu-utils (fiu-run, fiu-ctrl) is not installed");
    }
    ok
}

/// A broker whose POSIX I/O calls go through libfiu, remote-controlled from `fifo`.
fn broker_under_fiu() -> ServerProcess {
    let mut s = ServerProcess::new();
    let fifo = s.dir.path().join("fiu");
    s.extra_env.extend([
        ("LD_PRELOAD".to_string(), PRELOAD.join(" ")),
        ("FIU_CTRL_FIFO".to_string(), fifo.display().to_string()),
        ("FIU_ENABLE".to_string(), String::new()),
    ]);
    s
}

/// Runs one `fiu-ctrl` command (`enable name=...`, `disable name=...`) in the broker.
async fn fiu_ctrl(s: &ServerProcess, command: &str) {
    let fifo = s.dir.path().join("fiu");
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("fiu-ctrl")
            .arg("-f")
            .arg(&fifo)
            .args(["-c", command])
            .arg(s.pid().to_string())
            .output(),
    )
    .await
    .expect("fiu-ctrl within 10 s")
    .expect("run fiu-ctrl");
    assert!(
        out.status.success(),
        "fiu-ctrl -c {command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends until acked (the broker may still be recovering); returns the ack.
async fn send_until_acked(c: &Client, to: &str, cid: &str, s: &ServerProcess) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .request("send", json!({"to": to, "body": cid, "cid": cid}))
            .await;
        if r["ok"] == json!(true) {
            return r;
        }
        assert_eq!(r["error"]["code"], json!("unavailable"), "{r}");
        assert!(
            Instant::now() < deadline,
            "{cid} still refused after the fault ended: {r}\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The fault scenario: `enable` (fiu-ctrl commands) starts the fault, `disable` ends it.
async fn a_fault_acks_nothing_and_the_broker_recovers(
    test: &str,
    enable: &[&str],
    disable: &[&str],
) {
    if !fiu_installed(test) {
        return;
    }
    let mut s = broker_under_fiu();
    s.start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = s.ep().connect(&alice, "a1").await;
    let b = s.ep().connect(&bob, "b1").await;
    a.ok("send", json!({"to": bob, "body": "c1", "cid": "c1"}))
        .await;
    b.next_message("c1").await;

    for c in enable {
        fiu_ctrl(&s, c).await;
    }
    let mut refused = Vec::new();
    for cid in ["c2", "c3", "c4"] {
        let r = a
            .request("send", json!({"to": bob, "body": cid, "cid": cid}))
            .await;
        assert_eq!(
            r["error"]["code"],
            json!("unavailable"),
            "{cid}: {r}\n{}",
            s.log()
        );
        refused.push(cid);
    }
    assert!(s.metric("switchboard_append_failures_total").await >= 1.0);
    // Nothing of a refused send is delivered while the fault lasts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during: Vec<Value> = messages(&b.all(), None);
    assert_eq!(
        during.len(),
        1,
        "only c1 is delivered during the fault: {during:?}"
    );

    for c in disable {
        fiu_ctrl(&s, c).await;
    }
    // Writes come back by themselves; each refused message is resent (as a client does).
    let mut acks = Vec::new();
    for cid in &refused {
        acks.push(send_until_acked(&a, &bob, cid, &s).await);
    }
    assert!(
        s.metric("switchboard_store_reopens_total{outcome=\"ok\"}")
            .await
            >= 1.0,
        "{}",
        s.log()
    );
    for cid in &refused {
        b.next_message(cid).await;
    }
    a.ok("send", json!({"to": bob, "body": "c5", "cid": "c5"}))
        .await;
    b.next_message("c5").await;
    let cids: Vec<Value> = messages(&b.all(), None)
        .iter()
        .map(|m| m["cid"].clone())
        .collect();
    assert_eq!(
        cids,
        vec![
            json!("c1"),
            json!("c2"),
            json!("c3"),
            json!("c4"),
            json!("c5")
        ],
        "each message delivered exactly once, in order"
    );
    let seqs: Vec<u64> = messages(&b.all(), None).iter().map(seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);

    // The same history after a restart, and the log verifies.
    s.stop_and_verify().await;
    s.extra_env.clear();
    s.start().await;
    let a = s.ep().connect(&alice, "a1").await;
    let h = a.ok("history", json!({"conv": dm(&alice, &bob)})).await;
    let bodies: Vec<&str> = h["messages"]
        .as_array()
        .map(|v| v.iter().filter_map(|m| m["body"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(bodies, vec!["c1", "c2", "c3", "c4", "c5"], "{h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_on_write_acks_nothing_and_the_store_is_reopened_when_space_returns() {
    a_fault_acks_nothing_and_the_broker_recovers(
        "enospc_on_write",
        &["enable name=posix/io/rw/pwrite,failinfo=28"],
        &["disable name=posix/io/rw/pwrite"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_fsync_acks_nothing_and_the_store_is_reopened_when_the_disk_recovers() {
    a_fault_acks_nothing_and_the_broker_recovers(
        "eio_on_fsync",
        // sled makes each log write stable with sync_file_range, and the file with fsync.
        &[
            "enable name=linux/io/sync_file_range,failinfo=5",
            "enable name=posix/io/sync/fsync,failinfo=5",
            "enable name=posix/io/sync/fdatasync,failinfo=5",
        ],
        &[
            "disable name=linux/io/sync_file_range",
            "disable name=posix/io/sync/fsync",
            "disable name=posix/io/sync/fdatasync",
        ],
    )
    .await;
}
