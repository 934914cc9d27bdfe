//! One slow reader among 1,000 fast ones (issue 9, item 6): 1,002 sessions in one room, a
//! sender, 1,000 readers that read (100 users with 10 devices each), and one session that stops reading. The sender is never
//! held back by the sleeper, every fast reader gets every message in order, the sleeper's
//! outbound queue (`limits.outbound_queue`) fills and it is closed with 4008, and its resume
//! with `since` fills in exactly what it missed.
//!
//! Bounds: one in-process broker, ~2,000 sockets (the fd limit is 20k), messages in rounds of
//! [`ROUND`] with every fast reader caught up before the next round (so only the sleeper can
//! overflow), at most [`MAX_MESSAGES`]. The fast readers are bare WebSocket readers that
//! parse only `message` frames, to keep the test process light.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const FAST: usize = 1000;
/// Fast readers are this many devices of each of `FAST / DEVICES` users: fewer users keep
/// room set-up and presence fan-out small, which is not what this test is about.
const DEVICES: usize = 10;
const ROUND: usize = 20;
const MAX_MESSAGES: usize = 3000;
/// Direct messages of 15 KB to the sleeper per round.
const DM_PER_ROUND: usize = 30;
/// How long fast readers may take to catch up with one round on a loaded machine.
const CATCH_UP: Duration = Duration::from_secs(60);

/// What one fast reader has seen.
#[derive(Default)]
struct Seen {
    offs: Mutex<Vec<u64>>,
    count: AtomicUsize,
    /// Set when the stream ended (closed or errored).
    ended: Mutex<Option<String>>,
}

/// A bare reader: hello, wait for `sync`, then keep the `off` of every `message` of `conv`.
async fn fast_reader(b: &TestBroker, user: &str, device: String, conv: String) -> Arc<Seen> {
    let mut req = b.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(JSON_PROTO),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    let hello = json!({"op": "hello", "id": 1, "token": b.token(user), "device": device});
    ws.send(Message::text(hello.to_string())).await.unwrap();
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), ws.next())
            .await
            .expect("sync in time")
            .expect("stream open")
            .expect("frame");
        if let Message::Text(t) = msg {
            if t.contains(r#""ev":"sync""#) {
                break;
            }
            assert!(!t.contains(r#""ok":false"#), "hello refused: {t}");
        }
    }
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(t)) if t.contains(r#""ev":"message""#) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or_default();
                    if v["conv"] == json!(conv) {
                        if let Some(off) = v["off"].as_u64() {
                            s.offs.lock().unwrap().push(off);
                            s.count.fetch_add(1, Ordering::Release);
                        }
                    }
                }
                Ok(Message::Close(f)) => {
                    *s.ended.lock().unwrap() = Some(format!("closed {f:?}"));
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    *s.ended.lock().unwrap() = Some(format!("error {e}"));
                    return;
                }
            }
        }
        *s.ended.lock().unwrap() = Some("stream ended".into());
    });
    seen
}

/// The soft limit on open files of this process (`ulimit -n`), from /proc/self/limits.
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_slow_reader_among_a_thousand_fast_ones_is_closed_4008_and_resumes_without_loss() {
    // Both ends of ~1,000 sockets live in this process.
    let need = 2 * (FAST + 2) + 500;
    if let Some(soft) = open_file_limit() {
        if soft < need {
            eprintln!(
                "slow_reader: SKIPPED: needs {need} open files, `ulimit -n` is {soft}; \
                 raise it to run this test"
            );
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run slow_reader: raise `ulimit -n` to {need}"
            );
            return;
        }
    }
    let b = TestBroker::start_with(|c| {
        c.limits.outbound_queue = 128;
        // no pings or heartbeat closes while a loaded machine runs this
        c.heartbeat.interval_ms = 600_000;
        c.heartbeat.timeout_ms = 1_200_000;
    })
    .await;
    let sender_user = uid("sender");
    let slow_user = uid("slow");
    let fast_users: Vec<String> = (0..FAST / DEVICES).map(|_| uid("fast")).collect();
    let mut members: Vec<&str> = fast_users.iter().map(String::as_str).collect();
    members.push(&sender_user);
    members.push(&slow_user);
    // created before anyone connects: its room.member events are in the log, not on sockets
    let room = b.http().create_room("big", &members).await;
    let conv = format!("room:{room}");

    // the fast readers, a few at a time
    let mut fast: Vec<Arc<Seen>> = Vec::with_capacity(FAST);
    for d in 0..DEVICES {
        for chunk in fast_users.chunks(10) {
            let joined = futures_util::future::join_all(
                chunk
                    .iter()
                    .map(|u| fast_reader(&b, u, format!("d{d}"), conv.clone())),
            )
            .await;
            fast.extend(joined);
        }
    }
    let sender = b.connect(&sender_user, "s").await;
    // the sleeper: a tiny receive buffer, so its backlog lands in the broker's queue soon
    let opts = OpenOpts {
        protocols: vec![JSON_PROTO.to_string()],
        recv_buffer: Some(4096),
        ..Default::default()
    };
    let mut slow = b.open_with(opts).await.expect("upgrade");
    slow.hello(Some(&b.token(&slow_user)), "d", None).await;
    let slow_head = slow.hello_reply["head"].as_u64().unwrap();
    slow.pause_reading();
    assert_eq!(b.health().await["connections"], json!(FAST + 2));

    // rounds of messages; after each, every fast reader has all of them
    let mut acked: Vec<u64> = Vec::new();
    let mut dm_acked: Vec<u64> = Vec::new();
    let dm_conv = dm(&sender_user, &slow_user);
    let mut rounds_after_close = 0;
    while rounds_after_close < 2 {
        assert!(
            acked.len() < MAX_MESSAGES,
            "{MAX_MESSAGES} messages and the sleeper is still connected"
        );
        let base = acked.len();
        let frames: Vec<Value> = (0..ROUND)
            .map(|i| json!({"op": "send", "conv": conv, "body": {"i": base + i, "pad": "p".repeat(200)}, "cid": format!("m{}", base + i)}))
            .collect();
        for a in sender.pipeline(frames, ROUND).await {
            assert_eq!(a["ok"], json!(true), "a send failed: {a}");
            acked.push(off(&a));
        }
        // plus large direct messages to the sleeper only: the kernel's socket buffers (up to
        // 4 MB) fill with those, not with a million room frames to the fast readers
        let dms: Vec<Value> = (0..DM_PER_ROUND)
            .map(|i| json!({"op": "send", "to": slow_user, "body": {"pad": "p".repeat(15_000)}, "cid": format!("dm{}-{i}", base)}))
            .collect();
        for a in sender.pipeline(dms, DM_PER_ROUND).await {
            assert_eq!(a["ok"], json!(true), "a direct send failed: {a}");
            dm_acked.push(off(&a));
        }
        let deadline = Instant::now() + CATCH_UP;
        for (i, s) in fast.iter().enumerate() {
            while s.count.load(Ordering::Acquire) < acked.len() {
                if let Some(why) = s.ended.lock().unwrap().clone() {
                    panic!("fast reader {i} ended: {why}");
                }
                assert!(
                    Instant::now() < deadline,
                    "fast reader {i} has {} of {} messages",
                    s.count.load(Ordering::Acquire),
                    acked.len()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if b.health().await["connections"] == json!(FAST + 1) {
            rounds_after_close += 1;
        }
    }
    eprintln!(
        "slow_reader: {} messages to {} sessions; the sleeper was dropped",
        acked.len(),
        FAST + 2
    );

    // every fast reader: every message, in order, once, and still connected
    for (i, s) in fast.iter().enumerate() {
        assert_eq!(*s.offs.lock().unwrap(), acked, "fast reader {i}");
        assert!(s.ended.lock().unwrap().is_none(), "fast reader {i} ended");
    }

    // the sleeper: 4008, a gapless prefix, then the rest exactly once on resume
    slow.resume_reading();
    assert_eq!(
        slow.wait_closed_within(Duration::from_secs(30)).await,
        Some(4008)
    );
    let seen: Vec<u64> = messages(&slow.all(), Some(&conv)).iter().map(off).collect();
    assert!(seen.len() < acked.len(), "the sleeper got everything");
    assert_eq!(
        seen,
        acked[..seen.len()],
        "gap or reorder before the 4008 close"
    );
    // the last offset the sleeper processed, over both conversations
    let since = slow
        .all()
        .iter()
        .filter(|f| f["ev"] == "message")
        .map(off)
        .max()
        .unwrap_or(slow_head);
    let again = b.connect_since(&slow_user, "d", since).await;
    let mut all = seen.clone();
    all.extend(messages(&again.replay, Some(&conv)).iter().map(off));
    assert_eq!(all, acked, "seen + replay is not every room message once");
    let mut dms: Vec<u64> = messages(&slow.all(), Some(&dm_conv))
        .iter()
        .map(off)
        .collect();
    dms.extend(messages(&again.replay, Some(&dm_conv)).iter().map(off));
    assert_eq!(
        dms, dm_acked,
        "seen + replay is not every direct message once"
    );
}
