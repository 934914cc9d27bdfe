//! Crash consistency (issue 9 item 1): the real `switchboard` binary is SIGKILLed at random
//! moments under chat load and restarted on the same data directory, cycle after cycle.
//!
//! Load: three senders pipeline messages (a window of 32 unanswered each) alternately to a
//! direct conversation with one of two readers and to a room of all five users; the readers
//! only listen. Snapshots are taken every 300 events, so restarts load a snapshot and replay
//! the tail, and some kills land in the middle of a snapshot write.
//!
//! After every kill, with the broker down:
//! - `switchboard log verify` passes (offsets, checksums, indices, State rebuild, snapshots);
//! - `switchboard log dump` holds every acked message exactly once, at the offset, seq and
//!   ts of its ack; no (sender, cid) appears twice, even for sends resent after the crash
//!   because their answer was lost with the connection;
//! - offsets run 1..=head with no gap.
//!
//! After every restart each reader resumes with `since` = the last offset it processed:
//! `resumed: true`, no reset, and everything it has received over all cycles (live frames and
//! replays) is exactly the log's messages for it, in offset order: no gap, no duplicate.
//!
//! `SWITCHBOARD_CRASH_CYCLES` (default 3, at most 500) sets the number of kills;
//! `SWITCHBOARD_CRASH_SEED` replays a run (the seed is printed). Every wait is bounded.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{run_to_end, uid, Client, Endpoint, ServerProcess};
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Unanswered sends per sender.
const WINDOW: usize = 32;
/// New messages a sender offers per cycle (the kill usually comes first).
const PER_CYCLE: usize = 2000;
const SENDERS: usize = 3;
const READERS: usize = 2;
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn cycles() -> usize {
    std::env::var("SWITCHBOARD_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .clamp(1, 500)
}

fn seed() -> u64 {
    std::env::var("SWITCHBOARD_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen())
}

/// What a sender's ack said.
#[derive(Debug, Clone, PartialEq)]
struct Ack {
    off: u64,
    seq: u64,
    ts: u64,
    conv: String,
}

struct Sender {
    user: String,
    /// Next new cid number.
    next: usize,
    acked: HashMap<String, Ack>,
    /// Sent, never answered (lost with a killed connection) or answered with an error:
    /// resent first in the next cycle.
    owed: Vec<(String, Value)>,
}

/// Outcome of one sender's cycle.
#[derive(Default)]
struct Drive {
    acks: Vec<(String, Value)>,
    errors: Vec<(String, Value)>,
    unanswered: Vec<String>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A bare WebSocket client past hello (no frame bookkeeping: the sender reads its own
/// replies and must survive the server vanishing mid-stream).
async fn open_sender(ep: &Endpoint, user: &str, device: &str) -> Ws {
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(ep.ws_url()),
    )
    .await
    .expect("connect within 5 s")
    .expect("websocket connect");
    let hello = json!({"op": "hello", "id": 1, "token": ep.token(user), "device": device});
    ws.send(Message::Text(hello.to_string()))
        .await
        .expect("send hello");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .expect("hello reply within 5 s")
            .expect("socket open")
            .expect("socket read");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).expect("JSON frame");
            if v["re"] == json!(1) {
                assert_eq!(v["ok"], json!(true), "hello refused: {v}");
                return ws;
            }
        }
    }
}

/// Sends `frames` keeping at most [`WINDOW`] unanswered, until every one is answered or
/// the connection ends (the broker was killed).
async fn drive(mut ws: Ws, frames: Vec<(String, Value)>) -> Drive {
    let mut out = Drive::default();
    let mut inflight: HashMap<u64, String> = HashMap::new();
    let mut next = 0usize;
    let mut alive = true;
    while alive && (next < frames.len() || !inflight.is_empty()) {
        while inflight.len() < WINDOW && next < frames.len() {
            let (cid, frame) = &frames[next];
            let id = next as u64 + 2;
            let mut f = frame.clone();
            f["id"] = json!(id);
            if ws.send(Message::Text(f.to_string())).await.is_err() {
                alive = false;
                break;
            }
            inflight.insert(id, cid.clone());
            next += 1;
        }
        if !alive {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("JSON frame");
                if let Some(cid) = v["re"].as_u64().and_then(|id| inflight.remove(&id)) {
                    if v["ok"] == json!(true) {
                        out.acks.push((cid, v));
                    } else {
                        out.errors.push((cid, v));
                    }
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_))) | Ok(None) => alive = false,
            Err(_) => panic!("no frame for 10 s with {} sends in flight", inflight.len()),
        }
    }
    out.unanswered = inflight.into_values().collect();
    out
}

/// The log, read offline with `switchboard log dump` (every event, in offset order).
async fn dump(s: &ServerProcess) -> Vec<Value> {
    let dir = s.data_dir.display().to_string();
    let (st, out, err) = run_to_end(
        s.command(&["log", "dump", "--dir", &dir], &[]),
        TOOL_TIMEOUT,
    )
    .await;
    assert!(st.success(), "log dump failed: {err}");
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("dump line ({e}): {l}")))
        .collect()
}

async fn verify(s: &ServerProcess) {
    let dir = s.data_dir.display().to_string();
    let (st, out, err) = run_to_end(
        s.command(&["log", "verify", "--dir", &dir], &[]),
        TOOL_TIMEOUT,
    )
    .await;
    assert!(st.success(), "log verify failed:\n{out}\n{err}");
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no integer {k} in {v}"))
}

/// Checks the log after a kill against every ack so far. Returns the head.
fn check_log(events: &[Value], senders: &[Sender]) -> u64 {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(u(e, "off"), i as u64 + 1, "offsets not contiguous at {e}");
    }
    let mut by_cid: HashMap<(String, String), Vec<&Value>> = HashMap::new();
    for e in events.iter().filter(|e| e["ev"] == json!("message")) {
        if let (Some(from), Some(cid)) = (e["from"].as_str(), e["cid"].as_str()) {
            by_cid
                .entry((from.to_string(), cid.to_string()))
                .or_default()
                .push(e);
        }
    }
    for found in by_cid.values() {
        assert_eq!(
            found.len(),
            1,
            "a (sender, cid) is in the log twice: {found:?}"
        );
    }
    for s in senders {
        for (cid, ack) in &s.acked {
            let found = by_cid
                .get(&(s.user.clone(), cid.clone()))
                .unwrap_or_else(|| panic!("acked {cid} of {} ({ack:?}) is lost", s.user));
            let e = found[0];
            let got = Ack {
                off: u(e, "off"),
                seq: u(e, "seq"),
                ts: u(e, "ts"),
                conv: e["conv"].as_str().unwrap_or_default().to_string(),
            };
            assert_eq!(&got, ack, "acked {cid} of {} differs in the log", s.user);
        }
    }
    events.len() as u64
}

/// The offsets of the log's messages addressed to `user`.
fn messages_for(events: &[Value], user: &str) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e["ev"] == json!("message"))
        .filter(|e| {
            e["to"]
                .as_array()
                .is_some_and(|to| to.iter().any(|t| t == user))
        })
        .map(|e| u(e, "off"))
        .collect()
}

struct Reader {
    user: String,
    /// Offsets of every message received (live and replayed), over all cycles, in order.
    got: Vec<u64>,
    /// Last durable offset processed (the next `since`).
    since: u64,
}

impl Reader {
    /// Takes in what a (now closed) client received.
    fn absorb(&mut self, c: &Client) {
        for f in c.all() {
            if let Some(off) = f.get("off").and_then(Value::as_u64) {
                if f["ev"].is_string() {
                    assert!(
                        off > self.since,
                        "{}: event {off} after {} (duplicate or out of order): {f}",
                        self.user,
                        self.since
                    );
                    self.since = off;
                    if f["ev"] == json!("message") {
                        self.got.push(off);
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_events_survive_random_sigkills_exactly_once() {
    let cycles = cycles();
    let seed = seed();
    eprintln!("crash harness: {cycles} cycle(s), SWITCHBOARD_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut s = ServerProcess::new();
    s.extra_env.extend([
        (
            "SWITCHBOARD_SNAPSHOT__EVERY_EVENTS".to_string(),
            "300".to_string(),
        ),
        ("SWITCHBOARD_SNAPSHOT__CRON".to_string(), String::new()),
    ]);
    s.start().await;

    let mut senders: Vec<Sender> = (0..SENDERS)
        .map(|_| Sender {
            user: uid("snd"),
            next: 0,
            acked: HashMap::new(),
            owed: Vec::new(),
        })
        .collect();
    let mut readers: Vec<Reader> = (0..READERS)
        .map(|_| Reader {
            user: uid("rdr"),
            got: Vec::new(),
            since: 0,
        })
        .collect();
    let members: Vec<&str> = senders
        .iter()
        .map(|x| x.user.as_str())
        .chain(readers.iter().map(|r| r.user.as_str()))
        .collect();
    let room = s.ep().http().create_room("crash", &members).await;
    let room_conv = format!("room:{room}");

    let mut total_acked = 0usize;
    let mut killed_in_flight = 0usize;
    let mut dups = 0usize;
    let mut recover_ms = Vec::new();
    for cycle in 0..cycles {
        let ep = s.ep();
        // Readers resume where they stopped.
        let mut rclients = Vec::new();
        for r in &readers {
            let c = ep.connect_since(&r.user, "listen", r.since).await;
            assert_eq!(c.hello_reply["resumed"], json!(true), "{}", c.hello_reply);
            assert_eq!(c.hello_reply["reset"], json!(false), "{}", c.hello_reply);
            rclients.push(c);
        }
        // Senders: first what is owed from the last cycle, then new messages.
        let mut tasks = Vec::new();
        for (i, snd) in senders.iter_mut().enumerate() {
            let mut frames = std::mem::take(&mut snd.owed);
            for _ in 0..PER_CYCLE {
                let n = snd.next;
                snd.next += 1;
                let cid = format!("c{n}");
                let body = json!({"n": n, "pad": "x".repeat(48)});
                let frame = if n % 3 == 2 {
                    json!({"op": "send", "conv": room_conv, "body": body, "cid": cid})
                } else {
                    let to = &readers[(n + i) % READERS].user;
                    json!({"op": "send", "to": to, "body": body, "cid": cid})
                };
                frames.push((cid, frame));
            }
            let ws = open_sender(&ep, &snd.user, "send").await;
            tasks.push(tokio::spawn(async move {
                (drive(ws, frames.clone()).await, frames)
            }));
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..700))).await;
        s.kill().await;

        let mut in_flight = 0;
        for (snd, t) in senders.iter_mut().zip(tasks) {
            let (d, frames) = tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("a sender ends within 20 s of the kill")
                .expect("sender task");
            let by_cid: HashMap<String, Value> = frames.into_iter().collect();
            for (cid, ack) in d.acks {
                let a = Ack {
                    off: u(&ack, "off"),
                    seq: u(&ack, "seq"),
                    ts: u(&ack, "ts"),
                    conv: ack["conv"].as_str().unwrap_or_default().to_string(),
                };
                if let Some(old) = snd.acked.insert(cid.clone(), a.clone()) {
                    assert_eq!(old, a, "{cid} acked twice differently");
                }
                total_acked += 1;
                if ack["dup"] == json!(true) {
                    // resent after a kill that took its answer: it had reached the log
                    dups += 1;
                }
            }
            assert!(
                d.errors
                    .iter()
                    .all(|(_, e)| e["error"]["code"] == json!("unavailable")),
                "unexpected error answers: {:?}",
                d.errors
            );
            in_flight += d.unanswered.len();
            for cid in d.errors.into_iter().map(|(c, _)| c).chain(d.unanswered) {
                let f = by_cid.get(&cid).expect("sent frame").clone();
                snd.owed.push((cid, f));
            }
            // Owed frames are resent oldest first (cid numbers in order).
            snd.owed
                .sort_by_key(|(cid, _)| cid[1..].parse::<u64>().unwrap_or(u64::MAX));
        }
        killed_in_flight += usize::from(in_flight > 0);
        for (r, c) in readers.iter_mut().zip(&rclients) {
            c.wait_closed().await;
            r.absorb(c);
        }
        drop(rclients);

        verify(&s).await;
        let events = dump(&s).await;
        let head = check_log(&events, &senders);
        for r in &readers {
            // Everything received so far is in the log for this reader, in order, once;
            // what is missing is only the tail the kill left undelivered.
            let want = messages_for(&events, &r.user);
            assert!(
                want.starts_with(&r.got),
                "{}: received {} messages that are not a prefix of the log's {}",
                r.user,
                r.got.len(),
                want.len()
            );
        }
        eprintln!(
            "cycle {}: head {head}, {} acked so far, {in_flight} unanswered at the kill",
            cycle + 1,
            senders.iter().map(|x| x.acked.len()).sum::<usize>()
        );

        let t0 = Instant::now();
        s.start().await;
        recover_ms.push(t0.elapsed().as_millis() as u64);
    }

    // Last resume: each reader's whole history equals the log's messages for it.
    let ep = s.ep();
    for r in &mut readers {
        let c = ep.connect_since(&r.user, "listen", r.since).await;
        assert_eq!(c.hello_reply["resumed"], json!(true), "{}", c.hello_reply);
        assert_eq!(c.hello_reply["reset"], json!(false), "{}", c.hello_reply);
        c.close().await;
        let _ = c.wait_closed().await;
        r.absorb(&c);
    }
    s.kill().await;
    verify(&s).await;
    let events = dump(&s).await;
    check_log(&events, &senders);
    for r in &readers {
        assert_eq!(
            r.got,
            messages_for(&events, &r.user),
            "{}: what the reader received over all resumes differs from the log",
            r.user
        );
    }
    let acked: usize = senders.iter().map(|x| x.acked.len()).sum();
    recover_ms.sort_unstable();
    eprintln!(
        "crash harness: {cycles} cycles, {acked} distinct messages acked ({total_acked} acks), \
         0 lost, {killed_in_flight} kills with sends in flight, {dups} resends found already \
         logged (dup), head {}, restart to /health median {} ms max {} ms",
        events.len(),
        recover_ms[recover_ms.len() / 2],
        recover_ms.last().copied().unwrap_or(0)
    );
    // The harness proves something only if the load really ran.
    assert!(acked > 0, "no message was acked");
}
