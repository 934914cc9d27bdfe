//! Fills a data directory with N realistic chat events, for start-up and disk figures
//! (issue 7): `docs/BENCHMARKS.md` section 7 has the commands.
//!
//! Run: `cargo bench --bench fill_log -- DIR N [USERS]`: fills DIR until its log holds N
//! events, continuing a partial fill (so a large fill can run as several processes: sled's
//! memory grows with a long write burst and is given back only when the process ends).
//! Events are direct messages between USERS users (default 10,000) in pairs, each with a
//! ~100-byte JSON body, a `cid` and two recipients, so each writes the event, two inbox
//! entries, a conversation entry and a dedupe entry: what the broker writes for a chat
//! message. They go through `Store::append` in batches of 1,024 (as the sequencer would
//! under load), flushed every 64 batches so sled's dirty pages do not pile up in memory; per-conversation `seq` and timestamps are
//! consistent, so a broker starting on the directory replays them like its own.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::json;
use switchboard::config::Durability;
use switchboard::log::event::MessageEv;
use switchboard::log::{Event, Record, Store};

const BATCH: u64 = 1024;

fn main() {
    // `cargo bench` passes `--bench`; ignore flags.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (Some(dir), Some(n)) = (
        args.first(),
        args.get(1).and_then(|n| n.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: cargo bench --bench fill_log -- DIR N [USERS]");
        std::process::exit(2);
    };
    let users: u64 = args
        .get(2)
        .and_then(|u| u.parse().ok())
        .unwrap_or(10_000)
        .max(2);
    let dir = std::path::Path::new(dir);
    let store = match Store::open(dir, Durability::None, 5) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("open {}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    // N is the size the log should reach: a directory that holds part of it (an earlier,
    // interrupted or chunked fill) is continued from its head.
    let head = match store.head() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    if head >= n {
        eprintln!("{} already holds {head} events", dir.display());
        std::process::exit(1);
    }
    let start = head + 1;
    let n = n - head;
    let t0 = Instant::now();
    let mut seqs: HashMap<u64, u64> = HashMap::new();
    // The conversations' seqs so far follow from the offsets alone.
    for o in 1..start {
        *seqs.entry(pair_of(o, users)).or_insert(0) += 1;
    }
    let ts0 = 1_767_225_600_000u64;
    let mut off = start;
    let mut batch = Vec::with_capacity(BATCH as usize);
    while off < start + n {
        batch.clear();
        let end = (off + BATCH).min(start + n);
        for o in off..end {
            // A pseudo-random pair, fixed by the offset.
            let (a, b) = users_of(o, users);
            let (x, y) = if a < b { (a, b) } else { (b, a) };
            let seq = seqs.entry(pair_of(o, users)).or_insert(0);
            *seq += 1;
            let (from, to) = (format!("user{a}"), format!("user{b}"));
            batch.push(Record {
                off: o,
                ts: ts0 + o,
                to: vec![from.clone(), to],
                event: Event::Message(MessageEv {
                    conv: format!("dm:user{x}:user{y}"),
                    seq: *seq,
                    from,
                    device: Some("phone-1".into()),
                    cid: Some(format!("c{o}")),
                    body: json!({
                        "text": "The quick brown fox jumps over the lazy dog, twice over.",
                        "n": o,
                        "kind": "text",
                    }),
                }),
            });
        }
        if let Err(e) = store.append(&batch) {
            eprintln!("append at {off}: {e}");
            std::process::exit(1);
        }
        off = end;
        // sled keeps dirty pages in memory until a flush; without these a 10 M fill grew to
        // 24 GB of RSS and was OOM-killed at 1.3 M events.
        if (off - start) % (BATCH * 64) < BATCH {
            if let Err(e) = store.flush_blocking() {
                eprintln!("flush at {off}: {e}");
                std::process::exit(1);
            }
        }
        if (off - start) % (BATCH * 256) < BATCH {
            eprintln!(
                "{} events, {:.0} s",
                off - start,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    if let Err(e) = store.flush_blocking() {
        eprintln!("flush: {e}");
        std::process::exit(1);
    }
    let bytes = store.size_on_disk();
    let total = start + n - 1;
    println!(
        "{{\"events\":{total},\"added\":{n},\"users\":{users},\"seconds\":{:.1},\"bytes_on_disk\":{bytes},\"bytes_per_event\":{}}}",
        t0.elapsed().as_secs_f64(),
        bytes / total.max(1)
    );
}

/// The sender and recipient of the message at offset `o`: a pseudo-random pair, fixed by
/// the offset.
fn users_of(o: u64, users: u64) -> (u64, u64) {
    let a = o.wrapping_mul(2_654_435_761) % users;
    let b = (a + 1 + o.wrapping_mul(40_503) % (users - 1)) % users;
    (a, b)
}

/// The conversation (unordered pair) of the message at offset `o`.
fn pair_of(o: u64, users: u64) -> u64 {
    let (a, b) = users_of(o, users);
    let (x, y) = if a < b { (a, b) } else { (b, a) };
    x * users + y
}
