//! `switchboard log`: operator tools for the event log.
//!
//! Offline (the default) they open a *stopped* broker's data directory (`--dir`, or
//! `storage.dir` of `--config`); sled allows one opener, so on a running broker's directory
//! they stop with "the broker is running; use --url". `stats` and `tail` (and `backup`, via
//! `POST /v1/admin/backup`) also work on a running broker through the HTTP API (`--url`,
//! `--api-key`, default `auth.api_key` of the config).
//!
//! - `stats`: head, floor, counts by event type, bytes on disk, index and outbox counts.
//! - `tail [-n N] [-f]`, `dump [--from] [--to] [--type T,..]`: NDJSON in the `/v1/events`
//!   shape (the wire shape plus `to`).
//! - `verify`: offsets contiguous from the floor to the head, every record's checksum and
//!   offset, every index entry consistent with the events (both ways), State rebuildable.
//! - `compact`: rewrites a stopped broker's store into a fresh one and swaps it in, which
//!   returns to the file system the space retention freed (sled reuses freed space inside
//!   its file but never shrinks it).
//! - `backup DIR` / `restore DIR`: a copy of every tree into a fresh sled database, verified
//!   after writing. Online, the broker copies the events up to the head it has published
//!   when the backup began and the index entries that point at them (see [`copy_store`]).

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{Config, Durability};
use crate::log::{keys, Event, LogError, Record, Store};
use crate::protocol::{ErrorCode, ProtoError};

/// Entries written per sled batch when copying.
const COPY_BATCH: usize = 10_000;
/// Events asked for per `/v1/events` request.
const PAGE: u64 = 1000;
/// Long-poll of `tail -f` against a running broker, ms.
const FOLLOW_WAIT_MS: u64 = 30_000;

/// Why a log tool failed.
#[derive(Debug, thiserror::Error)]
pub enum LogToolError {
    #[error(
        "the broker is running; use --url (with --api-key) for stats, tail and backup, or stop \
         it first (data directory {dir} is locked: {reason})"
    )]
    Running { dir: String, reason: String },
    #[error("no sled database at {0} (check --dir / --config storage.dir)")]
    NoData(PathBuf),
    #[error("{0} is not empty; refusing to write into it")]
    NotEmpty(PathBuf),
    #[error("{0} is not empty; --force replaces it (only a stopped broker's data directory)")]
    NotEmptyData(PathBuf),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("verify found {0} fault(s)")]
    Faults(usize),
    #[error("the copy at {dir} fails verification ({faults} fault(s)), first: {first}")]
    BadCopy {
        dir: PathBuf,
        faults: usize,
        first: String,
    },
}

type Result<T, E = LogToolError> = std::result::Result<T, E>;

/// Where the data directory is (offline).
#[derive(Debug, Clone, Args)]
pub struct Source {
    /// Config file: its `storage.dir` is the data directory, its `auth.api_key` the
    /// default `--api-key`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The data directory of a stopped broker (instead of the config's `storage.dir`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// A running broker's HTTP API.
#[derive(Debug, Clone, Args)]
pub struct Remote {
    /// Base URL of a running broker (e.g. http://127.0.0.1:8080): go through its HTTP API.
    #[arg(long)]
    pub url: Option<String>,
    /// API key (default: `auth.api_key` of the config and `SWITCHBOARD_AUTH__API_KEY`).
    #[arg(long)]
    pub api_key: Option<String>,
}

/// `switchboard log <cmd>`.
#[derive(Debug, Clone, Subcommand)]
pub enum LogCmd {
    /// Head, floor, counts by event type, bytes on disk, index and outbox counts.
    Stats {
        #[command(flatten)]
        src: Source,
        #[command(flatten)]
        remote: Remote,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The last N events as NDJSON; `-f` keeps following a running broker.
    Tail {
        #[command(flatten)]
        src: Source,
        #[command(flatten)]
        remote: Remote,
        #[arg(short = 'n', long = "lines", default_value_t = 10)]
        n: u64,
        /// Follow new events (online: until Ctrl-C; offline: print and exit).
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Events of an offset range as NDJSON (offline).
    Dump {
        #[command(flatten)]
        src: Source,
        /// First offset (default: the floor).
        #[arg(long)]
        from: Option<u64>,
        /// Last offset, inclusive (default: the head).
        #[arg(long)]
        to: Option<u64>,
        /// Only these event types (comma separated, e.g. message,receipt).
        #[arg(long = "type", value_delimiter = ',')]
        types: Vec<String>,
    },
    /// Check offsets, checksums, indices and the State rebuild; non-zero on any fault.
    Verify {
        #[command(flatten)]
        src: Source,
    },
    /// Copy the log into DIR (must be empty or absent); `--url` asks a running broker.
    Backup {
        /// Target directory (for --url: a path on the broker's host).
        target: PathBuf,
        #[command(flatten)]
        src: Source,
        #[command(flatten)]
        remote: Remote,
    },
    /// Rewrite a stopped broker's store compactly (returns the space retention freed).
    Compact {
        #[command(flatten)]
        src: Source,
    },
    /// Copy a backup into the data directory of a stopped broker.
    Restore {
        /// The backup directory.
        backup: PathBuf,
        #[command(flatten)]
        src: Source,
        /// Replace a non-empty data directory.
        #[arg(long)]
        force: bool,
    },
}

/// Runs one `switchboard log` command, printing to stdout.
pub fn run(cmd: LogCmd) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = run_to(cmd, &mut out).and_then(|()| out.flush().map_err(io("stdout")));
    match result {
        // `switchboard log dump | head`: a closed pipe is the reader's choice, not a failure.
        Err(LogToolError::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(())
        }
        other => other,
    }
}

fn run_to(cmd: LogCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        LogCmd::Stats { src, remote, json } => match online(&src, &remote)? {
            Some(api) => block_on(async {
                let stats = api.get_json("/v1/stats").await?;
                if json {
                    writeln!(out, "{stats}").map_err(io("stdout"))
                } else {
                    print_table(out, &stats)
                }
            }),
            None => {
                let dir = data_dir(&src)?;
                let store = open_existing(&dir)?;
                let stats = stats(&store)?;
                if json {
                    writeln!(out, "{}", stats.to_json()).map_err(io("stdout"))
                } else {
                    stats.print(out, &dir)
                }
            }
        },
        LogCmd::Tail {
            src,
            remote,
            n,
            follow,
        } => match online(&src, &remote)? {
            Some(api) => block_on(api.tail(out, n, follow)),
            None => {
                let store = open_existing(&data_dir(&src)?)?;
                let head = store.head()?;
                // Offline there is nothing to follow: the broker is stopped.
                write_range(&store, out, head.saturating_sub(n), head, &[])
            }
        },
        LogCmd::Dump {
            src,
            from,
            to,
            types,
        } => {
            let store = open_existing(&data_dir(&src)?)?;
            let after = from.unwrap_or(1).saturating_sub(1);
            let upto = match to {
                Some(t) => t,
                None => store.head()?,
            };
            write_range(&store, out, after, upto, &types)
        }
        LogCmd::Verify { src } => {
            let dir = data_dir(&src)?;
            let store = open_existing(&dir)?;
            let snaps = crate::snapshot::dir_of(&dir);
            let report = verify(&store, Some(&snaps), |f| {
                let _ = writeln!(out, "FAULT {f}");
            })?;
            report.print(out)?;
            if report.faults.is_empty() {
                Ok(())
            } else {
                Err(LogToolError::Faults(report.faults.len()))
            }
        }
        LogCmd::Backup {
            target,
            src,
            remote,
        } => match online(&src, &remote)? {
            Some(api) => {
                let target = std::path::absolute(&target).map_err(io("backup target"))?;
                let dir = target.display().to_string();
                let report = block_on(api.post_json("/v1/admin/backup", &json!({ "dir": dir })))?;
                writeln!(out, "{report}").map_err(io("stdout"))
            }
            None => {
                let dir = data_dir(&src)?;
                let store = open_existing(&dir)?;
                let report = copy_store(&store, &dir, &target, None)?;
                writeln!(out, "{}", report.to_json()).map_err(io("stdout"))
            }
        },
        LogCmd::Compact { src } => {
            if online(&src, &Remote::none())?.is_some() {
                return Err(LogToolError::Usage("compact works offline only".into()));
            }
            let report = compact(&data_dir(&src)?)?;
            writeln!(out, "{report}").map_err(io("stdout"))
        }
        LogCmd::Restore { backup, src, force } => {
            if online(&src, &Remote::none())?.is_some() {
                return Err(LogToolError::Usage("restore works offline only".into()));
            }
            let target = data_dir(&src)?;
            let report = restore(&backup, &target, force)?;
            writeln!(out, "{}", report.to_json()).map_err(io("stdout"))
        }
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> LogToolError + '_ {
    move |source| LogToolError::Io {
        what: what.to_string(),
        source,
    }
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting the runtime"))?
        .block_on(f)
}

// ---------------------------------------------------------------------------------------------
// opening

/// The data directory: `--dir`, else `storage.dir` of the config (file + environment).
pub fn data_dir(src: &Source) -> Result<PathBuf> {
    match &src.dir {
        Some(d) => Ok(d.clone()),
        None => Ok(Config::load(src.config.as_deref())?.storage.dir),
    }
}

/// Opens an existing store of a stopped broker; a locked directory is a running broker.
pub fn open_existing(dir: &Path) -> Result<Store> {
    if !dir.join("db").is_file() {
        return Err(LogToolError::NoData(dir.to_path_buf()));
    }
    open_store(dir)
}

fn open_store(dir: &Path) -> Result<Store> {
    Store::open(dir, Durability::None, 0).map_err(|e| match e {
        LogError::Locked { dir, reason } => LogToolError::Running { dir, reason },
        other => LogToolError::Log(other),
    })
}

/// The API client when `--url` is given (and `--dir` is not).
fn online(src: &Source, remote: &Remote) -> Result<Option<Api>> {
    let Some(url) = &remote.url else {
        return Ok(None);
    };
    if src.dir.is_some() {
        return Err(LogToolError::Usage(
            "--url and --dir exclude each other".into(),
        ));
    }
    let key = match &remote.api_key {
        Some(k) => k.clone(),
        None => Config::load(src.config.as_deref())?.auth.api_key,
    };
    Api::new(url, key).map(Some)
}

impl Remote {
    fn none() -> Remote {
        Remote {
            url: None,
            api_key: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// stats

/// What `stats` reports offline.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogStats {
    pub head: u64,
    /// Lowest offset present (0 for an empty log).
    pub floor: u64,
    pub events: u64,
    pub by_type: BTreeMap<String, u64>,
    /// Events that do not decode (see `verify`).
    pub corrupt: u64,
    pub bytes_on_disk: u64,
    pub inbox: u64,
    pub conv: u64,
    pub dedupe: u64,
    pub outbox: u64,
    pub dead: u64,
    /// Keys of the `log` tree with another tag.
    pub other: u64,
}

/// Counts everything (one pass over the keys, one over the events).
pub fn stats(store: &Store) -> Result<LogStats> {
    let mut s = LogStats {
        bytes_on_disk: store.size_on_disk(),
        ..Default::default()
    };
    for item in store.scan_prefix(&[]) {
        let (k, _) = item?;
        match k.first() {
            Some(&keys::EVENT) => {
                s.events += 1;
                if let Some(off) = keys::event_off(&k) {
                    if s.floor == 0 {
                        s.floor = off;
                    }
                    s.head = off;
                }
            }
            Some(&keys::INBOX) => s.inbox += 1,
            Some(&keys::CONV) => s.conv += 1,
            Some(&keys::DEDUPE) => s.dedupe += 1,
            Some(&keys::OUTBOX) => s.outbox += 1,
            Some(&keys::DEAD) => s.dead += 1,
            _ => s.other += 1,
        }
    }
    // Events below the floor in force may still be on disk (being deleted).
    s.floor = s.floor.max(store.floor()?);
    for r in store.records(0) {
        match r {
            Ok(r) => *s.by_type.entry(r.event.name().to_string()).or_default() += 1,
            Err(LogError::Corrupt { .. }) => s.corrupt += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(s)
}

impl LogStats {
    pub fn to_json(&self) -> Value {
        json!({
            "head": self.head,
            "floor": self.floor,
            "events": self.events,
            "by_type": self.by_type,
            "corrupt": self.corrupt,
            "bytes_on_disk": self.bytes_on_disk,
            "index": {"inbox": self.inbox, "conv_seq": self.conv, "dedupe": self.dedupe},
            "push_outbox": self.outbox,
            "dead_letters": self.dead,
            "other_keys": self.other,
        })
    }

    fn print(&self, out: &mut dyn Write, dir: &Path) -> Result<()> {
        let mut rows: Vec<(String, String)> = vec![
            ("data dir".into(), dir.display().to_string()),
            ("head".into(), self.head.to_string()),
            ("floor".into(), self.floor.to_string()),
            ("events".into(), self.events.to_string()),
            ("bytes on disk".into(), self.bytes_on_disk.to_string()),
        ];
        for (t, n) in &self.by_type {
            rows.push((format!("  {t}"), n.to_string()));
        }
        if self.corrupt > 0 {
            rows.push(("  (corrupt)".into(), self.corrupt.to_string()));
        }
        rows.extend([
            ("index inbox".into(), self.inbox.to_string()),
            ("index conv seq".into(), self.conv.to_string()),
            ("index dedupe".into(), self.dedupe.to_string()),
            ("push outbox".into(), self.outbox.to_string()),
            ("dead letters".into(), self.dead.to_string()),
            ("other keys".into(), self.other.to_string()),
        ]);
        write_rows(out, &rows)
    }
}

fn write_rows(out: &mut dyn Write, rows: &[(String, String)]) -> Result<()> {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        writeln!(out, "{k:<width$}  {v}").map_err(io("stdout"))?;
    }
    Ok(())
}

/// A JSON object as `key  value` rows (nested values as compact JSON).
fn print_table(out: &mut dyn Write, v: &Value) -> Result<()> {
    let rows: Vec<(String, String)> = match v.as_object() {
        Some(o) => o
            .iter()
            .map(|(k, v)| {
                let shown = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), shown)
            })
            .collect(),
        None => vec![("".into(), v.to_string())],
    };
    write_rows(out, &rows)
}

// ---------------------------------------------------------------------------------------------
// tail and dump

/// Writes the records with `after < off <= upto` (of `types`, when given) as NDJSON.
fn write_range(
    store: &Store,
    out: &mut dyn Write,
    after: u64,
    upto: u64,
    types: &[String],
) -> Result<()> {
    for r in store.records(after) {
        let r = r?;
        if r.off > upto {
            break;
        }
        if types.is_empty() || types.iter().any(|t| t == r.event.name()) {
            write_record(out, &r)?;
        }
    }
    Ok(())
}

fn write_record(out: &mut dyn Write, r: &Record) -> Result<()> {
    let line = serde_json::to_string(&r.wire_with_audience()).map_err(|e| {
        LogToolError::Log(LogError::Encode {
            off: r.off,
            reason: e.to_string(),
        })
    })?;
    writeln!(out, "{line}").map_err(io("stdout"))
}

// ---------------------------------------------------------------------------------------------
// verify

/// What `verify` found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub head: u64,
    pub floor: u64,
    pub events: u64,
    /// Index entries (inbox, conv seq, dedupe) checked against their events.
    pub index_entries: u64,
    pub outbox: u64,
    pub dead: u64,
    /// Whether State was rebuilt from the log (`None`: not attempted, see `notes`).
    pub rebuilt: Option<bool>,
    /// Snapshot files checked.
    pub snapshots: u64,
    pub faults: Vec<String>,
    pub notes: Vec<String>,
}

impl VerifyReport {
    fn print(&self, out: &mut dyn Write) -> Result<()> {
        for n in &self.notes {
            writeln!(out, "note: {n}").map_err(io("stdout"))?;
        }
        let state = match self.rebuilt {
            Some(true) => "State rebuilt",
            Some(false) => "State NOT rebuilt",
            None => "State rebuild skipped",
        };
        let verdict = if self.faults.is_empty() {
            "ok".to_string()
        } else {
            format!("{} fault(s)", self.faults.len())
        };
        writeln!(
            out,
            "{verdict}: {} events (offsets {}..={}), {} index entries, {} outbox, {} dead letters, {} snapshots checked; {state}",
            self.events, self.floor, self.head, self.index_entries, self.outbox, self.dead, self.snapshots
        )
        .map_err(io("stdout"))
    }
}

/// `tag len:u16 text rest` -> (text, rest).
fn split_prefixed(key: &[u8]) -> Option<(&str, &[u8])> {
    let len = usize::from(u16::from_be_bytes([*key.get(1)?, *key.get(2)?]));
    let text = key.get(3..3 + len)?;
    let rest = key.get(3 + len..)?;
    Some((std::str::from_utf8(text).ok()?, rest))
}

fn u64_of(b: &[u8]) -> Option<u64> {
    keys::u64_value(b)
}

/// Checks the whole store; each fault goes to `on_fault` as it is found (and into the
/// report). Storage errors (not faults of the data) end the check with an error.
pub fn verify(
    store: &Store,
    snapshots: Option<&Path>,
    mut on_fault: impl FnMut(&str),
) -> Result<VerifyReport> {
    let mut rep = VerifyReport::default();
    let mut fault = |rep: &mut VerifyReport, f: String| {
        on_fault(&f);
        rep.faults.push(f);
    };
    // Events: checksum, offset, contiguity; and each event's own index entries.
    let mut unreadable: HashSet<u64> = HashSet::new();
    let mut prev: Option<u64> = None;
    for item in store.records(0) {
        let off = match &item {
            Ok(r) => r.off,
            Err(LogError::Corrupt { off, .. }) => *off,
            Err(_) => 0,
        };
        match item {
            Ok(r) => {
                rep.events += 1;
                check_event_indices(store, &r, &mut |f| fault(&mut rep, f))?;
            }
            Err(LogError::Corrupt { off, reason }) => {
                rep.events += 1;
                unreadable.insert(off);
                fault(&mut rep, format!("event {off}: {reason}"));
            }
            Err(e) => return Err(e.into()),
        }
        if off == 0 {
            continue;
        }
        match prev {
            None => rep.floor = off,
            Some(p) if off != p + 1 => fault(
                &mut rep,
                format!("offsets jump from {p} to {off} ({} missing)", off - p - 1),
            ),
            Some(_) => {}
        }
        prev = Some(off);
        rep.head = off;
    }
    // Retention may have deleted every event: the head is then the one below the floor.
    let meta_floor = store.floor()?;
    if rep.events > 0 && rep.floor > meta_floor {
        let last_missing = rep.floor - 1;
        fault(
            &mut rep,
            format!(
                "events {meta_floor} to {last_missing} are missing above the retention floor {meta_floor}"
            ),
        );
    }
    rep.head = rep.head.max(meta_floor - 1);
    rep.floor = rep.floor.max(meta_floor);
    // Index entries: each must point at an event that justifies it.
    let get = |off: u64| -> Result<Option<Record>, LogError> {
        match store.get(off) {
            Err(LogError::Corrupt { .. }) => Ok(None),
            other => other,
        }
    };
    for item in store.scan_prefix(&[keys::INBOX]) {
        let (k, _) = item?;
        rep.index_entries += 1;
        let parsed = split_prefixed(&k).and_then(|(u, rest)| Some((u, u64_of(rest)?)));
        let Some((user, off)) = parsed else {
            fault(&mut rep, format!("malformed inbox key {}", hex(&k)));
            continue;
        };
        if unreadable.contains(&off) {
            continue;
        }
        match get(off)? {
            None => fault(
                &mut rep,
                format!("inbox entry of {user:?} at {off} points at a missing event"),
            ),
            Some(r) if !r.to.iter().any(|u| u == user) => fault(
                &mut rep,
                format!(
                    "inbox entry of {user:?} at {off}: event {off} ({}) is not for {user:?}",
                    r.event.name()
                ),
            ),
            Some(_) => {}
        }
    }
    for item in store.scan_prefix(&[keys::CONV]) {
        let (k, v) = item?;
        rep.index_entries += 1;
        let parsed = split_prefixed(&k).and_then(|(c, rest)| Some((c, u64_of(rest)?)));
        let Some((conv, seq)) = parsed else {
            fault(&mut rep, format!("malformed conversation key {}", hex(&k)));
            continue;
        };
        let Some(off) = u64_of(&v) else {
            fault(
                &mut rep,
                format!("conversation entry {conv:?} seq {seq} has a malformed value"),
            );
            continue;
        };
        if unreadable.contains(&off) {
            continue;
        }
        match get(off)? {
            Some(Record {
                event: Event::Message(m),
                ..
            }) if m.conv == conv && m.seq == seq => {}
            Some(r) => fault(
                &mut rep,
                format!(
                    "conversation entry {conv:?} seq {seq} points at event {off} ({}) which is not that message",
                    r.event.name()
                ),
            ),
            None => fault(
                &mut rep,
                format!("conversation entry {conv:?} seq {seq} points at missing event {off}"),
            ),
        }
    }
    for item in store.scan_prefix(&[keys::DEDUPE]) {
        let (k, v) = item?;
        rep.index_entries += 1;
        let parsed =
            split_prefixed(&k).and_then(|(u, rest)| Some((u, std::str::from_utf8(rest).ok()?)));
        let Some((user, cid)) = parsed else {
            fault(&mut rep, format!("malformed dedupe key {}", hex(&k)));
            continue;
        };
        let Some(off) = u64_of(&v) else {
            fault(
                &mut rep,
                format!("dedupe entry ({user:?}, {cid:?}) has a malformed value"),
            );
            continue;
        };
        if unreadable.contains(&off) {
            continue;
        }
        match get(off)? {
            Some(Record {
                event: Event::Message(m),
                ..
            }) if m.from == user && m.cid.as_deref() == Some(cid) => {}
            Some(r) => fault(
                &mut rep,
                format!(
                    "dedupe entry ({user:?}, {cid:?}) points at event {off} ({}) which is not that message",
                    r.event.name()
                ),
            ),
            None => fault(
                &mut rep,
                format!("dedupe entry ({user:?}, {cid:?}) points at missing event {off}"),
            ),
        }
    }
    for item in store.scan_prefix(&[keys::OUTBOX]) {
        let (k, v) = item?;
        rep.outbox += 1;
        if crate::push::job::Job::decode(&v).is_none() {
            fault(
                &mut rep,
                format!("outbox entry {} does not decode", hex(&k)),
            );
        }
    }
    for item in store.scan_prefix(&[keys::DEAD]) {
        let (k, v) = item?;
        rep.dead += 1;
        if crate::push::job::DeadJob::decode(&v).is_none() {
            fault(&mut rep, format!("dead letter {} does not decode", hex(&k)));
        }
    }
    // State: the same replay a starting broker does (from 1, or from a snapshot when
    // retention has moved the floor), and every snapshot against the replay.
    let snaps = snapshots.map(snapshot_files).unwrap_or_default();
    rep.snapshots = snaps.len() as u64;
    if rep.floor > 1 {
        match snapshots.map(|d| crate::snapshot::load(store, d)) {
            Some(Ok(_)) => rep.rebuilt = Some(true),
            Some(Err(e)) => {
                rep.rebuilt = Some(false);
                fault(
                    &mut rep,
                    format!("State cannot be rebuilt from a snapshot and the log: {e}"),
                );
            }
            None => rep.notes.push(format!(
                "the log starts at offset {} and no snapshot directory was given; State rebuild skipped",
                rep.floor
            )),
        }
    } else {
        match crate::sequencer::rebuild(store) {
            Ok(_) => rep.rebuilt = Some(true),
            Err(e) => {
                rep.rebuilt = Some(false);
                fault(&mut rep, format!("State cannot be rebuilt: {e}"));
            }
        }
    }
    check_snapshots(store, &snaps, rep.head, rep.floor <= 1, &mut |f| {
        fault(&mut rep, f)
    })?;
    if let Err(LogError::Corrupt { reason, off }) = crate::log::check::check_watermark(store) {
        fault(&mut rep, format!("event {off}: {reason}"));
    }
    Ok(rep)
}

/// Snapshot files `<off>.snap` of `dir`, by offset.
fn snapshot_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = crate::snapshot::list(dir)
        .into_iter()
        .filter_map(|p| {
            let off = crate::snapshot::off_of(&p)?;
            Some((off, p))
        })
        .collect();
    v.sort();
    v
}

/// Every snapshot must read (magic, checksum, decode), not be ahead of the log and, when
/// the log starts at 1 (`compare`), equal the State replayed up to its offset.
fn check_snapshots(
    store: &Store,
    snaps: &[(u64, PathBuf)],
    head: u64,
    compare: bool,
    fault: &mut dyn FnMut(String),
) -> Result<(), LogError> {
    let mut state = crate::state::State::new();
    let mut records = store.records(0);
    for (off, path) in snaps {
        let shown = path.display();
        let snap = match crate::snapshot::read(path) {
            Ok(s) => s,
            Err(e) => {
                fault(format!("snapshot {shown} is not loadable: {e}"));
                continue;
            }
        };
        if snap.head != *off {
            fault(format!(
                "snapshot {shown} holds State at offset {}, its name says {off}",
                snap.head
            ));
            continue;
        }
        if *off > head {
            fault(format!("snapshot {shown} is ahead of the log head {head}"));
            continue;
        }
        if !compare {
            continue;
        }
        while state.head < *off {
            match records.next() {
                Some(Ok(r)) => state.apply(&r),
                Some(Err(LogError::Corrupt { .. })) | None => break,
                Some(Err(e)) => return Err(e),
            }
        }
        if state.head == *off && state != snap {
            fault(format!(
                "snapshot {shown} differs from the State replayed from the log to offset {off}"
            ));
        }
    }
    Ok(())
}

/// Checks that `r` has its inbox entries, and (a message) its conv seq and dedupe entries.
fn check_event_indices(
    store: &Store,
    r: &Record,
    fault: &mut dyn FnMut(String),
) -> Result<(), LogError> {
    for user in &r.to {
        if store.get_raw(&keys::inbox(user, r.off))?.is_none() {
            fault(format!(
                "event {} ({}) is for {user:?} but {user:?}'s inbox index has no entry for it",
                r.off,
                r.event.name()
            ));
        }
    }
    if let Event::Message(m) = &r.event {
        let conv = store.get_raw(&keys::conv_seq(&m.conv, m.seq))?;
        if conv.as_deref().and_then(u64_of) != Some(r.off) {
            fault(format!(
                "message {} ({:?} seq {}) has no conversation index entry pointing at it (found {})",
                r.off,
                m.conv,
                m.seq,
                shown_off(conv.as_deref())
            ));
        }
        if let Some(cid) = &m.cid {
            let d = store.get_raw(&keys::dedupe(&m.from, cid))?;
            if d.as_deref().and_then(u64_of) != Some(r.off) {
                fault(format!(
                    "message {} has no dedupe entry ({:?}, {cid:?}) pointing at it (found {})",
                    r.off,
                    m.from,
                    shown_off(d.as_deref())
                ));
            }
        }
    }
    Ok(())
}

fn shown_off(v: Option<&[u8]>) -> String {
    match v {
        None => "none".into(),
        Some(b) => match u64_of(b) {
            Some(o) => format!("offset {o}"),
            None => "a malformed value".into(),
        },
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// backup and restore

/// What a copy wrote.
#[derive(Debug, Clone, Default)]
pub struct CopyReport {
    pub dir: PathBuf,
    /// Newest event copied, and the lowest.
    pub head: u64,
    pub floor: u64,
    pub events: u64,
    /// Entries written, over all trees.
    pub entries: u64,
    /// Entries left out because they belong to events after `head` (online backup).
    pub skipped: u64,
    /// Snapshot files copied (`<dir>/snapshots`).
    pub snapshots: u64,
    pub bytes_on_disk: u64,
}

impl CopyReport {
    pub fn to_json(&self) -> Value {
        json!({
            "dir": self.dir.display().to_string(),
            "head": self.head,
            "floor": self.floor,
            "events": self.events,
            "entries": self.entries,
            "skipped": self.skipped,
            "snapshots": self.snapshots,
            "bytes_on_disk": self.bytes_on_disk,
            "verified": true,
        })
    }
}

/// Fails unless `dir` is absent or an empty directory.
fn ensure_empty(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogToolError::Io {
            what: format!("reading {}", dir.display()),
            source: e,
        }),
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(LogToolError::NotEmpty(dir.to_path_buf())),
        },
    }
}

/// Whether the entry `(k, v)` of the `log` tree belongs to the log as of `upto`.
fn as_of(k: &[u8], v: &[u8], upto: u64) -> bool {
    let off = match k.first() {
        Some(&keys::EVENT) => keys::event_off(k),
        Some(&keys::INBOX) => keys::trailing_u64(k),
        Some(&keys::CONV) | Some(&keys::DEDUPE) => u64_of(v),
        Some(&keys::OUTBOX) => crate::push::job::Job::decode(v).map(|j| j.off),
        _ => None,
    };
    off.is_none_or(|o| o <= upto)
}

/// Copies every tree of `src` into a new store at `target` (absent or empty), flushes and
/// verifies the copy.
///
/// `upto = Some(h)` (online backup, `h` = the head the sequencer had published when the
/// backup began): only events with `off <= h` and the inbox, conversation and dedupe entries
/// pointing at them are copied. Appends are atomic batches and those entries never change
/// once written, so this part of the copy is exactly the log as of `h`, however many events
/// are appended meanwhile. Outbox and dead-letter entries (jobs for events `<= h`) and any
/// other tree are copied as sled's iterators see them while the copy runs: a push delivered
/// or dead-lettered during the copy may appear in both or neither.
pub fn copy_store(
    src: &Store,
    src_dir: &Path,
    target: &Path,
    upto: Option<u64>,
) -> Result<CopyReport> {
    ensure_empty(target)?;
    std::fs::create_dir_all(target).map_err(io("creating the target directory"))?;
    let dst = open_store(target)?;
    let mut rep = CopyReport {
        dir: target.to_path_buf(),
        ..Default::default()
    };
    for name in src.tree_names()? {
        let is_log = name == b"log";
        let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(COPY_BATCH);
        for item in src.scan_tree(&name)? {
            let (k, v) = item?;
            if is_log {
                if let Some(limit) = upto {
                    if !as_of(&k, &v, limit) {
                        rep.skipped += 1;
                        continue;
                    }
                }
                if let Some(off) = keys::event_off(&k) {
                    if rep.events == 0 {
                        rep.floor = off;
                    }
                    rep.events += 1;
                    rep.head = off;
                }
            }
            batch.push((k, v));
            if batch.len() >= COPY_BATCH {
                rep.entries += batch.len() as u64;
                dst.import(&name, &batch)?;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            rep.entries += batch.len() as u64;
            dst.import(&name, &batch)?;
        }
    }
    dst.flush_blocking()?;
    if rep.head > 0 {
        // The copy is flushed: its head is durable, so it carries its own watermark and
        // start-up will refuse the copy too if its data file later loses its tail.
        crate::log::watermark::write(target, rep.head).map_err(io("writing the watermark"))?;
    }
    rep.snapshots = copy_snapshots(src_dir, target, upto)?;
    let check = verify(&dst, Some(&crate::snapshot::dir_of(target)), |_| {})?;
    if let Some(first) = check.faults.first() {
        return Err(LogToolError::BadCopy {
            dir: target.to_path_buf(),
            faults: check.faults.len(),
            first: first.clone(),
        });
    }
    rep.bytes_on_disk = dst.size_on_disk();
    Ok(rep)
}

/// Copies the snapshot files (of offsets `<= upto`) next to the copied log. A snapshot is
/// written to a temporary name and renamed, so a file read here is whole; one pruned by the
/// broker meanwhile is skipped.
fn copy_snapshots(src_dir: &Path, target: &Path, upto: Option<u64>) -> Result<u64> {
    let from = crate::snapshot::dir_of(src_dir);
    let to = crate::snapshot::dir_of(target);
    let mut n = 0;
    for (off, path) in snapshot_files(&from) {
        if upto.is_some_and(|h| off > h) {
            continue;
        }
        let Some(name) = path.file_name() else {
            continue;
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(LogToolError::Io {
                    what: format!("reading {}", path.display()),
                    source: e,
                })
            }
        };
        std::fs::create_dir_all(&to).map_err(io("creating the snapshot directory"))?;
        std::fs::write(to.join(name), bytes).map_err(io("writing a snapshot"))?;
        n += 1;
    }
    Ok(n)
}

/// Copies the backup at `backup` into the data directory `target` of a stopped broker.
/// The backup is verified first; `force` replaces a non-empty `target`.
pub fn restore(backup: &Path, target: &Path, force: bool) -> Result<CopyReport> {
    if ensure_empty(target).is_err() {
        if !force || !target.join("db").is_file() {
            return Err(LogToolError::NotEmptyData(target.to_path_buf()));
        }
        // Never delete the directory of a running broker (nor anything but a sled database).
        drop(open_store(target)?);
        std::fs::remove_dir_all(target).map_err(io("removing the old data directory"))?;
    }
    let src = open_existing(backup)?;
    let check = verify(&src, Some(&crate::snapshot::dir_of(backup)), |_| {})?;
    if let Some(first) = check.faults.first() {
        return Err(LogToolError::BadCopy {
            dir: backup.to_path_buf(),
            faults: check.faults.len(),
            first: first.clone(),
        });
    }
    copy_store(&src, backup, target, None)
}

/// Bytes of every file under `dir` (what the data directory takes on disk).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => todo.push(e.path()),
                Ok(m) => n += m.len(),
                Err(_) => {}
            }
        }
    }
    n
}

/// `log compact`: copies the store of the stopped broker at `dir` (every live entry, and
/// the snapshots) into `<dir>.compacting`, verifies the copy, then swaps the directories.
/// If interrupted between the two renames, the original is at `<dir>.old`.
pub fn compact(dir: &Path) -> Result<Value> {
    let sibling = |suffix: &str| {
        let mut s = dir.as_os_str().to_os_string();
        s.push(suffix);
        PathBuf::from(s)
    };
    let (tmp, old) = (sibling(".compacting"), sibling(".old"));
    let before = dir_bytes(dir);
    let store = open_existing(dir)?;
    if tmp.exists() {
        // What an interrupted compact left; the original is untouched.
        std::fs::remove_dir_all(&tmp).map_err(io("removing an unfinished compaction"))?;
    }
    let copied = copy_store(&store, dir, &tmp, None)?;
    drop(store);
    if old.exists() {
        return Err(LogToolError::NotEmpty(old));
    }
    std::fs::rename(dir, &old).map_err(io("moving the old data directory aside"))?;
    std::fs::rename(&tmp, dir).map_err(io("moving the compacted store in"))?;
    std::fs::remove_dir_all(&old).map_err(io("removing the old data directory"))?;
    let after = dir_bytes(dir);
    Ok(json!({
        "dir": dir.display().to_string(),
        "events": copied.events,
        "floor": copied.floor,
        "head": copied.head,
        "bytes_before": before,
        "bytes_after": after,
    }))
}

/// The body of `POST /v1/admin/backup`.
#[derive(Debug, Deserialize)]
pub struct BackupRequest {
    /// Absolute path on the broker's host; must be absent or empty.
    pub dir: String,
}

/// The online backup the API route runs: copies `store` as of `head` (the published head
/// when the request arrived) into `dir` on a blocking thread.
pub async fn backup_online(
    store: Store,
    data_dir: PathBuf,
    head: u64,
    dir: String,
) -> Result<Value, ProtoError> {
    let target = PathBuf::from(&dir);
    if !target.is_absolute() {
        return Err(ProtoError::bad_request("`dir` must be an absolute path"));
    }
    let t0 = std::time::Instant::now();
    let done =
        tokio::task::spawn_blocking(move || copy_store(&store, &data_dir, &target, Some(head)))
            .await
            .map_err(|e| ProtoError::new(ErrorCode::Internal, format!("backup task: {e}")))?;
    match done {
        Ok(rep) => {
            tracing::info!(dir = %dir, head = rep.head, events = rep.events,
                ms = t0.elapsed().as_millis() as u64, "backup written");
            let mut v = rep.to_json();
            v["as_of_head"] = json!(head);
            Ok(v)
        }
        Err(e @ LogToolError::NotEmpty(_)) => Err(ProtoError::conflict(e.to_string())),
        Err(e) => {
            tracing::error!(dir = %dir, error = %e, "backup failed");
            Err(ProtoError::new(ErrorCode::Internal, e.to_string()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the HTTP API of a running broker

struct Api {
    client: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    fn new(url: &str, key: String) -> Result<Api> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| LogToolError::Http {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Api {
            client,
            base: url.trim_end_matches('/').to_string(),
            key,
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<String> {
        let http = |reason: String| LogToolError::Http {
            url: url.to_string(),
            reason,
        };
        let resp = req
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|e| http(e.to_string()))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| http(e.to_string()))?;
        if !status.is_success() {
            return Err(http(format!("HTTP {status}: {}", text.trim())));
        }
        Ok(text)
    }

    async fn get_text(&self, path: &str, timeout: Duration) -> Result<String> {
        let url = format!("{}{path}", self.base);
        self.send(self.client.get(&url).timeout(timeout), &url)
            .await
    }

    async fn get_json(&self, path: &str) -> Result<Value> {
        let text = self.get_text(path, Duration::from_secs(30)).await?;
        serde_json::from_str(&text).map_err(|e| LogToolError::Http {
            url: format!("{}{path}", self.base),
            reason: format!("not JSON: {e}"),
        })
    }

    async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        // A backup of a large log takes as long as it takes: no overall timeout.
        let text = self.send(self.client.post(&url).json(body), &url).await?;
        serde_json::from_str(&text).map_err(|e| LogToolError::Http {
            url,
            reason: format!("not JSON: {e}"),
        })
    }

    /// One page of `/v1/events` after `after`, written out; returns the last offset seen.
    async fn page(&self, out: &mut dyn Write, after: u64, wait_ms: u64) -> Result<Option<u64>> {
        let path = format!("/v1/events?after={after}&limit={PAGE}&wait_ms={wait_ms}");
        let body = self
            .get_text(&path, Duration::from_millis(wait_ms + 30_000))
            .await?;
        let mut last = None;
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            writeln!(out, "{line}").map_err(io("stdout"))?;
            let off = serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v["off"].as_u64());
            if let Some(o) = off {
                last = Some(o);
            }
        }
        out.flush().map_err(io("stdout"))?;
        Ok(last)
    }

    async fn tail(&self, out: &mut dyn Write, n: u64, follow: bool) -> Result<()> {
        let stats = self.get_json("/v1/stats").await?;
        let head = stats["head"].as_u64().ok_or_else(|| LogToolError::Http {
            url: format!("{}/v1/stats", self.base),
            reason: "no `head` in the answer".into(),
        })?;
        let mut after = head.saturating_sub(n);
        while after < head {
            match self.page(out, after, 0).await? {
                Some(last) => after = last,
                None => break,
            }
        }
        if !follow {
            return Ok(());
        }
        let follow = async {
            loop {
                if let Some(last) = self.page(out, after, FOLLOW_WAIT_MS).await? {
                    after = last;
                }
            }
        };
        tokio::select! {
            r = follow => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixed_keys_split() {
        let k = keys::inbox("al", 7);
        assert_eq!(split_prefixed(&k), Some(("al", &7u64.to_be_bytes()[..])));
        assert_eq!(split_prefixed(&[b'i', 0, 9, b'a']), None);
        let d = keys::dedupe("u", "c1");
        assert_eq!(split_prefixed(&d), Some(("u", &b"c1"[..])));
    }

    #[test]
    fn as_of_keeps_only_entries_up_to_the_head() {
        assert!(as_of(&keys::event(5), b"", 5));
        assert!(!as_of(&keys::event(6), b"", 5));
        assert!(!as_of(&keys::inbox("a", 6), b"", 5));
        assert!(as_of(&keys::conv_seq("c", 9), &5u64.to_be_bytes(), 5));
        assert!(!as_of(&keys::dedupe("a", "x"), &6u64.to_be_bytes(), 5));
        assert!(as_of(b"zother", b"", 5));
    }
}
