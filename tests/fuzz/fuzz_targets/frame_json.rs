//! A client's text frame on the JSON subprotocol: decoded, then validated into a command,
//! exactly as a session does. Any input must give a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::protocol::frames::parse_frame;
use switchboard::protocol::Codec;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = Codec::Json.decode(data) {
        let _ = parse_frame(value);
    }
});
