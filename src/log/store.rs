//! The sled store of the event log.
//!
//! One sled tree `log` holds events and their indices (layout in [`super::keys`]); each
//! append is one `sled::Batch`, so an event and its index entries land together or not at
//! all. Values of events are `crc32(msgpack) ++ msgpack(Record)`.
//!
//! Durability: sled makes writes crash-safe only at `flush`. With `durability = flush` the
//! sequencer awaits [`Store::flush`] once per batch before answering (group commit); with
//! `interval` sled's own flusher runs every `flush_interval_ms`; with `none` nothing but
//! shutdown flushes.
//!
//! Recovery: on open, [`Store::records`] replays from offset 1; every record's checksum and
//! offset are checked and the offsets must be contiguous, so a shortened or altered history
//! refuses to serve instead of silently diverging.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::Durability;

use super::event::{Event, Record};
use super::keys;

/// A failure of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("event {off}: {reason}")]
    Corrupt { off: u64, reason: String },
    #[error("cannot encode event {off}: {reason}")]
    Encode { off: u64, reason: String },
    #[error("the store is full: {size} bytes on disk, storage.max_bytes = {max}")]
    Full { size: u64, max: u64 },
    #[error("data directory {dir} is in use by another broker (or unreadable): {reason}")]
    Locked { dir: String, reason: String },
    #[error("the store is being reopened after a storage error")]
    Closed,
}

/// The log store. Cheap to share: every clone sees the same sled database, and a
/// [`Store::reopen`] through any clone replaces it for all of them.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    durability: Durability,
    flush_interval_ms: u64,
    /// `None` while a reopen is under way (every operation answers [`LogError::Closed`]).
    open: RwLock<Option<Handles>>,
}

/// The sled handles of one opening of the database.
#[derive(Clone)]
struct Handles {
    db: sled::Db,
    log: sled::Tree,
}

impl Handles {
    fn open(
        dir: &Path,
        durability: Durability,
        flush_interval_ms: u64,
    ) -> Result<Handles, LogError> {
        let flush_every = match durability {
            Durability::Flush => Some(500),
            Durability::Interval => Some(flush_interval_ms.max(1)),
            Durability::None => None,
        };
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(flush_every)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    LogError::Locked {
                        dir: dir.display().to_string(),
                        reason: io.to_string(),
                    }
                }
                other => LogError::Sled(other),
            })?;
        let log = db.open_tree("log")?;
        Ok(Handles { db, log })
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(
        dir: &Path,
        durability: Durability,
        flush_interval_ms: u64,
    ) -> Result<Store, LogError> {
        let handles = Handles::open(dir, durability, flush_interval_ms)?;
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                durability,
                flush_interval_ms,
                open: RwLock::new(Some(handles)),
            }),
        })
    }

    /// Closes the database and opens it again from disk, for every clone of this store.
    ///
    /// sled's I/O errors are sticky: after one failed write or fsync every later write of
    /// that opening fails. Reopening recovers what reached the disk (sled's own recovery
    /// drops a torn tail) and takes writes again. Blocking: it waits, up to `timeout`, for
    /// the last handle of the old opening to go (an iterator in another task keeps it, and
    /// with it sled's directory lock), so call it off the async workers.
    pub fn reopen(&self, timeout: Duration) -> Result<(), LogError> {
        let old = self.write_lock().take();
        if let Some(old) = old {
            // Best effort: with a sticky error this fails, and nothing more can be saved.
            let _ = old.db.flush();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let i = &self.inner;
            match Handles::open(&i.dir, i.durability, i.flush_interval_ms) {
                Ok(h) => {
                    *self.write_lock() = Some(h);
                    return Ok(());
                }
                Err(LogError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Whether the database is open (false while a reopen is under way or after one failed).
    pub fn is_open(&self) -> bool {
        self.read_lock().is_some()
    }

    fn read_lock(&self) -> std::sync::RwLockReadGuard<'_, Option<Handles>> {
        self.inner.open.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> std::sync::RwLockWriteGuard<'_, Option<Handles>> {
        self.inner.open.write().unwrap_or_else(|e| e.into_inner())
    }

    fn handles(&self) -> Result<Handles, LogError> {
        self.read_lock().clone().ok_or(LogError::Closed)
    }

    /// `f` over the current `log` tree, or one [`LogError::Closed`] while none is open.
    fn over_tree<T, I>(
        &self,
        f: impl FnOnce(sled::Tree) -> I,
    ) -> impl Iterator<Item = Result<T, LogError>>
    where
        I: Iterator<Item = Result<T, LogError>>,
    {
        let (tree, closed) = match self.tree() {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(Err(e))),
        };
        closed.into_iter().chain(tree.map(f).into_iter().flatten())
    }

    /// The `log` tree of the current opening.
    fn tree(&self) -> Result<sled::Tree, LogError> {
        self.handles().map(|h| h.log)
    }

    /// The database of the current opening.
    fn db(&self) -> Result<sled::Db, LogError> {
        self.handles().map(|h| h.db)
    }

    /// The newest offset (0 for an empty log). When retention has deleted every event, the
    /// head is the one below the floor: offsets are never handed out twice.
    pub fn head(&self) -> Result<u64, LogError> {
        let last = self
            .tree()?
            .range(keys::event(0)..=keys::event(u64::MAX))
            .next_back()
            .transpose()?;
        let last = last.and_then(|(k, _)| keys::event_off(&k)).unwrap_or(0);
        Ok(last.max(self.floor()? - 1))
    }

    /// Appends records (consecutive offsets) and their index entries in one atomic batch.
    /// Not durable until [`Store::flush`].
    pub fn append(&self, records: &[Record]) -> Result<(), LogError> {
        self.append_with(records, &[])
    }

    /// [`Store::append`] plus extra entries (owed pushes) in the same atomic batch.
    pub fn append_with(
        &self,
        records: &[Record],
        extra: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<(), LogError> {
        if records.is_empty() && extra.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, v) in extra {
            batch.insert(k.as_slice(), v.as_slice());
        }
        for r in records {
            batch.insert(&keys::event(r.off), encode_record(r)?);
            let off = r.off.to_be_bytes();
            for user in &r.to {
                batch.insert(keys::inbox(user, r.off), &[][..]);
            }
            if let Event::Message(m) = &r.event {
                batch.insert(keys::conv_seq(&m.conv, m.seq), &off[..]);
                if let Some(cid) = &m.cid {
                    batch.insert(keys::dedupe(&m.from, cid), &off[..]);
                }
            }
        }
        self.tree()?.apply_batch(batch)?;
        Ok(())
    }

    /// Makes every earlier append crash-safe.
    ///
    /// The flush runs on tokio's blocking pool, not through sled's `flush_async`: sled hands
    /// that to its own thread pool with a `notify_all`, which wakes every idle `sled-io`
    /// thread (seven) for each group commit; profiled, they took 38 % of the broker's CPU
    /// under chat load. A task that cannot finish (a panic, or the runtime shutting down)
    /// is reported as sled reports its own pool failing: a storage error.
    pub async fn flush(&self) -> Result<(), LogError> {
        let store = self.clone();
        match tokio::task::spawn_blocking(move || store.flush_blocking()).await {
            Ok(r) => r,
            Err(e) => Err(LogError::Sled(sled::Error::ReportableBug(format!(
                "the flush task did not complete: {e}"
            )))),
        }
    }

    /// One record by offset.
    pub fn get(&self, off: u64) -> Result<Option<Record>, LogError> {
        match self.tree()?.get(keys::event(off))? {
            Some(v) => decode_record(off, &v).map(Some),
            None => Ok(None),
        }
    }

    /// The offset of an earlier message with this (user, cid).
    pub fn dedupe(&self, user: &str, cid: &str) -> Result<Option<u64>, LogError> {
        Ok(self
            .tree()?
            .get(keys::dedupe(user, cid))?
            .and_then(|v| keys::u64_value(&v)))
    }

    /// Offsets in `user`'s inbox with `after < off <= upto`, in order.
    pub fn inbox(
        &self,
        user: &str,
        after: u64,
        upto: u64,
    ) -> impl Iterator<Item = Result<u64, LogError>> {
        let start = keys::inbox(user, after.saturating_add(1));
        let end = keys::inbox(user, upto);
        self.over_tree(move |log| {
            let range = if after >= upto {
                // An empty range; sled panics on start > end.
                log.range(end.clone()..end)
            } else {
                log.range(start..=end)
            };
            range.map(|item| {
                let (k, _) = item?;
                keys::trailing_u64(&k).ok_or_else(|| LogError::Corrupt {
                    off: 0,
                    reason: "short inbox key".into(),
                })
            })
        })
    }

    /// How many inbox entries `user` has in `(after, upto]`, counting at most `cap`.
    pub fn count_inbox(
        &self,
        user: &str,
        after: u64,
        upto: u64,
        cap: u64,
    ) -> Result<u64, LogError> {
        let mut n = 0;
        for off in self.inbox(user, after, upto) {
            off?;
            n += 1;
            if n >= cap {
                break;
            }
        }
        Ok(n)
    }

    /// Up to `limit` messages of `conv` with `seq < before` (all when `None`), oldest first,
    /// and whether older ones exist.
    pub fn history(
        &self,
        conv: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Record>, bool), LogError> {
        let start = keys::conv_seq(conv, 1);
        let end_seq = before.unwrap_or(u64::MAX);
        if end_seq <= 1 {
            return Ok((Vec::new(), false));
        }
        let end = keys::conv_seq(conv, end_seq);
        let mut offs = Vec::with_capacity(limit);
        let mut more = false;
        for item in self.tree()?.range(start..end).rev() {
            let (_, v) = item?;
            if offs.len() == limit {
                more = true;
                break;
            }
            offs.push(keys::u64_value(&v).ok_or_else(|| LogError::Corrupt {
                off: 0,
                reason: format!("bad conversation index value in {conv}"),
            })?);
        }
        offs.reverse();
        let mut out = Vec::with_capacity(offs.len());
        for off in offs {
            match self.get(off)? {
                Some(r) => out.push(r),
                None => {
                    return Err(LogError::Corrupt {
                        off,
                        reason: format!("conversation index of {conv} points at a missing event"),
                    })
                }
            }
        }
        Ok((out, more))
    }

    /// Records with `off > after`, in order (checksums checked).
    pub fn records(&self, after: u64) -> impl Iterator<Item = Result<Record, LogError>> {
        self.over_tree(move |log| {
            log.range(keys::event(after.saturating_add(1))..=keys::event(u64::MAX))
                .map(|item| {
                    let (k, v) = item?;
                    let off = keys::event_off(&k).ok_or_else(|| LogError::Corrupt {
                        off: 0,
                        reason: "bad event key".into(),
                    })?;
                    decode_record(off, &v)
                })
        })
    }

    /// Every entry under a key prefix (outbox, dead letters), in key order.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), LogError>> {
        let prefix = prefix.to_vec();
        self.over_tree(move |log| {
            log.scan_prefix(prefix).map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(LogError::from)
            })
        })
    }

    pub fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self.tree()?.get(key)?.map(|v| v.to_vec()))
    }

    pub fn put_raw(&self, key: &[u8], value: &[u8]) -> Result<(), LogError> {
        self.tree()?.insert(key, value)?;
        Ok(())
    }

    /// Removes `key` and, when given, writes `moved` in the same batch (a dead letter).
    pub fn remove_raw(&self, key: &[u8], moved: Option<(&[u8], &[u8])>) -> Result<(), LogError> {
        let mut batch = sled::Batch::default();
        batch.remove(key);
        if let Some((k, v)) = moved {
            batch.insert(k, v);
        }
        self.tree()?.apply_batch(batch)?;
        Ok(())
    }

    /// Removes every entry under `prefix`; returns how many.
    pub fn remove_prefix(&self, prefix: &[u8]) -> Result<usize, LogError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.tree()?.scan_prefix(prefix) {
            let (k, _) = item?;
            batch.remove(k);
            n += 1;
        }
        if n > 0 {
            self.tree()?.apply_batch(batch)?;
        }
        Ok(n)
    }

    /// The retention floor: the oldest offset the log serves (1 until retention moves it).
    /// Events below it are gone or about to be deleted.
    pub fn floor(&self) -> Result<u64, LogError> {
        Ok(self
            .tree()?
            .get(keys::FLOOR)?
            .and_then(|v| keys::u64_value(&v))
            .unwrap_or(1)
            .max(1))
    }

    /// Records a new floor (not durable until [`Store::flush`]). Only the sequencer calls
    /// this, so the floor it answers hellos with is the floor on disk.
    pub fn set_floor(&self, floor: u64) -> Result<(), LogError> {
        self.tree()?.insert(keys::FLOOR, &floor.to_be_bytes()[..])?;
        Ok(())
    }

    /// Deletes up to `max` of the oldest events below `floor`, each with its inbox,
    /// conversation and dedupe entries, in one atomic batch (an event and its index entries
    /// go together, as they came). Returns how many events were deleted and the encoded
    /// bytes of their values.
    pub fn delete_below(&self, floor: u64, max: usize) -> Result<(u64, u64), LogError> {
        if floor <= 1 || max == 0 {
            return Ok((0, 0));
        }
        let mut batch = sled::Batch::default();
        let (mut n, mut bytes) = (0u64, 0u64);
        for item in self
            .tree()?
            .range(keys::event(0)..keys::event(floor))
            .take(max)
        {
            let (k, v) = item?;
            let off = keys::event_off(&k).ok_or_else(|| LogError::Corrupt {
                off: 0,
                reason: "bad event key".into(),
            })?;
            // A record that no longer decodes still goes; its index entries cannot be
            // found from it and stay (`log verify` reports them).
            if let Ok(r) = decode_record(off, &v) {
                for user in &r.to {
                    batch.remove(keys::inbox(user, off));
                }
                if let Event::Message(m) = &r.event {
                    batch.remove(keys::conv_seq(&m.conv, m.seq));
                    if let Some(cid) = &m.cid {
                        let key = keys::dedupe(&m.from, cid);
                        // A later message may have taken the cid over; keep its entry.
                        if self.dedupe(&m.from, cid)? == Some(off) {
                            batch.remove(key);
                        }
                    }
                }
            }
            batch.remove(&k);
            n += 1;
            bytes += v.len() as u64;
        }
        if n > 0 {
            self.tree()?.apply_batch(batch)?;
        }
        Ok((n, bytes))
    }

    /// Encoded bytes of the record at `off` plus its index keys (an estimate of what one
    /// event costs in the store, before sled's own overhead); `None` when absent.
    pub fn record_bytes(&self, off: u64) -> Result<Option<u64>, LogError> {
        let Some(v) = self.tree()?.get(keys::event(off))? else {
            return Ok(None);
        };
        let r = decode_record(off, &v)?;
        // The same keys and values `append_with` writes, sized by the functions that build them.
        let mut n = keys::event(off).len() + v.len();
        for user in &r.to {
            n += keys::inbox(user, off).len();
        }
        if let Event::Message(m) = &r.event {
            n += keys::conv_seq(&m.conv, m.seq).len() + 8;
            if let Some(cid) = &m.cid {
                n += keys::dedupe(&m.from, cid).len() + 8;
            }
        }
        Ok(Some(n as u64))
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db().and_then(|db| Ok(db.size_on_disk()?)).unwrap_or(0)
    }

    /// The names of every sled tree of the database (`log`, sled's default tree, any other);
    /// the log tools copy them all.
    pub fn tree_names(&self) -> Result<Vec<Vec<u8>>, LogError> {
        Ok(self
            .db()?
            .tree_names()
            .into_iter()
            .map(|n| n.to_vec())
            .collect())
    }

    /// Every entry of the tree `name`, in key order (raw bytes, nothing decoded).
    #[allow(clippy::type_complexity)]
    pub fn scan_tree(
        &self,
        name: &[u8],
    ) -> Result<impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), LogError>>, LogError> {
        let tree = self.db()?.open_tree(name)?;
        Ok(tree.iter().map(|r| {
            r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(LogError::from)
        }))
    }

    /// Writes raw entries into the tree `name` in one atomic batch (restoring a copy).
    pub fn import(&self, name: &[u8], entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), LogError> {
        let tree = self.db()?.open_tree(name)?;
        let mut batch = sled::Batch::default();
        for (k, v) in entries {
            batch.insert(k.as_slice(), v.as_slice());
        }
        tree.apply_batch(batch)?;
        Ok(())
    }

    /// The blocking flush: the offline log tools call it, and [`Store::flush`] runs it on
    /// tokio's blocking pool.
    pub fn flush_blocking(&self) -> Result<(), LogError> {
        self.db()?.flush()?;
        Ok(())
    }
}

fn encode_record(r: &Record) -> Result<Vec<u8>, LogError> {
    let body = rmp_serde::to_vec_named(r).map_err(|e| LogError::Encode {
        off: r.off,
        reason: e.to_string(),
    })?;
    let mut v = Vec::with_capacity(4 + body.len());
    v.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    v.extend_from_slice(&body);
    Ok(v)
}

/// Decodes the stored value of event `off`: a CRC-32 of the body, then the MessagePack
/// record, which must name `off` itself. Public for the fuzz target (`tests/fuzz`).
pub fn decode_record(off: u64, v: &[u8]) -> Result<Record, LogError> {
    let corrupt = |reason: String| LogError::Corrupt { off, reason };
    if v.len() < 4 {
        return Err(corrupt("value shorter than its checksum".into()));
    }
    let (crc, body) = v.split_at(4);
    let want = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != want {
        return Err(corrupt("checksum mismatch".into()));
    }
    let r: Record = rmp_serde::from_slice(body).map_err(|e| corrupt(e.to_string()))?;
    if r.off != off {
        return Err(corrupt(format!("record says offset {}", r.off)));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::event::{MessageEv, NoticeEv};
    use serde_json::json;

    fn msg(off: u64, seq: u64, cid: &str) -> Record {
        Record {
            off,
            ts: 1000 + off,
            to: vec!["a".into(), "b".into()],
            event: Event::Message(MessageEv {
                conv: "dm:a:b".into(),
                seq,
                from: "a".into(),
                device: Some("d".into()),
                cid: Some(cid.into()),
                body: json!(seq),
            }),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db"), Durability::Flush, 5).unwrap();
        (dir, s)
    }

    #[tokio::test]
    async fn append_writes_event_and_indices_together() {
        let (_d, s) = open();
        assert_eq!(s.head().unwrap(), 0);
        let notice = Record {
            off: 3,
            ts: 5,
            to: vec!["b".into()],
            event: Event::Notice(NoticeEv {
                kind: "t".into(),
                data: json!(null),
            }),
        };
        s.append(&[msg(1, 1, "x"), msg(2, 2, "y"), notice]).unwrap();
        s.flush().await.unwrap();
        assert_eq!(s.head().unwrap(), 3);
        assert_eq!(s.get(2).unwrap().unwrap(), msg(2, 2, "y"));
        assert_eq!(s.dedupe("a", "y").unwrap(), Some(2));
        assert_eq!(s.dedupe("b", "y").unwrap(), None);
        let a: Vec<u64> = s.inbox("a", 0, 3).map(Result::unwrap).collect();
        assert_eq!(a, vec![1, 2]);
        let b: Vec<u64> = s.inbox("b", 1, 3).map(Result::unwrap).collect();
        assert_eq!(b, vec![2, 3]);
        assert_eq!(s.inbox("b", 3, 3).count(), 0);
        assert_eq!(s.count_inbox("b", 0, 3, 2).unwrap(), 2);
        let (h, more) = s.history("dm:a:b", None, 1).unwrap();
        assert_eq!(
            (h.iter().map(|r| r.off).collect::<Vec<_>>(), more),
            (vec![2], true)
        );
        let (h, more) = s.history("dm:a:b", Some(2), 10).unwrap();
        assert_eq!(
            (h.iter().map(|r| r.off).collect::<Vec<_>>(), more),
            (vec![1], false)
        );
        let all: Vec<u64> = s.records(0).map(|r| r.unwrap().off).collect();
        assert_eq!(all, vec![1, 2, 3]);
    }

    #[test]
    fn a_flipped_byte_is_caught_by_the_checksum() {
        let (_d, s) = open();
        s.append(&[msg(1, 1, "x")]).unwrap();
        let mut v = s
            .tree()
            .unwrap()
            .get(keys::event(1))
            .unwrap()
            .unwrap()
            .to_vec();
        let last = v.len() - 1;
        v[last] ^= 0x55;
        s.tree().unwrap().insert(keys::event(1), v).unwrap();
        assert!(matches!(s.get(1), Err(LogError::Corrupt { off: 1, .. })));
    }

    #[tokio::test]
    async fn a_reopen_is_seen_by_every_clone_and_keeps_what_was_flushed() {
        let (_d, s) = open();
        let other = s.clone();
        s.append(&[msg(1, 1, "x")]).unwrap();
        s.flush().await.unwrap();
        s.reopen(Duration::from_secs(5)).unwrap();
        assert!(other.is_open());
        assert_eq!(other.get(1).unwrap().unwrap(), msg(1, 1, "x"));
        other.append(&[msg(2, 2, "y")]).unwrap();
        other.flush().await.unwrap();
        assert_eq!(s.head().unwrap(), 2);
    }

    #[tokio::test]
    async fn a_reopen_waits_for_an_iterator_of_the_old_opening_and_gives_up_at_its_timeout() {
        let (_d, s) = open();
        s.append(&[msg(1, 1, "x"), msg(2, 2, "y")]).unwrap();
        s.flush().await.unwrap();
        // An iterator keeps the old opening (and sled's directory lock) alive.
        let mut held = s.records(0);
        assert_eq!(held.next().unwrap().unwrap().off, 1);
        let err = s.reopen(Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, LogError::Locked { .. }), "{err}");
        assert!(!s.is_open());
        assert!(matches!(s.get(1), Err(LogError::Closed)));
        assert!(matches!(s.records(0).next(), Some(Err(LogError::Closed))));
        // The old opening still serves its iterator.
        assert_eq!(held.next().unwrap().unwrap().off, 2);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        s.reopen(Duration::from_secs(10)).unwrap();
        t.join().unwrap();
        assert_eq!(s.head().unwrap(), 2);
    }
}
