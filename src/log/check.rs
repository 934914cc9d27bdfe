//! The start-up check of the log (`storage.check_on_start = "all"`).
//!
//! A restart from a snapshot replays only the events after it, so without this a flipped bit
//! in an old event would go unnoticed until someone read that event. The check reads every
//! event once before the broker serves: checksum and stored offset (as [`Store::records`]
//! does), offsets contiguous from the first (the retention floor) to the head, and, with
//! `log.durability = "flush"`, no snapshot ahead of the log (a snapshot is written only after
//! the events it covers were flushed, so a log that ends before it lost acked events: a
//! truncated or rolled-back file). The first fault stops start-up, naming the offset; `switchboard
//! log verify` reports the same faults.

use std::path::Path;

use crate::config::Durability;

use super::{LogError, Store};

/// What the check read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// Events read.
    pub events: u64,
    /// First offset (0 for an empty log).
    pub first: u64,
    /// Last offset (0 for an empty log).
    pub head: u64,
}

/// Reads and checks every event; the first fault is the error.
pub fn check_all(
    store: &Store,
    snapshot_dir: &Path,
    durability: Durability,
) -> Result<Checked, LogError> {
    let mut c = Checked {
        events: 0,
        first: 0,
        head: 0,
    };
    for r in store.records(0) {
        let r = r?;
        if c.events == 0 {
            c.first = r.off;
        } else if r.off != c.head + 1 {
            return Err(LogError::Corrupt {
                off: c.head + 1,
                reason: format!(
                    "missing: offsets jump from {} to {} ({} event(s) gone)",
                    c.head,
                    r.off,
                    r.off - c.head - 1
                ),
            });
        }
        c.head = r.off;
        c.events += 1;
    }
    let floor = store.floor()?;
    if c.events > 0 && c.first > floor {
        return Err(LogError::Corrupt {
            off: floor,
            reason: format!(
                "missing: the retention floor is {floor} but the log starts at {}",
                c.first
            ),
        });
    }
    // Retention may have deleted every event: the head is then the one below the floor.
    c.head = c.head.max(floor - 1);
    if durability == Durability::Flush {
        if let Some((snap, path)) = newest_snapshot(snapshot_dir) {
            if snap > c.head {
                return Err(LogError::Corrupt {
                    off: c.head + 1,
                    reason: format!(
                        "missing: the log ends at offset {} but snapshot {} holds State up \
                         to offset {snap} (the log was truncated or rolled back)",
                        c.head,
                        path.display()
                    ),
                });
            }
        }
    }
    Ok(c)
}

/// Refuses a log whose head is below the durable watermark (events flushed, acked, then
/// lost: sled drops a damaged tail without an error). Cheap; start-up runs it whatever
/// `storage.check_on_start` says. A damaged watermark file is logged and ignored.
pub fn check_watermark(store: &Store) -> Result<(), LogError> {
    match super::watermark::read(store.dir()) {
        super::watermark::Read::Absent => Ok(()),
        super::watermark::Read::Damaged(reason) => {
            tracing::warn!(reason, path = %super::watermark::path(store.dir()).display(), "watermark file unreadable; ignored");
            Ok(())
        }
        super::watermark::Read::Offset(w) => {
            let head = store.head()?;
            if head < w {
                return Err(LogError::Corrupt {
                    off: head + 1,
                    reason: format!(
                        "missing: the log ends at offset {head} but offset {w} was flushed \
                         (watermark {}); the data file lost its tail (damaged, truncated or \
                         rolled back)",
                        super::watermark::path(store.dir()).display()
                    ),
                });
            }
            Ok(())
        }
    }
}

/// The offset (from its name) and path of the newest snapshot file.
fn newest_snapshot(dir: &Path) -> Option<(u64, std::path::PathBuf)> {
    crate::snapshot::list(dir)
        .into_iter()
        .filter_map(|p| {
            let off = crate::snapshot::off_of(&p)?;
            Some((off, p))
        })
        .max_by_key(|(off, _)| *off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::event::{Event, NoticeEv, Record};

    fn notice(off: u64) -> Record {
        Record {
            off,
            ts: off,
            to: vec!["a".into()],
            event: Event::Notice(NoticeEv {
                kind: "t".into(),
                data: serde_json::json!(off),
            }),
        }
    }

    #[test]
    fn a_gap_and_a_snapshot_ahead_are_named_by_offset() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), Durability::Flush, 5).unwrap();
        let snaps = dir.path().join("snapshots");
        assert_eq!(
            check_all(&store, &snaps, Durability::Flush).unwrap(),
            Checked {
                events: 0,
                first: 0,
                head: 0
            }
        );
        store.append(&[notice(1), notice(2), notice(3)]).unwrap();
        let c = check_all(&store, &snaps, Durability::Flush).unwrap();
        assert_eq!((c.events, c.first, c.head), (3, 1, 3));

        std::fs::create_dir_all(&snaps).unwrap();
        std::fs::write(snaps.join(format!("{:020}.snap", 5)), b"x").unwrap();
        match check_all(&store, &snaps, Durability::Flush) {
            Err(LogError::Corrupt { off: 4, reason }) => assert!(reason.contains("snapshot")),
            other => panic!("{other:?}"),
        }
        // Without group commit a snapshot may be ahead of what reached the disk.
        assert!(check_all(&store, &snaps, Durability::Interval).is_ok());

        store.append(&[notice(5)]).unwrap();
        std::fs::remove_dir_all(&snaps).unwrap();
        match check_all(&store, &snaps, Durability::Flush) {
            Err(LogError::Corrupt { off: 4, reason }) => assert!(reason.contains("3 to 5")),
            other => panic!("{other:?}"),
        }
    }
}
