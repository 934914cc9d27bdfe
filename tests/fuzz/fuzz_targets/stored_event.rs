//! An event record as read back from the log on disk. Raw bytes exercise the checksum; the
//! same bytes behind a valid checksum reach the MessagePack decoder. A record that decodes
//! is then used as replay and start-up use it: encoded for both subprotocols and applied to
//! State. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::log::store::decode_record;
use switchboard::protocol::Codec;
use switchboard::state::State;

fuzz_target!(|data: &[u8]| {
    let _ = decode_record(1, data);
    let mut with_crc = Vec::with_capacity(4 + data.len());
    with_crc.extend_from_slice(&crc32fast::hash(data).to_be_bytes());
    with_crc.extend_from_slice(data);
    // The offset the record claims, so that the decoder's offset check passes too.
    let off = rmp_serde::from_slice::<switchboard::log::Record>(data).map_or(1, |r| r.off);
    for off in [off, off.wrapping_add(1)] {
        if let Ok(rec) = decode_record(off, &with_crc) {
            let _ = Codec::Json.encode(&rec.wire());
            let _ = Codec::Msgpack.encode(&rec.wire());
            let mut state = State::new();
            state.apply(&rec);
        }
    }
});
