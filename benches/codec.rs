//! Per-event CPU costs on the hot path, none of which touch storage:
//! - `encode_wire/{json,msgpack}`: `Codec::encode(&record.wire())` of one message record
//!   (what fan-out encodes once per event and codec);
//! - `encode_record/msgpack`: the msgpack encoding of the whole record, as the log stores
//!   it (without the 4-byte crc);
//! - `decode_send/{json,msgpack}`: `Codec::decode` of a client `send` frame's bytes and
//!   then `frames::parse_frame` (what the gateway does per incoming frame);
//! - `state_apply/message`: `State::apply` of one message record to an existing DM
//!   conversation (what the sequencer does per accepted `send`, and replay per event).
//!
//! Run: `cargo bench --bench codec` (sample size 20, 5 s of measurement per case).

use std::cell::Cell;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;
use switchboard::log::event::MessageEv;
use switchboard::log::{Event, Record};
use switchboard::protocol::frames::parse_frame;
use switchboard::protocol::Codec;
use switchboard::state::State;

fn body(n: u64) -> serde_json::Value {
    json!({
        "text": "The quick brown fox jumps over the lazy dog, twice over.",
        "n": n,
        "kind": "text",
    })
}

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
            body: body(off),
        }),
    }
}

fn bench_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));

    // Encoding the wire form of one message record.
    let record = message(118);
    for (name, codec) in [("json", Codec::Json), ("msgpack", Codec::Msgpack)] {
        let len = codec.encode(&record.wire()).unwrap().len();
        eprintln!("wire message, {name}: {len} bytes");
        group.bench_function(format!("encode_wire/{name}"), |b| {
            b.iter(|| codec.encode(black_box(&record.wire())).unwrap())
        });
    }

    // The storage encoding of the same record (`Store::append` stores
    // crc32 ++ rmp_serde::to_vec_named(record); this is the msgpack part), to separate
    // encoding from sled's own cost in the log_append bench.
    let len = Codec::Msgpack.encode(&record).unwrap().len();
    eprintln!("stored record, msgpack: {len} bytes");
    group.bench_function("encode_record/msgpack", |b| {
        b.iter(|| Codec::Msgpack.encode(black_box(&record)).unwrap())
    });

    // Decoding + parsing one client `send` frame.
    let frame = json!({"op": "send", "id": 7, "to": "bob", "body": body(7), "cid": "c1"});
    let json_bytes = Codec::Json.encode(&frame).unwrap();
    let msgpack_bytes = Codec::Msgpack.encode(&frame).unwrap();
    for (name, codec, bytes) in [
        ("json", Codec::Json, &json_bytes),
        ("msgpack", Codec::Msgpack, &msgpack_bytes),
    ] {
        eprintln!("send frame, {name}: {} bytes", bytes.len());
        // Sanity: it parses.
        parse_frame(codec.decode(bytes).unwrap()).expect("send frame parses");
        group.bench_function(format!("decode_send/{name}"), |b| {
            b.iter(|| {
                let v = codec.decode(black_box(bytes)).unwrap();
                parse_frame(v).unwrap()
            })
        });
    }

    // State::apply of one message record to a DM conversation that already exists.
    // Offsets keep increasing across iterations, as they must; building the record is
    // not timed (iter_batched_ref).
    let mut state = State::new();
    state.apply(&message(1));
    let next = Cell::new(2u64);
    group.bench_function("state_apply/message", |b| {
        b.iter_batched_ref(
            || {
                let off = next.get();
                next.set(off + 1);
                message(off)
            },
            |r| state.apply(black_box(r)),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_codec);
criterion_main!(benches);
