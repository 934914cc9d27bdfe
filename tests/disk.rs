//! Disk trouble (issue 9 item 2): `storage.max_bytes`. The real binary runs with a config
//! file holding only that key (everything else from the environment); a SIGHUP reload
//! changes it live.
//!
//! - under the limit sends are acked; once the store is at the limit every send is answered
//!   `unavailable`, nothing of it is delivered, and `switchboard_log_full_total` counts the
//!   refused batches;
//! - when the limit is raised (SIGHUP) the broker takes writes again by itself: the refused
//!   message resent with the same cid is a new write (`dup: false`: nothing of the refused
//!   attempt was kept), delivered once, and the log verifies after a restart.
//!
//! Every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn write_max_bytes(path: &std::path::Path, max: u64) {
    std::fs::write(path, format!("[storage]\nmax_bytes = {max}\n")).expect("write config");
}

/// Sends SIGHUP and waits for the `configuration reloaded` line naming the key.
async fn reload(s: &ServerProcess) {
    let before = s.log().matches("configuration reloaded").count();
    s.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.log().matches("configuration reloaded").count() == before {
        assert!(Instant::now() < deadline, "no reload line:\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = s.log();
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap_or_default();
    assert!(last.contains("storage.max_bytes"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_acks_nothing_and_takes_writes_again_when_the_limit_is_raised() {
    let mut s = ServerProcess::new();
    let config = s.dir.path().join("disk.toml");
    write_max_bytes(&config, 0);
    s.serve_args = vec!["--config".into(), config.display().to_string()];
    s.start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = s.ep().connect(&alice, "a1").await;
    let b = s.ep().connect(&bob, "b1").await;
    let first = a
        .ok("send", json!({"to": bob, "body": "before", "cid": "c1"}))
        .await;
    b.next_message("c1").await;

    // The limit drops under the store's size: the disk is "full".
    write_max_bytes(&config, 1);
    reload(&s).await;
    for cid in ["c2", "c3"] {
        let r = a
            .err(
                "send",
                json!({"to": bob, "body": "while full", "cid": cid}),
                "unavailable",
            )
            .await;
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("full"),
            "{r}"
        );
    }
    assert!(s.metric("switchboard_log_full_total").await >= 2.0);
    // Reads still work while writes are refused.
    a.ok("history", json!({"conv": dm(&alice, &bob)})).await;

    // Space returns: writes resume without a restart.
    write_max_bytes(&config, 0);
    reload(&s).await;
    let again = a
        .ok("send", json!({"to": bob, "body": "after", "cid": "c2"}))
        .await;
    assert_eq!(again["dup"], json!(false), "{again}");
    assert!(off(&again) > off(&first));
    assert_eq!(seq(&again), 2, "{again}");
    let m = b.next_message("c2").await;
    assert_eq!(m["body"], json!("after"));
    let c2s = messages(&b.all(), None)
        .into_iter()
        .filter(|m| m["cid"] == json!("c2") || m["cid"] == json!("c3"))
        .count();
    assert_eq!(c2s, 1, "only the acked c2 was delivered");

    s.stop_and_verify().await;
}
