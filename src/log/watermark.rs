//! The durable watermark: an offset known to be flushed, kept outside sled.
//!
//! sled checks its own pages, but at start-up it treats a damaged segment as the torn end of
//! its log and silently drops everything after it (measured: a changed byte, a cut file or
//! zeroed bytes in the middle of sled's data file all came back as a shorter log, no error).
//! A shorter log is also what a rolled-back disk looks like. The snapshot catches that only
//! up to its offset; the watermark closes the gap: with `log.durability = "flush"` the
//! sequencer writes the head it has flushed here, at most once a second and at shutdown, and
//! start-up refuses a log that ends before it.
//!
//! Format: 8 bytes of offset (big endian) and its crc32 (4 bytes). Written to a temporary
//! file, synced and renamed over the old one, so a crash leaves the old or the new value.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The watermark file of a store directory.
pub fn path(store_dir: &Path) -> PathBuf {
    store_dir.join("watermark")
}

/// Records `off` as flushed (durably: synced file, renamed, directory synced).
pub fn write(store_dir: &Path, off: u64) -> std::io::Result<()> {
    let tmp = store_dir.join("watermark.tmp");
    let mut bytes = off.to_be_bytes().to_vec();
    bytes.extend_from_slice(&crc32fast::hash(&off.to_be_bytes()).to_be_bytes());
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(store_dir))?;
    std::fs::File::open(store_dir)?.sync_all()
}

/// What the watermark file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// No file (a new store, a restored copy, a broker that never ran with `flush`).
    Absent,
    Offset(u64),
    /// Unreadable or failing its checksum: the value cannot be trusted (it is ignored, and
    /// the next write replaces it).
    Damaged(String),
}

/// Reads the watermark of a store directory.
pub fn read(store_dir: &Path) -> Read {
    let bytes = match std::fs::read(path(store_dir)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::Absent,
        Err(e) => return Read::Damaged(e.to_string()),
    };
    let (Ok(off), Ok(crc)) = (
        <[u8; 8]>::try_from(bytes.get(..8).unwrap_or_default()),
        <[u8; 4]>::try_from(bytes.get(8..).unwrap_or_default()),
    ) else {
        return Read::Damaged(format!("{} bytes, expected 12", bytes.len()));
    };
    if crc32fast::hash(&off) != u32::from_be_bytes(crc) {
        return Read::Damaged("checksum mismatch".into());
    }
    Read::Offset(u64::from_be_bytes(off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_absent_and_damaged() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()), Read::Absent);
        write(d.path(), 41).unwrap();
        write(d.path(), 42).unwrap();
        assert_eq!(read(d.path()), Read::Offset(42));
        let mut b = std::fs::read(path(d.path())).unwrap();
        b[7] ^= 1;
        std::fs::write(path(d.path()), &b).unwrap();
        assert!(matches!(read(d.path()), Read::Damaged(_)));
        std::fs::write(path(d.path()), b"short").unwrap();
        assert!(matches!(read(d.path()), Read::Damaged(_)));
    }
}
