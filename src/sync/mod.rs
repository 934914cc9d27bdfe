//! Background SQL sync: one worker per configured sink copies the event log into relational
//! tables (PostgreSQL in [`postgres`], SQL Server in [`mssql`]).
//!
//! The worker only *reads* the log (`Store::records`, bounded by the durable head the
//! sequencer publishes), so a database that is down, slow or refusing logins never slows
//! the broker. Each batch (at most `sync.batch_max` events, or what arrived within
//! `sync.batch_ms`) becomes one database transaction holding its rows **and** the new
//! checkpoint (`sync_checkpoint`), so a crash re-sends at most the uncommitted batch; every
//! write is idempotent on `off` anyway (insert-if-absent, monotonic upserts).
//!
//! Tables (columns in `schema/postgres/0001_init.sql`, twin `schema/mssql/0001_init.sql`):
//!
//! ```text
//! messages       off PK, conv, seq, sender, device, cid, body (JSON), sent_at   <- message
//! receipts       (conv, user, kind) PK, seq, at, off: latest, seq only grows    <- receipt
//! conversations  id PK, kind, name, members (JSON), last_seq, last_at, ...      <- room.*, message
//! presence_log   off PK, user, status, devices, scope, at                       <- presence
//! calls          id PK, initiator, media, invited, started_at, answered_at,
//!                ended_at, end_reason, ended_by, duration_ms                     <- call.invite/accepted/ended
//! notices        off PK, user, type, data (JSON), at                            <- notice
//! sync_checkpoint sink PK, off                                                   <- every batch
//! switchboard_schema version PK, name, applied_at                               <- migrations
//! ```
//!
//! Outages: connect + migrate + read checkpoint, then write batches; any error drops the
//! connection, marks the sink down (logged once per state change), and retries with capped
//! exponential backoff and full jitter. Lag (`head - checkpoint`) and state are published as
//! metrics and in [`Status`] (shown by `GET /v1/stats` under `sync`).

pub mod mssql;
pub mod postgres;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::SyncConfig;
use crate::log::event::{EndReason, Event, Media, MemberChange, PresenceScope, Status as Presence};
use crate::log::{LogError, Record, Store};
use crate::protocol::frames::ReceiptKind;

/// Events between a sink's checkpoint and the log head, by sink (gauge).
pub const SYNC_LAG: &str = "switchboard_sync_lag_events";
/// 1 while a sink is connected and writing, 0 while it is down, by sink (gauge).
pub const SYNC_STATE: &str = "switchboard_sync_state";
/// Events written to a sink, by sink (counter).
pub const SYNC_EVENTS: &str = "switchboard_sync_events_total";
/// Failed connects or batch writes, by sink (counter).
pub const SYNC_ERRORS: &str = "switchboard_sync_errors_total";
/// Time to write one batch transaction, seconds, by sink (histogram).
pub const SYNC_BATCH_SECONDS: &str = "switchboard_sync_batch_seconds";

/// Longest a connect (TCP + login + migrations) may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest one batch transaction may take (a hung database counts as down).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long shutdown lets a batch in flight finish before abandoning it (it rolls back).
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A failure of a sink (never of the broker).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("sql server: {0}")]
    Mssql(#[from] tiberius::error::Error),
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error("{0}")]
    Timeout(&'static str),
    #[error("bad connection string: {0}")]
    Url(String),
    #[error("migration {version} ({name}): {reason}")]
    Migration {
        version: i32,
        name: &'static str,
        reason: String,
    },
    #[error("checkpoint of sink {sink} is {found} in the database, expected {expected} (another writer?)")]
    CheckpointMoved {
        sink: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("unexpected data from the database: {0}")]
    Data(String),
}

/// One numbered migration (embedded SQL file).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

// ---------------------------------------------------------------------------------------------
// status shared with /v1/stats

/// What one sink last reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkStatus {
    pub up: bool,
    /// The committed checkpoint (`None` until the database was first reached).
    pub checkpoint: Option<u64>,
    /// The last error while down.
    pub error: Option<String>,
}

/// Per-sink status, written by the workers, read by `/v1/stats`.
#[derive(Debug, Default)]
pub struct Status {
    sinks: Mutex<BTreeMap<String, SinkStatus>>,
}

impl Status {
    fn update(&self, sink: &str, f: impl FnOnce(&mut SinkStatus)) {
        if let Ok(mut m) = self.sinks.lock() {
            f(m.entry(sink.to_string()).or_default());
        }
    }

    /// One sink's status.
    pub fn get(&self, sink: &str) -> Option<SinkStatus> {
        self.sinks.lock().ok().and_then(|m| m.get(sink).cloned())
    }

    /// `{"<sink>": {"state": "up"|"down", "checkpoint", "lag", "error"}}` against `head`.
    pub fn to_json(&self, head: u64) -> Value {
        let Ok(m) = self.sinks.lock() else {
            return json!({});
        };
        let mut out = serde_json::Map::new();
        for (name, s) in m.iter() {
            out.insert(
                name.clone(),
                json!({
                    "state": if s.up { "up" } else { "down" },
                    "checkpoint": s.checkpoint,
                    "lag": s.checkpoint.map(|c| head.saturating_sub(c)),
                    "error": s.error,
                }),
            );
        }
        Value::Object(out)
    }
}

// ---------------------------------------------------------------------------------------------
// rows: what a batch of records becomes

#[derive(Debug, Clone, PartialEq)]
pub struct MessageRow {
    pub off: i64,
    pub conv: String,
    pub seq: i64,
    pub sender: String,
    pub device: Option<String>,
    pub cid: Option<String>,
    /// JSON text.
    pub body: String,
    pub ts: i64,
}

/// The latest receipt of the batch per (conv, user, kind).
#[derive(Debug, Clone, PartialEq)]
pub struct ReceiptRow {
    pub conv: String,
    pub user: String,
    pub kind: &'static str,
    pub seq: i64,
    pub ts: i64,
    pub off: i64,
}

/// The newest message of the batch per conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvTouch {
    pub id: String,
    pub kind: &'static str,
    /// JSON array (the two users of a dm; `[]` for a room, whose members come from room events).
    pub members: String,
    pub first_ts: i64,
    pub last_seq: i64,
    pub last_ts: i64,
    pub last_off: i64,
}

/// A room event, applied in order to the room's member list.
#[derive(Debug, Clone, PartialEq)]
pub enum RoomOp {
    Created {
        conv: String,
        name: String,
        members: Vec<String>,
        off: i64,
        ts: i64,
    },
    Member {
        conv: String,
        user: String,
        joined: bool,
        off: i64,
    },
}

impl RoomOp {
    pub fn conv(&self) -> &str {
        match self {
            RoomOp::Created { conv, .. } | RoomOp::Member { conv, .. } => conv,
        }
    }
}

/// A room's row after the batch's room events.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomRow {
    pub id: String,
    pub name: Option<String>,
    /// JSON array, sorted.
    pub members: String,
    pub members_off: i64,
    pub created_ts: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PresenceRow {
    pub off: i64,
    pub user: String,
    pub status: &'static str,
    pub devices: i32,
    pub scope: &'static str,
    pub ts: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CallInviteRow {
    pub id: String,
    pub initiator: String,
    pub device: String,
    pub media: &'static str,
    /// JSON array.
    pub invited: String,
    pub ts: i64,
    pub off: i64,
}

/// The first `call.accepted` of the batch per call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallAcceptRow {
    pub id: String,
    pub user: String,
    pub ts: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CallEndRow {
    pub id: String,
    pub reason: &'static str,
    pub by: Option<String>,
    pub duration_ms: i64,
    pub ts: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NoticeRow {
    pub off: i64,
    pub user: String,
    pub kind: String,
    /// JSON text.
    pub data: String,
    pub ts: i64,
}

/// Everything one transaction writes: the rows of records `(after, last]`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    /// The checkpoint the batch starts from (the database must hold exactly this).
    pub after: u64,
    /// The checkpoint it commits.
    pub last: u64,
    pub events: usize,
    pub messages: Vec<MessageRow>,
    pub receipts: Vec<ReceiptRow>,
    pub convs: Vec<ConvTouch>,
    pub rooms: Vec<RoomOp>,
    pub presence: Vec<PresenceRow>,
    pub call_invites: Vec<CallInviteRow>,
    pub call_accepts: Vec<CallAcceptRow>,
    pub call_ends: Vec<CallEndRow>,
    pub notices: Vec<NoticeRow>,
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn json_text(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_string())
}

pub fn receipt_kind(k: ReceiptKind) -> &'static str {
    match k {
        ReceiptKind::Delivered => "delivered",
        ReceiptKind::Read => "read",
    }
}

fn presence_status(s: Presence) -> &'static str {
    match s {
        Presence::Online => "online",
        Presence::Away => "away",
        Presence::Busy => "busy",
        Presence::Invisible => "invisible",
        Presence::Offline => "offline",
    }
}

fn media(m: Media) -> &'static str {
    match m {
        Media::Audio => "audio",
        Media::Video => "video",
    }
}

fn end_reason(r: EndReason) -> &'static str {
    match r {
        EndReason::Hangup => "hangup",
        EndReason::Rejected => "rejected",
        EndReason::NoAnswer => "no_answer",
        EndReason::Busy => "busy",
        EndReason::TimeLimit => "time_limit",
    }
}

/// The two users of `dm:<a>:<b>`, as a JSON array.
fn dm_members(conv: &str) -> String {
    match conv.strip_prefix("dm:").and_then(|r| r.split_once(':')) {
        Some((a, b)) => json_text(&[a, b]),
        None => "[]".to_string(),
    }
}

impl Batch {
    /// Turns consecutive records after `after` into rows. Events no table keeps (signals,
    /// media, push tokens, ...) only move the checkpoint.
    pub fn build(after: u64, records: &[Record]) -> Batch {
        let mut b = Batch {
            after,
            last: records.last().map(|r| r.off).unwrap_or(after),
            events: records.len(),
            ..Default::default()
        };
        let mut receipts: HashMap<(String, String, &'static str), usize> = HashMap::new();
        let mut convs: HashMap<String, usize> = HashMap::new();
        let mut accepted: HashSet<String> = HashSet::new();
        for r in records {
            let (off, ts) = (i(r.off), i(r.ts));
            match &r.event {
                Event::Message(m) => {
                    b.messages.push(MessageRow {
                        off,
                        conv: m.conv.clone(),
                        seq: i(m.seq),
                        sender: m.from.clone(),
                        device: m.device.clone(),
                        cid: m.cid.clone(),
                        body: json_text(&m.body),
                        ts,
                    });
                    match convs.get(&m.conv) {
                        Some(&idx) => {
                            let c = &mut b.convs[idx];
                            c.last_seq = i(m.seq);
                            c.last_ts = ts;
                            c.last_off = off;
                        }
                        None => {
                            let is_dm = m.conv.starts_with("dm:");
                            convs.insert(m.conv.clone(), b.convs.len());
                            b.convs.push(ConvTouch {
                                id: m.conv.clone(),
                                kind: if is_dm { "dm" } else { "room" },
                                members: if is_dm {
                                    dm_members(&m.conv)
                                } else {
                                    "[]".into()
                                },
                                first_ts: ts,
                                last_seq: i(m.seq),
                                last_ts: ts,
                                last_off: off,
                            });
                        }
                    }
                }
                Event::Receipt(e) => {
                    let kind = receipt_kind(e.kind);
                    let row = ReceiptRow {
                        conv: e.conv.clone(),
                        user: e.user.clone(),
                        kind,
                        seq: i(e.seq),
                        ts,
                        off,
                    };
                    match receipts.get(&(e.conv.clone(), e.user.clone(), kind)) {
                        Some(&idx) => {
                            if row.seq > b.receipts[idx].seq {
                                b.receipts[idx] = row;
                            }
                        }
                        None => {
                            receipts
                                .insert((e.conv.clone(), e.user.clone(), kind), b.receipts.len());
                            b.receipts.push(row);
                        }
                    }
                }
                Event::Notice(n) => b.notices.push(NoticeRow {
                    off,
                    user: r.to.first().cloned().unwrap_or_default(),
                    kind: n.kind.clone(),
                    data: json_text(&n.data),
                    ts,
                }),
                Event::Presence(p) => b.presence.push(PresenceRow {
                    off,
                    user: p.user.clone(),
                    status: presence_status(p.status),
                    devices: i32::try_from(p.devices).unwrap_or(i32::MAX),
                    scope: match p.scope {
                        Some(PresenceScope::Own) => "self",
                        _ => "public",
                    },
                    ts,
                }),
                Event::RoomCreated(e) => b.rooms.push(RoomOp::Created {
                    conv: e.conv.clone(),
                    name: e.name.clone(),
                    members: e.members.clone(),
                    off,
                    ts,
                }),
                Event::RoomMember(e) => b.rooms.push(RoomOp::Member {
                    conv: e.conv.clone(),
                    user: e.user.clone(),
                    joined: e.change == MemberChange::Joined,
                    off,
                }),
                Event::CallInvite(c) => b.call_invites.push(CallInviteRow {
                    id: c.call.clone(),
                    initiator: c.from.clone(),
                    device: c.device.clone(),
                    media: media(c.media),
                    invited: json_text(&c.to),
                    ts,
                    off,
                }),
                Event::CallAccepted(c) if accepted.insert(c.call.clone()) => {
                    b.call_accepts.push(CallAcceptRow {
                        id: c.call.clone(),
                        user: c.user.clone(),
                        ts,
                    });
                }
                Event::CallEnded(c) => b.call_ends.push(CallEndRow {
                    id: c.call.clone(),
                    reason: end_reason(c.reason),
                    by: c.by.clone(),
                    duration_ms: i(c.duration_ms),
                    ts,
                }),
                _ => {}
            }
        }
        b
    }

    /// The rooms this batch changes, folded over their rows before the batch
    /// (`current`: conv -> (members, members_off)); events at or below a row's
    /// `members_off` were applied already and are skipped.
    pub fn fold_rooms(&self, current: &HashMap<String, (Vec<String>, i64)>) -> Vec<RoomRow> {
        let mut out: Vec<RoomRow> = Vec::new();
        let mut idx: HashMap<String, usize> = HashMap::new();
        for op in &self.rooms {
            let conv = op.conv().to_string();
            let pos = match idx.get(&conv) {
                Some(&p) => p,
                None => {
                    let (members, off) = current.get(&conv).cloned().unwrap_or_default();
                    out.push(RoomRow {
                        id: conv.clone(),
                        name: None,
                        members: json_text(&members),
                        members_off: off,
                        created_ts: None,
                    });
                    idx.insert(conv, out.len() - 1);
                    out.len() - 1
                }
            };
            let row = &mut out[pos];
            let mut members: Vec<String> = serde_json::from_str(&row.members).unwrap_or_default();
            match op {
                RoomOp::Created {
                    name,
                    members: m,
                    off,
                    ts,
                    ..
                } if *off > row.members_off => {
                    members = m.clone();
                    row.name = Some(name.clone());
                    row.created_ts = Some(*ts);
                    row.members_off = *off;
                }
                RoomOp::Member {
                    user, joined, off, ..
                } if *off > row.members_off => {
                    members.retain(|u| u != user);
                    if *joined {
                        members.push(user.clone());
                    }
                    row.members_off = *off;
                }
                _ => {}
            }
            members.sort();
            members.dedup();
            row.members = json_text(&members);
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// the sink interface and the worker

/// A database the worker writes to. Implementations keep at most one connection; any
/// error leaves them disconnected (the worker calls [`Sink::connect`] again).
pub trait Sink: Send + 'static {
    /// `postgres` or `mssql` (the metric label and `sync_checkpoint.sink`).
    fn name(&self) -> &'static str;
    /// Connects, applies missing migrations, and returns the committed checkpoint.
    fn connect(&mut self) -> impl Future<Output = Result<u64, SyncError>> + Send;
    /// Writes `batch` and moves the checkpoint from `batch.after` to `batch.last`, in one
    /// transaction.
    fn write(&mut self, batch: &Batch) -> impl Future<Output = Result<(), SyncError>> + Send;
    /// Empties every table this sink fills and sets its checkpoint to `off` (rebuilds).
    fn reset(&mut self, off: u64) -> impl Future<Output = Result<(), SyncError>> + Send;
    /// Drops the connection.
    fn disconnect(&mut self);
}

/// Batch and retry settings.
#[derive(Debug, Clone)]
pub struct Policy {
    pub batch_max: usize,
    pub batch_ms: u64,
    pub retry_base_ms: u64,
    pub retry_cap_ms: u64,
}

impl Policy {
    pub fn from_config(c: &SyncConfig) -> Policy {
        Policy {
            batch_max: c.batch_max.max(1),
            batch_ms: c.batch_ms,
            retry_base_ms: c.retry_base_ms.max(1),
            retry_cap_ms: c.retry_cap_ms.max(1),
        }
    }

    /// Full jitter: rand(base/2, min(cap, base·2^attempt)).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .retry_base_ms
            .saturating_mul(1u64 << attempt.min(30))
            .min(self.retry_cap_ms);
        let floor = (self.retry_base_ms / 2).min(ceiling);
        Duration::from_millis(rand::thread_rng().gen_range(floor..=ceiling))
    }
}

/// A running worker.
pub struct Handle {
    pub sink: &'static str,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Handle {
    /// Stops the worker between batches (a batch in flight gets [`STOP_GRACE`] to commit;
    /// after that it is abandoned and rolls back, the checkpoint untouched).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if tokio::time::timeout(STOP_GRACE + Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let _ = self.task.await;
        }
    }
}

/// The sinks `config` asks for (none by default).
pub fn configured(c: &SyncConfig) -> Result<Vec<AnySink>, SyncError> {
    let mut out = Vec::new();
    if !c.postgres.url.is_empty() {
        out.push(AnySink::Postgres(Box::new(postgres::PgSink::new(
            &c.postgres.url,
        )?)));
    }
    if !c.mssql.url.is_empty() {
        out.push(AnySink::Mssql(Box::new(mssql::MsSink::new(&c.mssql.url)?)));
    }
    Ok(out)
}

/// One of the two sinks (static dispatch).
pub enum AnySink {
    Postgres(Box<postgres::PgSink>),
    Mssql(Box<mssql::MsSink>),
}

impl AnySink {
    /// The sink of `--sink <name>` built from `config`.
    pub fn by_name(name: &str, c: &SyncConfig) -> Result<AnySink, SyncError> {
        match name {
            "postgres" if !c.postgres.url.is_empty() => Ok(AnySink::Postgres(Box::new(
                postgres::PgSink::new(&c.postgres.url)?,
            ))),
            "mssql" if !c.mssql.url.is_empty() => {
                Ok(AnySink::Mssql(Box::new(mssql::MsSink::new(&c.mssql.url)?)))
            }
            "postgres" | "mssql" => Err(SyncError::Url(format!(
                "sync.{name}_url is empty; set it in the config file or SWITCHBOARD_SYNC__{}_URL",
                name.to_uppercase()
            ))),
            other => Err(SyncError::Url(format!(
                "unknown sink `{other}` (postgres or mssql)"
            ))),
        }
    }

    /// Spawns the worker of this sink.
    pub fn spawn(
        self,
        store: Store,
        head: watch::Receiver<u64>,
        status: Arc<crate::sequencer::Shared>,
        policy: Policy,
    ) -> Handle {
        let stop = CancellationToken::new();
        let (sink, task) = match self {
            AnySink::Postgres(s) => (
                s.name(),
                tokio::spawn(Worker::new(*s, store, policy, status).run(head, stop.clone())),
            ),
            AnySink::Mssql(s) => (
                s.name(),
                tokio::spawn(Worker::new(*s, store, policy, status).run(head, stop.clone())),
            ),
        };
        Handle { sink, stop, task }
    }

    /// Rebuilds from `from` up to the log's head, then returns the checkpoint reached.
    pub async fn replay(self, store: Store, from: u64, policy: Policy) -> Result<u64, SyncError> {
        match self {
            AnySink::Postgres(s) => replay(*s, store, from, policy).await,
            AnySink::Mssql(s) => replay(*s, store, from, policy).await,
        }
    }
}

/// Reads up to `max` records after `after`, none past `head`.
pub fn read_batch(
    store: &Store,
    after: u64,
    head: u64,
    max: usize,
) -> Result<Vec<Record>, LogError> {
    let mut out = Vec::with_capacity(max.min(4096));
    if head <= after {
        return Ok(out);
    }
    for r in store.records(after) {
        let r = r?;
        if r.off > head {
            break;
        }
        if r.off != after + out.len() as u64 + 1 {
            return Err(LogError::Corrupt {
                off: r.off,
                reason: format!("gap in the log after {}", after + out.len() as u64),
            });
        }
        out.push(r);
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}

/// `switchboard sync --from N`: reset the sink to `from` (emptying its tables when 0),
/// then copy every record up to the head of the (stopped) log.
async fn replay<S: Sink>(
    mut sink: S,
    store: Store,
    from: u64,
    policy: Policy,
) -> Result<u64, SyncError> {
    let name = sink.name();
    sink.connect().await?;
    sink.reset(from).await?;
    let head = store.head()?;
    let mut cp = from;
    tracing::info!(sink = name, from, head, "replaying the log into the sink");
    while cp < head {
        let records = read_batch(&store, cp, head, policy.batch_max)?;
        if records.is_empty() {
            break;
        }
        let batch = Batch::build(cp, &records);
        sink.write(&batch).await?;
        cp = batch.last;
        tracing::debug!(sink = name, checkpoint = cp, head, "batch replayed");
    }
    sink.disconnect();
    Ok(cp)
}

struct Worker<S: Sink> {
    sink: S,
    store: Store,
    policy: Policy,
    shared: Arc<crate::sequencer::Shared>,
    /// Committed checkpoint, once known.
    checkpoint: Option<u64>,
    up: bool,
}

impl<S: Sink> Worker<S> {
    fn new(sink: S, store: Store, policy: Policy, shared: Arc<crate::sequencer::Shared>) -> Self {
        Worker {
            sink,
            store,
            policy,
            shared,
            checkpoint: None,
            up: false,
        }
    }

    fn publish(&self, head: u64) {
        let name = self.sink.name();
        if let Some(cp) = self.checkpoint {
            metrics::gauge!(SYNC_LAG, "sink" => name).set(head.saturating_sub(cp) as f64);
        }
        metrics::gauge!(SYNC_STATE, "sink" => name).set(if self.up { 1.0 } else { 0.0 });
        let (up, cp) = (self.up, self.checkpoint);
        self.shared.sync_status.update(name, |s| {
            s.up = up;
            s.checkpoint = cp;
            if up {
                s.error = None;
            }
        });
    }

    /// Marks the sink down; logs only when it was up (or on the first failure).
    fn down(&mut self, e: &SyncError, first: bool, head: u64) {
        let name = self.sink.name();
        metrics::counter!(SYNC_ERRORS, "sink" => name).increment(1);
        self.sink.disconnect();
        if self.up || first {
            tracing::warn!(sink = name, error = %e, checkpoint = ?self.checkpoint, head,
                "sql sink down; retrying with backoff");
        }
        self.up = false;
        let msg = e.to_string();
        self.shared
            .sync_status
            .update(name, |s| s.error = Some(msg));
        self.publish(head);
    }

    async fn run(mut self, mut head_rx: watch::Receiver<u64>, stop: CancellationToken) {
        let name = self.sink.name();
        let mut attempt: u32 = 0;
        let mut first = true;
        tracing::info!(sink = name, "sql sync worker started");
        self.publish(*head_rx.borrow());
        'outer: while !stop.is_cancelled() {
            // Connect (and migrate) until the database answers.
            if !self.up {
                let head = *head_rx.borrow();
                let r = tokio::select! {
                    _ = stop.cancelled() => break 'outer,
                    r = tokio::time::timeout(CONNECT_TIMEOUT, self.sink.connect()) => r,
                };
                match r.unwrap_or(Err(SyncError::Timeout("connect timed out"))) {
                    Ok(cp) => {
                        self.checkpoint = Some(cp);
                        self.up = true;
                        attempt = 0;
                        first = false;
                        tracing::info!(
                            sink = name,
                            checkpoint = cp,
                            head,
                            lag = head.saturating_sub(cp),
                            "sql sink up"
                        );
                        self.publish(head);
                    }
                    Err(e) => {
                        self.down(&e, first, head);
                        first = false;
                        attempt = attempt.saturating_add(1);
                        let wait = self.policy.backoff(attempt);
                        let until = tokio::time::Instant::now() + wait;
                        // Keep the lag gauge moving while waiting.
                        loop {
                            tokio::select! {
                                _ = stop.cancelled() => break 'outer,
                                _ = tokio::time::sleep_until(until) => break,
                                r = head_rx.changed() => {
                                    if r.is_err() { break 'outer; }
                                    self.publish(*head_rx.borrow_and_update());
                                }
                            }
                        }
                        continue;
                    }
                }
            }
            let Some(cp) = self.checkpoint else {
                continue;
            };
            // Wait for work: something past the checkpoint; a partial batch waits up to
            // batch_ms for more.
            let mut head = *head_rx.borrow_and_update();
            if head <= cp {
                tokio::select! {
                    _ = stop.cancelled() => break 'outer,
                    r = head_rx.changed() => if r.is_err() { break 'outer; },
                }
                continue;
            }
            if head - cp < self.policy.batch_max as u64 && self.policy.batch_ms > 0 {
                let until =
                    tokio::time::Instant::now() + Duration::from_millis(self.policy.batch_ms);
                while head - cp < self.policy.batch_max as u64 {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep_until(until) => break,
                        r = head_rx.changed() => {
                            if r.is_err() { break; }
                            head = *head_rx.borrow_and_update();
                        }
                    }
                }
            }
            let records = match read_batch(&self.store, cp, head, self.policy.batch_max) {
                Ok(r) => r,
                Err(e) => {
                    // The log itself failed: nothing the database can fix; wait and retry.
                    tracing::error!(sink = name, error = %e, checkpoint = cp, "cannot read the log");
                    tokio::select! {
                        _ = stop.cancelled() => break 'outer,
                        _ = tokio::time::sleep(self.policy.backoff(5)) => {}
                    }
                    continue;
                }
            };
            if records.is_empty() {
                continue;
            }
            let batch = Batch::build(cp, &records);
            let t0 = std::time::Instant::now();
            let r = {
                let write = tokio::time::timeout(WRITE_TIMEOUT, self.sink.write(&batch));
                tokio::pin!(write);
                tokio::select! {
                    r = &mut write => r,
                    _ = stop.cancelled() => {
                        // Give the transaction in flight a moment to commit.
                        match tokio::time::timeout(STOP_GRACE, &mut write).await {
                            Ok(r) => r,
                            Err(_) => Ok(Err(SyncError::Timeout("stopped during a batch"))),
                        }
                    }
                }
            };
            match r.unwrap_or(Err(SyncError::Timeout("batch write timed out"))) {
                Ok(()) => {
                    metrics::histogram!(SYNC_BATCH_SECONDS, "sink" => name)
                        .record(t0.elapsed().as_secs_f64());
                    metrics::counter!(SYNC_EVENTS, "sink" => name).increment(batch.events as u64);
                    self.checkpoint = Some(batch.last);
                    self.publish(*head_rx.borrow());
                    tracing::debug!(
                        sink = name,
                        checkpoint = batch.last,
                        events = batch.events,
                        ms = t0.elapsed().as_millis() as u64,
                        "batch committed"
                    );
                }
                Err(SyncError::CheckpointMoved { found, .. }) => {
                    // Another writer (or a manual reset) moved it: continue from there.
                    tracing::warn!(
                        sink = name,
                        expected = cp,
                        found,
                        "sync_checkpoint moved under the worker; continuing from it"
                    );
                    self.checkpoint = Some(found);
                    self.publish(*head_rx.borrow());
                }
                Err(e) => {
                    let head = *head_rx.borrow();
                    self.down(&e, false, head);
                }
            }
        }
        self.sink.disconnect();
        tracing::info!(sink = name, checkpoint = ?self.checkpoint, "sql sync worker stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::event::{MessageEv, ReceiptEv, RoomCreatedEv, RoomMemberEv};

    fn rec(off: u64, event: Event) -> Record {
        Record {
            off,
            ts: 1000 + off,
            to: vec!["a".into()],
            event,
        }
    }

    #[test]
    fn batch_keeps_the_latest_receipt_and_last_message_per_conversation() {
        let msg = |off, seq| {
            rec(
                off,
                Event::Message(MessageEv {
                    conv: "dm:a:b".into(),
                    seq,
                    from: "a".into(),
                    device: None,
                    cid: None,
                    body: json!({"t": seq}),
                }),
            )
        };
        let rcpt = |off, seq| {
            rec(
                off,
                Event::Receipt(ReceiptEv {
                    conv: "dm:a:b".into(),
                    user: "b".into(),
                    kind: ReceiptKind::Read,
                    seq,
                }),
            )
        };
        let b = Batch::build(0, &[msg(1, 1), msg(2, 2), rcpt(3, 2), rcpt(4, 1)]);
        assert_eq!((b.after, b.last, b.events), (0, 4, 4));
        assert_eq!(b.messages.len(), 2);
        assert_eq!(b.receipts.len(), 1);
        assert_eq!(b.receipts[0].seq, 2);
        assert_eq!(b.convs.len(), 1);
        assert_eq!((b.convs[0].last_seq, b.convs[0].last_off), (2, 2));
        assert_eq!(b.convs[0].members, r#"["a","b"]"#);
    }

    #[test]
    fn rooms_fold_in_order_and_skip_applied_events() {
        let b = Batch::build(
            0,
            &[
                rec(
                    5,
                    Event::RoomCreated(RoomCreatedEv {
                        room: "r".into(),
                        conv: "room:r".into(),
                        name: "R".into(),
                        members: vec!["b".into(), "a".into()],
                    }),
                ),
                rec(
                    6,
                    Event::RoomMember(RoomMemberEv {
                        room: "r".into(),
                        conv: "room:r".into(),
                        user: "c".into(),
                        change: MemberChange::Joined,
                    }),
                ),
                rec(
                    7,
                    Event::RoomMember(RoomMemberEv {
                        room: "r".into(),
                        conv: "room:r".into(),
                        user: "a".into(),
                        change: MemberChange::Left,
                    }),
                ),
            ],
        );
        let rows = b.fold_rooms(&HashMap::new());
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].members, r#"["b","c"]"#);
        assert_eq!(rows[0].members_off, 7);
        // Already applied up to 6: only the leave of 7 applies.
        let cur = HashMap::from([("room:r".to_string(), (vec!["a".into(), "x".into()], 6))]);
        let rows = b.fold_rooms(&cur);
        assert_eq!(rows[0].members, r#"["x"]"#);
    }

    #[test]
    fn backoff_is_capped() {
        let p = Policy {
            batch_max: 1,
            batch_ms: 0,
            retry_base_ms: 500,
            retry_cap_ms: 2000,
        };
        for a in 0..40 {
            assert!(p.backoff(a) <= Duration::from_millis(2000));
        }
    }
}
