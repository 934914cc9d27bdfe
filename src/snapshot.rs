//! Snapshots of State, for a fast restart.
//!
//! A snapshot is a file `<storage.dir>/snapshots/<off as 20 digits>.snap`:
//! `b"SBSNAP1\n" ++ crc32(body):u32 BE ++ body`, body = msgpack({off, state}). It is written
//! to a temporary file, fsynced and renamed, so a crash leaves either the old set or the new
//! one. The sequencer hands a clone of State over (the only pause it takes) and the write
//! runs on a blocking thread; the newest `snapshot.keep` files are kept.
//!
//! Start-up loads the newest snapshot that is valid (magic, checksum, decodes, its offset
//! exists in the log) and replays only the records after it; a corrupt or missing one
//! falls back to an older snapshot and finally to a full replay, and says so in the log.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::log::{LogError, Store};
use crate::state::State;

const MAGIC: &[u8; 8] = b"SBSNAP1\n";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Log(#[from] LogError),
}

#[derive(Serialize, Deserialize)]
struct Body {
    off: u64,
    state: State,
}

/// The snapshot directory of a data directory.
pub fn dir_of(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a snapshot of `state` (taken at `state.head`) and prunes all but the newest `keep`.
pub fn write(dir: &Path, state: &State, keep: usize) -> Result<PathBuf, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let body = rmp_serde::to_vec_named(&BodyRef {
        off: state.head,
        state,
    })
    .map_err(|e| SnapshotError::Invalid {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let path = dir.join(format!("{:020}.snap", state.head));
    let tmp = dir.join(format!("{:020}.snap.tmp", state.head));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(MAGIC).map_err(io(&tmp))?;
        f.write_all(&crc32fast::hash(&body).to_be_bytes())
            .map_err(io(&tmp))?;
        f.write_all(&body).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    let mut all = list(dir);
    while all.len() > keep.max(1) {
        let old = all.remove(0);
        let _ = std::fs::remove_file(&old);
    }
    Ok(path)
}

#[derive(Serialize)]
struct BodyRef<'a> {
    off: u64,
    state: &'a State,
}

/// Snapshot files, oldest first.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "snap"))
        .collect();
    v.sort();
    v
}

/// The offset a snapshot file's name gives (`<off>.snap`).
pub fn off_of(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.parse().ok()
}

/// Offsets of the oldest and the newest snapshot file of `dir` (by name).
pub fn range(dir: &Path) -> Option<(u64, u64)> {
    let all = list(dir);
    Some((off_of(all.first()?)?, off_of(all.last()?)?))
}

/// Reads and checks one snapshot file.
pub fn read(path: &Path) -> Result<State, SnapshotError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let bad = |reason: &str| SnapshotError::Invalid {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err(bad("not a snapshot (bad magic)"));
    }
    let want = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let body = &bytes[12..];
    if crc32fast::hash(body) != want {
        return Err(bad("checksum mismatch"));
    }
    let b: Body = rmp_serde::from_slice(body).map_err(|e| bad(&e.to_string()))?;
    if b.state.head != b.off {
        return Err(bad("offset does not match its state"));
    }
    Ok(b.state)
}

/// How State was rebuilt at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// From the snapshot at `off`, then `replayed` records.
    Snapshot { off: u64, replayed: u64 },
    /// A full replay (no usable snapshot).
    Full { replayed: u64 },
}

/// State from the newest valid snapshot plus the log tail, or a full replay.
pub fn load(store: &Store, dir: &Path) -> Result<(State, Loaded), SnapshotError> {
    let head = store.head()?;
    let floor = store.floor()?;
    for path in list(dir).into_iter().rev() {
        match read(&path) {
            Ok(state) if state.head + 1 < floor => {
                tracing::warn!(path = %path.display(), snapshot = state.head, floor, "snapshot is older than the retention floor; ignored")
            }
            Ok(state) if state.head <= head => {
                let off = state.head;
                let (state, replayed) = replay_from(store, state)?;
                return Ok((state, Loaded::Snapshot { off, replayed }));
            }
            Ok(state) => {
                tracing::warn!(path = %path.display(), snapshot = state.head, head, "snapshot is ahead of the log; ignored")
            }
            Err(e) => tracing::warn!(error = %e, "snapshot unusable; trying an older one"),
        }
    }
    if floor > 1 {
        return Err(SnapshotError::Invalid {
            path: dir.to_path_buf(),
            reason: format!(
                "retention compacted the log to offset {floor} and no valid snapshot at or after offset {} remains, so State cannot be rebuilt (restore a backup)",
                floor - 1
            ),
        });
    }
    let (state, replayed) = replay_from(store, State::new())?;
    Ok((state, Loaded::Full { replayed }))
}

/// Applies every record after `state.head`, checking that offsets continue.
pub fn replay_from(store: &Store, mut state: State) -> Result<(State, u64), SnapshotError> {
    let mut n = 0;
    for r in store.records(state.head) {
        let r = r?;
        if r.off != state.head + 1 {
            return Err(LogError::Corrupt {
                off: state.head + 1,
                reason: format!("offsets jump from {} to {}", state.head, r.off),
            }
            .into());
        }
        state.apply(&r);
        n += 1;
    }
    Ok((state, n))
}
