//! The sequencer: the single writer of the log and the only owner of State.
//!
//! One task drains its bounded command channel into a batch (at most `log.batch_max`),
//! validates each command against State, turns accepted ones into records with consecutive
//! offsets (applying each to State at once, so later commands of the batch see earlier
//! ones), then commits: one `sled` batch, one flush (group commit), fan-out of every record
//! and ephemeral frame, then every answer, all in command order.
//!
//! Invariants:
//! - nothing is answered `ok` before the records it reports are durable (per
//!   `log.durability`); if the append or flush fails every answer of the batch is
//!   `unavailable` and State is rebuilt from the log;
//! - reads that consult the store (`history`) commit first, so they see every earlier
//!   command; a `hello` commits first, so its `head` splits the log exactly between replay
//!   and live delivery;
//! - timers (presence grace, typing expiry) are entries of one `DelayQueue` owned here;
//!   what they cause is decided here like any command.

mod api_ops;
mod calls;
pub mod command;
mod heartbeat;
mod presence;
mod push_ops;
mod session_ops;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::time::DelayQueue;

use crate::config::{Config, Durability};
use crate::fanout::{Encoded, Outbound, Registry, SessionId};
use crate::log::event::Devices;
use crate::log::{Event, LogError, Record, Store};
use crate::protocol::{Codec, ProtoError};
use crate::state::State;
use crate::telemetry as m;

pub use command::{ApiCmd, ApiReply, ApiResult, Command, HelloCmd};

/// Facts the sequencer publishes for readers outside it (health, long-polls).
pub struct Shared {
    /// Offset of the newest durable, fanned-out record.
    pub head: watch::Sender<u64>,
    /// The retention floor: the oldest offset served (set by the sequencer only).
    pub floor: std::sync::atomic::AtomicU64,
    /// Sessions past hello.
    pub connections: AtomicUsize,
    pub started: Instant,
    /// Owed pushes scheduled by the push worker.
    pub push_queue: std::sync::atomic::AtomicU64,
    /// Pushes in the dead letters (moved there since start).
    pub push_dead: std::sync::atomic::AtomicU64,
    /// State and checkpoint of each SQL sink (written by the sync workers).
    pub sync_status: crate::sync::Status,
    /// `storage.max_bytes` (0: unlimited); a SIGHUP reload changes it live.
    pub max_bytes: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn new(head: u64) -> Shared {
        Shared {
            head: watch::Sender::new(head),
            floor: std::sync::atomic::AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            started: Instant::now(),
            push_queue: Default::default(),
            push_dead: Default::default(),
            sync_status: Default::default(),
            max_bytes: Default::default(),
        }
    }
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::Relaxed)
    }
}

/// The sequencer's settings, taken from [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub durability: Durability,
    pub batch_max: usize,
    pub max_replay_events: u64,
    pub max_connections: usize,
    pub max_devices_per_user: usize,
    pub max_room_members: usize,
    pub grace: Duration,
    pub typing_expire: Duration,
    pub call_drop_after: Duration,
    pub max_invitees: usize,
    /// Snapshot every this many events (0: never by count).
    pub snapshot_every: u64,
    pub snapshot_dir: std::path::PathBuf,
    pub snapshot_keep: usize,
    /// How owed pushes are made.
    pub push_jobs: crate::push::job::JobSettings,
    /// Configured push apps, (provider, name).
    pub push_apps: std::collections::HashSet<(crate::push::provider::ProviderKind, String)>,
    /// A session silent this long is a leftover for the sweep (twice the heartbeat timeout).
    pub stale_after: Duration,
    /// Pings, silence and token expiry of live sessions.
    pub heartbeat: heartbeat::Heartbeat,
}

impl Settings {
    pub fn from_config(c: &Config) -> Settings {
        Settings {
            durability: c.log.durability,
            batch_max: c.log.batch_max,
            max_replay_events: c.limits.max_replay_events,
            max_connections: c.limits.max_connections,
            max_devices_per_user: c.limits.max_devices_per_user,
            max_room_members: c.limits.max_room_members,
            grace: Duration::from_millis(c.presence.grace_ms),
            typing_expire: Duration::from_millis(c.typing.expire_ms),
            call_drop_after: Duration::from_millis(c.calls.drop_after_ms),
            max_invitees: c.calls.max_invitees,
            snapshot_every: c.snapshot.every_events,
            snapshot_dir: crate::snapshot::dir_of(&c.storage.dir),
            snapshot_keep: c.snapshot.keep,
            push_jobs: crate::push::job::JobSettings {
                enabled: c.push.enabled
                    && !(c.push.fcm.apps.is_empty() && c.push.apns.apps.is_empty()),
                delay_ms: if c.push.delay_ms == 0 {
                    c.presence.grace_ms
                } else {
                    c.push.delay_ms
                },
                deadline_ms: c.push.deadline_s.saturating_mul(1000),
                preview: c.push.preview,
                preview_max_chars: c.push.preview_max_chars,
            },
            push_apps: c
                .push
                .fcm
                .apps
                .iter()
                .map(|a| (crate::push::provider::ProviderKind::Fcm, a.name.clone()))
                .chain(c.push.apns.apps.iter().flat_map(|a| {
                    [
                        (crate::push::provider::ProviderKind::Apns, a.name.clone()),
                        (
                            crate::push::provider::ProviderKind::ApnsVoip,
                            a.name.clone(),
                        ),
                    ]
                }))
                .collect(),
            stale_after: Duration::from_millis(c.heartbeat.timeout_ms.saturating_mul(2)),
            heartbeat: heartbeat::Heartbeat::new(c.heartbeat.interval_ms, c.heartbeat.timeout_ms),
        }
    }
}

/// Time-driven commands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Timer {
    PresenceGrace {
        user: String,
        gen: u64,
    },
    TypingExpire {
        conv: String,
        user: String,
        gen: u64,
    },
    /// A call's ring time is over.
    Ring {
        call: String,
    },
    /// One minute of a call's time limit is left.
    TimeWarning {
        call: String,
    },
    /// A call's time limit is reached.
    TimeLimit {
        call: String,
    },
    /// A call participant's last device has been gone for `calls.drop_after_ms`.
    CallDrop {
        user: String,
        gen: u64,
    },
    /// Time to write the durable watermark (see [`crate::log::watermark`]).
    Watermark,
    /// A heartbeat tick over the live sessions (see [`heartbeat`]); always armed.
    Heartbeat,
}

/// Where an answer goes.
enum AnswerTo {
    Session { id: SessionId, re: Option<u32> },
    Api(oneshot::Sender<ApiResult>),
}

/// Something to do after the batch is durable, in order.
enum Effect {
    /// Fan out `pending[idx]` to every device of its audience.
    Deliver { idx: usize },
    /// An ephemeral frame to the live sessions of `users`.
    Ephemeral { users: Vec<String>, frame: Value },
    /// An answer; `live_of` adds `"live": <sessions reached by pending[i]>`.
    Answer {
        to: AnswerTo,
        result: Result<ApiReply, ProtoError>,
        live_of: Option<usize>,
    },
}

/// `{"re": id, "ok": true, ...body}`.
#[derive(Serialize)]
struct OkFrame<'a> {
    re: Option<u32>,
    ok: bool,
    #[serde(flatten)]
    body: &'a Value,
}

#[derive(Serialize)]
struct ErrBody<'a> {
    code: &'static str,
    message: &'a str,
}

/// `{"re": id, "ok": false, "error": {...}}`.
#[derive(Serialize)]
struct ErrFrame<'a> {
    re: Option<u32>,
    ok: bool,
    error: ErrBody<'a>,
}

/// Encodes a reply frame for a session.
pub fn encode_reply(
    codec: Codec,
    re: Option<u32>,
    result: &Result<Value, ProtoError>,
) -> Option<bytes::Bytes> {
    let out = match result {
        Ok(body) => codec.encode(&OkFrame { re, ok: true, body }),
        Err(e) => codec.encode(&ErrFrame {
            re,
            ok: false,
            error: ErrBody {
                code: e.code.as_str(),
                message: &e.message,
            },
        }),
    };
    match out {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, "reply could not be encoded");
            None
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unavailable(e: &LogError) -> ProtoError {
    ProtoError::unavailable(format!("the event log cannot be written: {e}"))
}

/// Replays the whole log into a fresh State, checking continuity.
pub fn rebuild(store: &Store) -> Result<State, LogError> {
    match crate::snapshot::replay_from(store, State::new()) {
        Ok((state, _)) => Ok(state),
        Err(crate::snapshot::SnapshotError::Log(e)) => Err(e),
        Err(e) => Err(LogError::Corrupt {
            off: 0,
            reason: e.to_string(),
        }),
    }
}

pub struct Sequencer {
    settings: Settings,
    store: Store,
    state: State,
    registry: Registry,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    timers: DelayQueue<Timer>,
    /// Users whose last device left and whose grace timer is pending: the generation of
    /// that timer (an older one, or one for a user who came back, is stale). Only users in
    /// grace are here, so an online user costs this map nothing.
    grace: HashMap<String, u64>,
    /// Unix ms when each user's last device left (their `last_seen` once offline).
    last_disconnect: HashMap<String, u64>,
    /// Generation of the newest call-drop timer per user.
    call_drop_gen: HashMap<String, u64>,
    /// Active typing indicators: (conv, user) -> generation of the newest renewal.
    typing: HashMap<(String, String), u64>,
    next_gen: u64,
    /// Counts heartbeat ticks: whose turn it is to be pinged.
    heartbeat_turn: u64,
    draining: bool,
    // The batch being built.
    committed_head: u64,
    pending: Vec<Record>,
    effects: Vec<Effect>,
    pending_dedupe: HashMap<(String, String), u64>,
    /// Outbox jobs owed by the batch's records, written in the same sled batch.
    pending_jobs: Vec<crate::push::job::Job>,
    /// Offset of the last snapshot taken (or loaded).
    last_snapshot: u64,
    snapshot_job: Option<tokio::task::JoinHandle<()>>,
    /// New outbox jobs go to the push worker: (outbox key, due unix ms).
    push_tx: Option<mpsc::Sender<(Vec<u8>, u64)>>,
    last_ts: u64,
    /// The retention floor (see [`Command::SetFloor`]).
    floor: u64,
    /// Set after a failed append, while State may hold records the log does not: until
    /// [`Sequencer::recover`] succeeds no batch is written (all are answered `unavailable`).
    recovery: Option<Recovery>,
    /// The offset in the watermark file (or being written to it), and whether a
    /// [`Timer::Watermark`] is armed.
    watermark: u64,
    watermark_armed: bool,
    watermark_job: Option<tokio::task::JoinHandle<()>>,
}

/// What is left to do after a failed append.
#[derive(Debug)]
struct Recovery {
    /// The failure came from storage: sled's I/O errors are sticky, so the store must be
    /// closed and opened again before it takes writes.
    reopen: bool,
    last_try: Option<Instant>,
}

/// How long a reopen waits for the old opening's last handle (and sled's lock) to go.
const REOPEN_WAIT: Duration = Duration::from_secs(2);
/// The watermark trails the flushed head by at most this much.
const WATERMARK_EVERY: Duration = Duration::from_secs(1);
/// How often a recovery that failed is tried again.
const RECOVERY_RETRY: Duration = Duration::from_millis(500);

impl Sequencer {
    /// A sequencer over `store`, with State rebuilt from it.
    pub fn new(
        settings: Settings,
        store: Store,
        state: State,
        rx: mpsc::Receiver<Command>,
        shared: Arc<Shared>,
    ) -> Sequencer {
        let head = state.head;
        let last_ts = state.last_ts;
        let floor = shared.floor();
        // The newest snapshot on disk (none: the next snapshot command writes one).
        let last_snapshot = crate::snapshot::range(&settings.snapshot_dir)
            .map_or(0, |(_, newest)| newest.min(head));
        let mut s = Sequencer {
            settings,
            store,
            state,
            registry: Registry::default(),
            rx,
            shared,
            timers: DelayQueue::new(),
            grace: HashMap::new(),
            last_disconnect: HashMap::new(),
            typing: HashMap::new(),
            call_drop_gen: HashMap::new(),
            next_gen: 0,
            heartbeat_turn: 0,
            draining: false,
            committed_head: head,
            pending: Vec::new(),
            effects: Vec::new(),
            pending_dedupe: HashMap::new(),
            pending_jobs: Vec::new(),
            last_snapshot,
            snapshot_job: None,
            push_tx: None,
            last_ts,
            floor,
            recovery: None,
            watermark: 0,
            watermark_armed: false,
            watermark_job: None,
        };
        s.arm_presence_after_restart();
        s.arm_calls_after_restart();
        s.arm_heartbeat();
        s
    }

    /// New outbox jobs are announced to the push worker on `tx`.
    pub fn set_push_worker(&mut self, tx: mpsc::Sender<(Vec<u8>, u64)>) {
        self.push_tx = Some(tx);
    }

    /// Runs until a [`Command::Stop`] (or every sender is gone).
    pub async fn run(mut self) {
        loop {
            if self.recovery.is_some() {
                self.recover().await;
            }
            let next = tokio::select! {
                biased;
                cmd = self.rx.recv() => cmd.map(Next::Cmd).unwrap_or(Next::Closed),
                Some(t) = std::future::poll_fn(|cx| self.timers.poll_expired(cx)), if !self.timers.is_empty() => Next::Timer(t.into_inner()),
            };
            match next {
                Next::Closed => break,
                Next::Timer(t) => {
                    self.on_timer(t);
                    self.commit().await;
                }
                Next::Cmd(cmd) => {
                    if let Some(stop) = self.take_batch(cmd).await {
                        self.commit().await;
                        if let Err(e) = self.store.flush().await {
                            tracing::error!(error = %e, "final flush failed");
                        }
                        self.final_snapshot().await;
                        self.final_watermark().await;
                        let _ = stop.send(());
                        return;
                    }
                    self.commit().await;
                }
            }
        }
        self.commit().await;
        if let Err(e) = self.store.flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
    }

    /// Handles `first` and whatever else is queued, up to `batch_max` commands.
    async fn take_batch(&mut self, first: Command) -> Option<oneshot::Sender<()>> {
        let mut cmd = first;
        let mut n = 1;
        loop {
            if let Some(stop) = self.handle(cmd).await {
                return Some(stop);
            }
            if n >= self.settings.batch_max {
                return None;
            }
            match self.rx.try_recv() {
                Ok(c) => {
                    cmd = c;
                    n += 1;
                }
                Err(_) => return None,
            }
        }
    }

    async fn handle(&mut self, cmd: Command) -> Option<oneshot::Sender<()>> {
        match cmd {
            Command::Hello(h) => self.hello(*h).await,
            Command::Goodbye { session } => self.drop_session(session),
            Command::Op { session, id, op } => self.op(session, id, op).await,
            Command::Refresh {
                session,
                id,
                exp,
                iat,
            } => self.refresh(session, id, exp, iat),
            Command::Reject { session, id, error } => self.answer(
                AnswerTo::Session {
                    id: session,
                    re: id,
                },
                Err(error),
                None,
            ),
            Command::Api(cmd, tx) => self.api(cmd, tx).await,
            Command::PushTokenDead {
                user,
                device,
                provider,
                token,
                reason,
            } => self.push_token_dead(&user, &device, provider, token, reason, None),
            Command::Snapshot => self.snapshot_now(),
            Command::SetFloor { floor, done } => {
                self.commit().await;
                let _ = done.send(self.set_floor(floor).await);
            }
            Command::Sweep => {
                self.sweep();
            }
            Command::Drain => self.drain(),
            Command::Stop(tx) => return Some(tx),
        }
        None
    }

    // ----- building the batch -------------------------------------------------------

    /// Appends a new record to the batch and applies it to State. Returns its index in
    /// the batch, offset and timestamp.
    fn emit(&mut self, to: Vec<String>, event: Event) -> (usize, u64, u64) {
        let ts = self.stamp();
        self.emit_at(to, event, ts)
    }

    /// A timestamp for the next record: wall clock, never below the previous one.
    fn stamp(&mut self) -> u64 {
        let ts = now_ms().max(self.last_ts);
        self.last_ts = ts;
        ts
    }

    /// The offset the next emitted record gets.
    fn next_off(&self) -> u64 {
        self.committed_head + self.pending.len() as u64 + 1
    }

    /// [`Sequencer::emit`] with a timestamp taken by [`Sequencer::stamp`].
    fn emit_at(&mut self, to: Vec<String>, event: Event, ts: u64) -> (usize, u64, u64) {
        let off = self.next_off();
        let record = Record { off, ts, to, event };
        self.state.apply(&record);
        self.owe_pushes(&record);
        let idx = self.pending.len();
        self.pending.push(record);
        self.effects.push(Effect::Deliver { idx });
        (idx, off, ts)
    }

    fn ephemeral(&mut self, users: Vec<String>, frame: Value) {
        self.effects.push(Effect::Ephemeral { users, frame });
    }

    fn answer(&mut self, to: AnswerTo, result: Result<Value, ProtoError>, live_of: Option<usize>) {
        let result = result.map(|body| ApiReply { status: 200, body });
        self.effects.push(Effect::Answer {
            to,
            result,
            live_of,
        });
    }

    fn answer_api(
        &mut self,
        tx: oneshot::Sender<ApiResult>,
        result: ApiResult,
        live_of: Option<usize>,
    ) {
        self.effects.push(Effect::Answer {
            to: AnswerTo::Api(tx),
            result,
            live_of,
        });
    }

    /// A record by offset, from the batch or the store.
    fn record(&self, off: u64) -> Result<Option<Record>, LogError> {
        if off > self.committed_head {
            let i = (off - self.committed_head - 1) as usize;
            return Ok(self.pending.get(i).cloned());
        }
        self.store.get(off)
    }

    // ----- committing -----------------------------------------------------------------

    /// Makes the batch durable, then fans out and answers. Loops while fan-out itself
    /// produces effects (a slow consumer's departure changes presence).
    async fn commit(&mut self) {
        while !self.effects.is_empty() {
            self.commit_once().await;
        }
        if self.settings.durability == Durability::Flush
            && self.committed_head > self.watermark
            && !self.watermark_armed
        {
            self.timers.insert(Timer::Watermark, WATERMARK_EVERY);
            self.watermark_armed = true;
        }
        let every = self.settings.snapshot_every;
        if every > 0 && self.committed_head >= self.last_snapshot + every {
            self.snapshot_now();
        }
    }

    /// At shutdown: a snapshot at the final head, so the next start replays nothing.
    async fn final_snapshot(&mut self) {
        if let Some(j) = self.snapshot_job.take() {
            let _ = j.await;
        }
        if self.settings.snapshot_every > 0 {
            self.snapshot_now();
            if let Some(j) = self.snapshot_job.take() {
                let _ = j.await;
            }
        }
    }

    /// Writes the flushed head to the watermark file on a blocking thread, one write at a
    /// time (a write still under way re-arms the timer). Only with `durability = flush`,
    /// where the committed head is the flushed head.
    fn write_watermark(&mut self) {
        if self.recovery.is_some() || self.committed_head <= self.watermark {
            return;
        }
        if self
            .watermark_job
            .as_ref()
            .is_some_and(|j| !j.is_finished())
        {
            self.timers.insert(Timer::Watermark, WATERMARK_EVERY);
            self.watermark_armed = true;
            return;
        }
        let (dir, off) = (self.store.dir().to_path_buf(), self.committed_head);
        self.watermark = off;
        self.watermark_job = Some(tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::log::watermark::write(&dir, off) {
                tracing::error!(error = %e, off, "watermark write failed");
            }
        }));
    }

    /// At shutdown, after the final flush: the watermark at the final head.
    async fn final_watermark(&mut self) {
        if self.settings.durability != Durability::Flush {
            return;
        }
        if let Some(j) = self.watermark_job.take() {
            let _ = j.await;
        }
        self.write_watermark();
        if let Some(j) = self.watermark_job.take() {
            let _ = j.await;
        }
    }

    /// Moves the retention floor up to `floor` (clamped to `committed_head + 1`) and makes
    /// it durable before answering, so nothing below it is deleted while a restart could
    /// still offer it. Returns the floor in force.
    async fn set_floor(&mut self, floor: u64) -> Result<u64, LogError> {
        let floor = floor.min(self.committed_head + 1);
        if floor <= self.floor {
            return Ok(self.floor);
        }
        self.store.set_floor(floor)?;
        self.store.flush().await?;
        self.floor = floor;
        self.shared.floor.store(floor, Ordering::Relaxed);
        metrics::gauge!(m::RETENTION_FLOOR).set(floor as f64);
        tracing::info!(floor, head = self.committed_head, "retention floor moved");
        Ok(floor)
    }

    /// Hands a copy of State (committed: nothing is pending here) to a blocking thread
    /// that writes it; one write at a time.
    fn snapshot_now(&mut self) {
        if !self.pending.is_empty()
            || self.committed_head == self.last_snapshot
            || self.recovery.is_some()
        {
            return;
        }
        if self.snapshot_job.as_ref().is_some_and(|j| !j.is_finished()) {
            return;
        }
        let state = self.state.clone();
        let dir = self.settings.snapshot_dir.clone();
        let keep = self.settings.snapshot_keep;
        self.last_snapshot = self.committed_head;
        self.snapshot_job = Some(tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            match crate::snapshot::write(&dir, &state, keep) {
                Ok(path) => {
                    tracing::info!(off = state.head, ms = t0.elapsed().as_millis() as u64, path = %path.display(), "snapshot written")
                }
                Err(e) => tracing::error!(error = %e, "snapshot failed"),
            }
        }));
    }

    async fn commit_once(&mut self) {
        let records = std::mem::take(&mut self.pending);
        let effects = std::mem::take(&mut self.effects);
        let jobs = std::mem::take(&mut self.pending_jobs);
        self.pending_dedupe.clear();
        let result = if records.is_empty() {
            Ok(())
        } else if self.recovery.is_some() {
            // Built on a State that may not be the log's: never written.
            Err(LogError::Closed)
        } else {
            let t0 = Instant::now();
            let r = self.append(&records, &jobs).await;
            metrics::histogram!(m::FLUSH_SECONDS).record(t0.elapsed().as_secs_f64());
            metrics::histogram!(m::BATCH_EVENTS).record(records.len() as f64);
            r
        };
        if let Err(e) = result {
            tracing::error!(error = %e, events = records.len(), "append failed; answering unavailable and rebuilding state");
            metrics::counter!(m::APPEND_FAILURES).increment(1);
            let err = unavailable(&e);
            for effect in effects {
                if let Effect::Answer { to, .. } = effect {
                    self.send_answer(to, Err(err.clone()));
                }
            }
            let storage = matches!(e, LogError::Sled(_) | LogError::Closed);
            let r = self.recovery.get_or_insert(Recovery {
                reopen: false,
                last_try: None,
            });
            r.reopen |= storage;
            r.last_try = None;
            self.recover().await;
            return;
        }
        if let Some(tx) = &self.push_tx {
            for j in &jobs {
                // A full channel is fine: the worker rescans the outbox.
                let _ = tx.try_send((j.key(), j.due_ms));
            }
        }
        if let Some(last) = records.last() {
            self.committed_head = last.off;
            metrics::counter!(m::EVENTS_APPENDED).increment(records.len() as u64);
        }
        let mut reached = vec![0usize; records.len()];
        let mut dead = Vec::new();
        for effect in effects {
            match effect {
                Effect::Deliver { idx } => {
                    let (n, d) = self.deliver(&records[idx]);
                    reached[idx] = n;
                    dead.extend(d);
                }
                Effect::Ephemeral { users, frame } => {
                    let mut enc = Encoded::new(&frame);
                    let (_, d) = self.registry.deliver(&users, Devices::All, None, &mut enc);
                    dead.extend(d);
                }
                Effect::Answer {
                    to,
                    result,
                    live_of,
                } => {
                    let result = match (result, live_of) {
                        (Ok(mut reply), Some(i)) => {
                            if let Value::Object(map) = &mut reply.body {
                                map.insert("live".into(), Value::from(reached[i]));
                            }
                            Ok(reply)
                        }
                        (r, _) => r,
                    };
                    if let Some(id) = self.send_answer(to, result) {
                        dead.push(id);
                    }
                }
            }
        }
        self.shared.head.send_replace(self.committed_head);
        for id in dead {
            self.drop_session(id);
        }
    }

    /// Fans a durable record out to every live device of its audience; returns how many
    /// sessions it reached and the sessions whose queue was full.
    fn deliver(&self, r: &Record) -> (usize, Vec<SessionId>) {
        let wire = r.wire();
        let mut enc = Encoded::new(&wire);
        self.registry
            .deliver(&r.to, r.event.devices(), Some(r.off), &mut enc)
    }

    /// Brings State back to the log after a failed append: reopens the store first when the
    /// failure came from storage, then loads the newest snapshot and replays the tail (what
    /// a restart does). Records of the failed batch that did reach the disk before the
    /// error (their senders were told `unavailable`; a resend with the same `cid` finds
    /// them) are fanned out now, so live sessions see no gap. On failure it stays in
    /// recovery and is tried again, at most every [`RECOVERY_RETRY`].
    async fn recover(&mut self) {
        let Some(r) = &mut self.recovery else {
            return;
        };
        if r.last_try.is_some_and(|t| t.elapsed() < RECOVERY_RETRY) {
            return;
        }
        r.last_try = Some(Instant::now());
        if r.reopen {
            let store = self.store.clone();
            let t0 = Instant::now();
            let reopened = tokio::task::spawn_blocking(move || store.reopen(REOPEN_WAIT))
                .await
                .unwrap_or_else(|e| {
                    Err(LogError::Corrupt {
                        off: 0,
                        reason: format!("reopen task: {e}"),
                    })
                });
            let ms = t0.elapsed().as_millis() as u64;
            match reopened {
                Ok(()) => {
                    metrics::counter!(m::STORE_REOPENS, "outcome" => "ok").increment(1);
                    tracing::warn!(ms, "store reopened after a storage error");
                    r.reopen = false;
                }
                Err(e) => {
                    metrics::counter!(m::STORE_REOPENS, "outcome" => "failed").increment(1);
                    tracing::error!(error = %e, ms, "store reopen failed; writes are refused until a retry succeeds");
                    return;
                }
            }
        }
        let dir = self.settings.snapshot_dir.clone();
        let state = match crate::snapshot::load(&self.store, &dir) {
            Ok((state, _)) => state,
            Err(e) => {
                tracing::error!(error = %e, "state rebuild failed; writes are refused until a retry succeeds");
                if let (
                    crate::snapshot::SnapshotError::Log(LogError::Sled(_) | LogError::Closed),
                    Some(r),
                ) = (&e, self.recovery.as_mut())
                {
                    r.reopen = true;
                }
                return;
            }
        };
        let before = self.committed_head;
        self.state = state;
        self.committed_head = self.state.head;
        self.last_ts = self.last_ts.max(self.state.last_ts);
        self.recovery = None;
        if self.committed_head < before {
            // Only possible when acks do not wait for the disk (`log.durability` other
            // than `flush`): what was acked but not yet flushed is gone, as after a crash.
            tracing::error!(
                lost = before - self.committed_head,
                head = self.committed_head,
                "events acknowledged before the storage error did not reach the disk"
            );
        }
        let mut dead = Vec::new();
        for off in before + 1..=self.committed_head {
            match self.store.get(off) {
                Ok(Some(r)) => dead.extend(self.deliver(&r).1),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, off, "cannot read a recovered event"),
            }
        }
        tracing::info!(
            head = self.committed_head,
            recovered = self.committed_head.saturating_sub(before),
            "state rebuilt from the log"
        );
        self.shared.head.send_replace(self.committed_head);
        for id in dead {
            self.drop_session(id);
        }
    }

    async fn append(
        &self,
        records: &[Record],
        jobs: &[crate::push::job::Job],
    ) -> Result<(), LogError> {
        let max = self.shared.max_bytes.load(Ordering::Relaxed);
        if max > 0 {
            let size = self.store.size_on_disk();
            if size >= max {
                metrics::counter!(m::LOG_FULL).increment(1);
                return Err(LogError::Full { size, max });
            }
        }
        let extra: Vec<(Vec<u8>, Vec<u8>)> = jobs.iter().map(|j| (j.key(), j.encode())).collect();
        self.store.append_with(records, &extra)?;
        if self.settings.durability == Durability::Flush {
            self.store.flush().await?;
        }
        Ok(())
    }

    /// Sends one answer; returns a session that must be dropped (its queue was full).
    fn send_answer(&self, to: AnswerTo, result: ApiResult) -> Option<SessionId> {
        match to {
            AnswerTo::Api(tx) => {
                let _ = tx.send(result);
                None
            }
            AnswerTo::Session { id, re } => {
                if re.is_none() && result.is_ok() {
                    return None;
                }
                let h = self.registry.get(id)?;
                let bytes = encode_reply(h.codec, re, &result.map(|r| r.body))?;
                self.registry.send_to(id, Outbound::Frame(bytes)).err()
            }
        }
    }

    // ----- timers ---------------------------------------------------------------------

    fn on_timer(&mut self, t: Timer) {
        match t {
            Timer::PresenceGrace { user, gen } => self.presence_grace_expired(&user, gen),
            Timer::TypingExpire { conv, user, gen } => self.typing_expired(conv, user, gen),
            Timer::Ring { call } => self.ring_expired(&call),
            Timer::TimeWarning { call } => self.time_warning(&call),
            Timer::TimeLimit { call } => self.time_limit(&call),
            Timer::CallDrop { user, gen } => self.call_drop(&user, gen),
            Timer::Watermark => {
                self.watermark_armed = false;
                self.write_watermark();
            }
            Timer::Heartbeat => self.heartbeat_tick(),
        }
    }

    /// Shutdown begins: every live session is asked to close with 4000 (they say goodbye
    /// and presence stays as it is, so a restart within the grace period shows no one
    /// leaving); a hello from now on is refused.
    fn drain(&mut self) {
        self.draining = true;
        for h in self.registry.all() {
            h.ctl.close_with(crate::protocol::CloseCode::ShuttingDown);
        }
    }

    fn bump_gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }
}

enum Next {
    Cmd(Command),
    Timer(Timer),
    Closed,
}

#[cfg(test)]
mod tests;
