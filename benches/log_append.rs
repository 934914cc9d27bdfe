//! Log append throughput: `Store::append` of batches of 1, 16 and 256 message records,
//! with and without `Store::flush` after each append (the sequencer's group commit does
//! append + flush once per batch under `durability = "flush"`).
//!
//! Run: `cargo bench --bench log_append`. Settings are short (sample size 20, 5 s of
//! measurement per case) so the whole bench takes a few minutes on 2 cores.
//!
//! Every case writes into its own fresh sled store in a temporary directory opened exactly
//! as the broker opens it (`Durability::Flush`, so sled's background flusher also runs
//! every 500 ms). Offsets are consecutive and keep running across iterations; every
//! record has a distinct `cid`, so each append also writes two inbox keys, a conversation
//! key and a dedupe key per event, as in production. Building the records is not timed.

use std::cell::Cell;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;
use switchboard::config::Durability;
use switchboard::log::event::MessageEv;
use switchboard::log::{Event, Record, Store};

/// One message record with a ~100-byte JSON body.
fn message(off: u64) -> Record {
    Record {
        off,
        ts: 1_767_225_600_000 + off,
        to: vec!["alice".into(), "bob".into()],
        event: Event::Message(MessageEv {
            conv: "dm:alice:bob".into(),
            seq: off,
            from: "alice".into(),
            device: Some("phone-1".into()),
            cid: Some(format!("c{off}")),
            // serde_json::to_string of this is ~100 bytes.
            body: json!({
                "text": "The quick brown fox jumps over the lazy dog, twice over.",
                "n": off,
                "kind": "text",
            }),
        }),
    }
}

fn batch(next: &Cell<u64>, n: usize) -> Vec<Record> {
    let first = next.get();
    next.set(first + n as u64);
    (first..first + n as u64).map(message).collect()
}

fn bench_append(c: &mut Criterion) {
    let body_len = match &message(1).event {
        Event::Message(m) => serde_json::to_string(&m.body).unwrap().len(),
        _ => unreachable!(),
    };
    eprintln!("message body: {body_len} bytes of JSON");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    let mut group = c.benchmark_group("log_append");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    for flush in [false, true] {
        let mode = if flush { "append+flush" } else { "append" };
        for n in [1usize, 16, 256] {
            group.throughput(Throughput::Elements(n as u64));
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(&dir.path().join("db"), Durability::Flush, 5).expect("open");
            let next = Cell::new(1u64);
            group.bench_with_input(BenchmarkId::new(mode, n), &n, |b, &n| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let records = batch(&next, n);
                        let t0 = Instant::now();
                        store.append(&records).expect("append");
                        if flush {
                            rt.block_on(store.flush()).expect("flush");
                        }
                        total += t0.elapsed();
                    }
                    total
                });
            });
            // Flush what is left before the directory goes away.
            rt.block_on(store.flush()).expect("final flush");
            drop(store);
            drop(dir);
        }
    }
    group.finish();
}

criterion_group!(benches, bench_append);
criterion_main!(benches);
