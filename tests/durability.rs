//! Durability and operations (protocol.md sections 3, 4 "the reply means durable", 9): with
//! the real binary, every acked message survives SIGKILL and comes back exactly once with the
//! same off/seq/ts; dedupe and seq continue after a restart; SIGTERM closes sockets with 4000,
//! exits 0 and keeps state; config errors exit non-zero naming the key; the `token` command
//! signs with the configured secret. Also the embedded broker's graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn padded_frames(to: &str, prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"op": "send", "to": to, "body": {"i": i, "pad": "p".repeat(64)}, "cid": format!("{prefix}{i}")}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_messages_survive_sigkill_and_replay_once_with_same_off_seq_ts() {
    let mut s = ServerProcess::new();
    s.start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let since = s.ep().health().await["head"].as_u64().unwrap();
    let a = s.ep().connect(&alice, "a1").await;
    let n = 200;
    let acks = a.pipeline(padded_frames(&bob, "m", n), 50).await;
    assert!(
        acks.iter().all(|x| x["ok"] == json!(true)),
        "a send failed: {:?}",
        acks.iter().find(|x| x["ok"] != json!(true))
    );
    assert_eq!(
        acks.iter().map(seq).collect::<Vec<_>>(),
        (1..=n as u64).collect::<Vec<_>>()
    );
    s.kill().await;
    a.wait_closed().await;

    s.start().await;
    let bc = s.ep().connect_since(&bob, "b1", since).await;
    assert_eq!(bc.hello_reply["resumed"], json!(true), "{}", bc.hello_reply);
    assert_eq!(bc.hello_reply["reset"], json!(false), "{}", bc.hello_reply);
    let msgs = messages(&bc.replay, Some(&conv));
    let cids: Vec<String> = msgs
        .iter()
        .map(|m| m["cid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(cids, (0..n).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert_eq!(
        msgs.iter().map(off).collect::<Vec<_>>(),
        acks.iter().map(off).collect::<Vec<_>>()
    );
    assert_eq!(
        msgs.iter().map(seq).collect::<Vec<_>>(),
        (1..=n as u64).collect::<Vec<_>>()
    );
    let ts = |v: &Value| v["ts"].as_u64().unwrap();
    assert_eq!(
        msgs.iter().map(ts).collect::<Vec<_>>(),
        acks.iter().map(ts).collect::<Vec<_>>()
    );
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(
            (&m["body"]["i"], &m["from"], &m["device"]),
            (&json!(i), &json!(alice), &json!("a1"))
        );
    }
    assert!(bc.sync["head"].as_u64().unwrap() >= off(acks.last().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_stream_keeps_a_gapless_prefix_holding_every_ack() {
    let mut s = ServerProcess::new();
    s.start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let conv = dm(&alice, &bob);
    let since = s.ep().health().await["head"].as_u64().unwrap();
    let a = std::sync::Arc::new(s.ep().connect(&alice, "a1").await);
    let n = 600;
    let sender = {
        let a = a.clone();
        let frames = padded_frames(&bob, "k", n);
        tokio::spawn(async move { a.pipeline(frames, 40).await })
    };
    let is_ack = |f: &Value| f["ok"] == json!(true) && f.get("seq").is_some();
    a.wait_frames(Duration::from_secs(20), "120 acks", |all| {
        all.iter().filter(|f| is_ack(f)).count() >= 120
    })
    .await;
    s.kill().await; // with up to 40 sends in flight
                    // the sender fails on the dead socket (its panic is expected); if a very fast server
                    // acked everything first, the checks below still hold
    let _ = sender.await;
    a.wait_closed().await;
    let acked: Vec<Value> = a.all().into_iter().filter(|f| is_ack(f)).collect();

    s.start().await;
    let bc = s.ep().connect_since(&bob, "b1", since).await;
    let msgs = messages(&bc.replay, Some(&conv));
    let k = msgs.len();
    assert!(k >= acked.len(), "{} acked, {k} survived", acked.len());
    // one connection's frames are applied in order and the log is append-only: what
    // survives is a prefix of what was sent, with no gap
    let cids: Vec<String> = msgs
        .iter()
        .map(|m| m["cid"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(cids, (0..k).map(|i| format!("k{i}")).collect::<Vec<_>>());
    assert_eq!(
        msgs.iter().map(seq).collect::<Vec<_>>(),
        (1..=k as u64).collect::<Vec<_>>()
    );
    for ack in &acked {
        let m = &msgs[seq(ack) as usize - 1];
        assert_eq!(
            (&m["off"], &m["ts"]),
            (&ack["off"], &ack["ts"]),
            "acked {ack}"
        );
    }
    // resending everything: the survivors are duplicates, the rest new, still no gap
    let a = s.ep().connect(&alice, "a1").await;
    let again = a.pipeline(padded_frames(&bob, "k", n), 40).await;
    let dups: Vec<bool> = again.iter().map(|x| x["dup"] == json!(true)).collect();
    assert_eq!(dups, (0..n).map(|i| i < k).collect::<Vec<_>>());
    assert_eq!(
        again.iter().map(seq).collect::<Vec<_>>(),
        (1..=n as u64).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dedupe_seq_and_offsets_continue_after_sigkill_restart() {
    let mut s = ServerProcess::new();
    s.start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = s.ep().connect(&alice, "a1").await;
    let acks = a.pipeline(padded_frames(&bob, "m", 5), 5).await;
    s.kill().await;
    a.wait_closed().await;

    s.start().await;
    let bc = s.ep().connect(&bob, "b1").await;
    let a = s.ep().connect(&alice, "a1").await;
    let dup = a
        .ok("send", json!({"to": bob, "body": "again", "cid": "m0"}))
        .await;
    assert_eq!(dup["dup"], json!(true), "{dup}");
    for k in ["off", "conv", "seq", "ts"] {
        assert_eq!(dup[k], acks[0][k], "{k} of the duplicate after restart");
    }
    let next = a
        .ok("send", json!({"to": bob, "body": "next", "cid": "next"}))
        .await;
    assert_eq!((&next["seq"], &next["dup"]), (&json!(6), &json!(false)));
    assert!(
        off(&next) > off(&acks[4]),
        "offsets went back after restart: {next}"
    );
    let e = bc.next_message("next").await;
    assert_eq!(e["off"], next["off"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_closes_every_socket_with_4000_and_exits_0() {
    let mut s = ServerProcess::new();
    s.start().await;
    let a = s.ep().connect(&uid("alice"), "a1").await;
    let bc = s.ep().connect(&uid("bob"), "b1").await;
    s.send_sigterm();
    assert_eq!(
        a.wait_closed_within(Duration::from_secs(10)).await,
        Some(4000)
    );
    assert_eq!(
        bc.wait_closed_within(Duration::from_secs(10)).await,
        Some(4000)
    );
    let status = s.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        s.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_survives_a_sigterm_restart() {
    let mut s = ServerProcess::new();
    s.start().await;
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let conv = dm(&alice, &bob);
    let room = s.ep().http().create_room("Kept", &[&alice, &bob]).await;
    let a = s.ep().connect(&alice, "a1").await;
    let bc = s.ep().connect(&bob, "b1").await;
    for i in 0..5 {
        a.ok(
            "send",
            json!({"to": bob, "body": i, "cid": format!("a{i}")}),
        )
        .await;
    }
    bc.ok("send", json!({"to": alice, "body": "reply", "cid": "b0"}))
        .await;
    a.ok(
        "send",
        json!({"conv": format!("room:{room}"), "body": "room msg", "cid": "r0"}),
    )
    .await;
    bc.ok("receipt", json!({"conv": conv, "kind": "read", "seq": 3}))
        .await;
    let notice = s
        .ep()
        .http()
        .post(
            &format!("/v1/users/{bob}/notices"),
            json!({"type": "kept", "data": [1]}),
        )
        .await;
    assert!(notice.is_success(), "{}", notice.text);
    let notice_off = off(&notice.json());
    let hist = bc.ok("history", json!({"conv": conv, "limit": 50})).await;
    let unread = bc.ok("unread", json!({})).await;
    let convs = bc.ok("conversations", json!({"limit": 50})).await;
    let head = s.ep().health().await["head"].as_u64().unwrap();
    s.send_sigterm();
    let status = s.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{status}");

    s.start().await;
    assert!(s.ep().health().await["head"].as_u64().unwrap() >= head);
    let bc = s.ep().connect_since(&bob, "b1", notice_off - 1).await;
    let notices: Vec<u64> = bc
        .replay
        .iter()
        .filter(|e| e["ev"] == "notice")
        .map(off)
        .collect();
    assert_eq!(notices, [notice_off]);
    let h2 = bc.ok("history", json!({"conv": conv, "limit": 50})).await;
    assert_eq!(
        (&h2["messages"], &h2["more"]),
        (&hist["messages"], &hist["more"])
    );
    let u2 = bc.ok("unread", json!({})).await;
    assert_eq!(
        (&u2["total"], &u2["convs"]),
        (&unread["total"], &unread["convs"])
    );
    assert_eq!(u2["total"], json!(3), "{u2}"); // 2 in the dm (read 3 of 5) + 1 in the room
    let c2 = bc.ok("conversations", json!({"limit": 50})).await;
    assert_eq!(c2["items"], convs["items"]);
    let cc = s.ep().connect(&carol, "c1").await;
    cc.err(
        "send",
        json!({"conv": format!("room:{room}"), "body": "x", "cid": "x"}),
        "forbidden",
    )
    .await;
    let a = s.ep().connect(&alice, "a1").await;
    let dup = a
        .ok("send", json!({"to": bob, "body": 0, "cid": "a0"}))
        .await;
    assert_eq!((&dup["dup"], &dup["seq"]), (&json!(true), &json!(1)));
    let next = a
        .ok(
            "send",
            json!({"conv": format!("room:{room}"), "body": "again", "cid": "r1"}),
        )
        .await;
    assert_eq!(next["seq"], json!(2));
    assert!(off(&next) > head);
}

// ---------------------------------------------------------------------------------------------
// configuration and CLI

async fn assert_config_refused(var: &str, value: &str, named: &str) {
    let s = ServerProcess::new();
    let cmd = s.command(&["serve"], &[(var, value)]);
    let (status, out, err) = run_to_end(cmd, Duration::from_secs(15)).await;
    assert!(!status.success(), "{var}={value}: exit {status}");
    let text = format!("{out}{err}").to_lowercase();
    assert!(
        text.lines().any(|l| l.contains(named)),
        "{var}={value}: no line names `{named}`:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_config_key_exits_nonzero_naming_the_key() {
    assert_config_refused("SWITCHBOARD_NOSUCH__KEY", "1", "nosuch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_config_value_exits_nonzero_naming_the_key() {
    assert_config_refused("SWITCHBOARD_PRESENCE__GRACE_MS", "soon", "grace_ms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_command_prints_a_token_that_verifies_with_the_secret() {
    let mut s = ServerProcess::new();
    let alice = uid("alice");
    let cmd = s.command(&["token", "--user", &alice, "--ttl", "600"], &[]);
    let (status, out, err) = run_to_end(cmd, Duration::from_secs(15)).await;
    assert!(status.success(), "token: {status}\n{err}");
    let token = out
        .trim()
        .lines()
        .last()
        .expect("a token line")
        .trim()
        .to_string();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(s.secret.as_bytes()),
        &validation,
    )
    .unwrap_or_else(|e| panic!("token {token:?} does not verify: {e}"));
    assert_eq!(data.claims["sub"], json!(alice));
    let exp = data.claims["exp"].as_i64().expect("exp");
    assert!(
        (exp - (now_s() + 600)).abs() < 60,
        "exp {exp} is not ~600 s from now"
    );
    // a server with the same secret accepts it
    s.start().await;
    let c = s
        .ep()
        .connect_with(&alice, ConnectOpts::device("d1").token(token))
        .await;
    assert_eq!(c.hello_reply["user"], json!(alice));
}

// ---------------------------------------------------------------------------------------------
// the embedded broker

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_broker_shutdown_closes_sessions_4000_and_keeps_the_log() {
    let mut b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a = b.connect(&alice, "a1").await;
    let ack = a
        .ok("send", json!({"to": bob, "body": "kept", "cid": "k1"}))
        .await;
    b.shutdown().await;
    assert_eq!(a.wait_closed().await, Some(4000));

    let b2 = b.restart().await;
    let bc = b2.connect(&bob, "b1").await;
    let h = bc.ok("history", json!({"conv": dm(&alice, &bob)})).await;
    assert_eq!(h["messages"].as_array().map(Vec::len), Some(1), "{h}");
    assert_eq!(h["messages"][0]["off"], ack["off"]);
    assert_eq!(h["messages"][0]["body"], json!("kept"));
}

/// A live session learns of shutdown from the sequencer (it is in the registry); a socket
/// still before its hello is not, and must be closed with 4000 all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_closes_a_socket_that_has_not_said_hello_with_4000() {
    let mut b = TestBroker::start().await;
    let live = b.connect(&uid("alice"), "a1").await;
    let silent = b.open().await;
    b.shutdown().await;
    assert_eq!(live.wait_closed().await, Some(4000));
    assert_eq!(silent.wait_closed().await, Some(4000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_the_same_data_dir_refuses_to_start_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let env = [
        ("SWITCHBOARD_SERVER__LISTEN", "127.0.0.1:0".to_string()),
        ("SWITCHBOARD_STORAGE__DIR", data.display().to_string()),
    ];
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("serve")
        .envs(env.iter().cloned())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // wait until the first broker listens (it has the directory by then)
    let stdout = first.stdout.take().unwrap();
    let listening = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("listening"))
    });
    assert!(
        tokio::time::timeout(Duration::from_secs(20), listening)
            .await
            .unwrap()
            .unwrap(),
        "the first broker did not start"
    );
    let second = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("serve")
            .envs(env.iter().cloned())
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("the second broker started instead of refusing")
        .unwrap();
    let _ = first.kill();
    let _ = first.wait();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("in use by another broker"), "{text}");
}
