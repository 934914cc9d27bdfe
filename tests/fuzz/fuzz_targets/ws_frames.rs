//! WebSocket frame headers off the socket: every prefix of the input is parsed as the
//! session's reader does (with a small and a large limit), and a header that parses must
//! describe a frame that fits the limit and the bytes it claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::gateway::wire::{parse_header, unmask};

fuzz_target!(|data: &[u8]| {
    for max in [125usize, 1 << 20] {
        let mut buf = data;
        // Walk the input as a stream of frames, as the reader does.
        while let Ok(Some(h)) = parse_header(buf, max) {
            assert!(h.len <= max, "a frame over the limit was accepted");
            let total = h.header_len + h.len;
            if buf.len() < total {
                break;
            }
            let mut payload = buf[h.header_len..total].to_vec();
            unmask(&mut payload, h.mask, 0);
            buf = &buf[total..];
        }
    }
});
