//! WebSocket framing (RFC 6455 section 5) as pure functions over bytes: parsing the header
//! of a client frame, unmasking its payload, and writing the header of a server frame.
//!
//! No I/O and no allocation happen here, so the rules are tested (and fuzzed) byte by byte;
//! [`super::conn`] does the reading, buffering and message assembly.
//!
//! What a client frame must be (anything else is a protocol error, close 1002):
//! - RSV1-3 clear (no extension is negotiated);
//! - a known opcode (0 continuation, 1 text, 2 binary, 8 close, 9 ping, 10 pong);
//! - masked (section 5.1: a server must close on an unmasked client frame);
//! - a control frame (close, ping, pong) is final and carries at most 125 bytes;
//! - a 64-bit length has its most significant bit clear.
//!
//! A payload longer than the caller's limit is refused from the header alone
//! ([`FrameError::TooBig`], close 1009), before any byte of it is read or buffered.

/// Frame opcodes (section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// The parsed header of one client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: [u8; 4],
    /// Payload bytes that follow the header.
    pub len: usize,
    /// Bytes of the header itself (2 to 14).
    pub header_len: usize,
}

/// Why a client frame is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a frame a client may send (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The payload is over the limit (close 1009).
    #[error("frame payload over the limit")]
    TooBig,
}

/// The longest header: 2 bytes, an 8-byte length and a 4-byte mask.
pub const MAX_HEADER: usize = 14;

/// Parses the header at the start of `buf`. `Ok(None)`: more bytes are needed (at most
/// [`MAX_HEADER`] in all). `max_payload` bounds the payload length.
pub fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<Header>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::Protocol("unknown opcode"))?;
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frame not masked"));
    }
    let short = b1 & 0x7F;
    if opcode.is_control() && (!fin || short > 125) {
        return Err(FrameError::Protocol(
            "fragmented or oversized control frame",
        ));
    }
    let (len, len_bytes) = match short {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 2)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let len = u64::from_be_bytes(a);
            if len >> 63 != 0 {
                return Err(FrameError::Protocol("64-bit length with the top bit set"));
            }
            (len, 8)
        }
        n => (u64::from(n), 0),
    };
    let header_len = 2 + len_bytes + 4;
    let Some(m) = buf.get(2 + len_bytes..header_len) else {
        return Ok(None);
    };
    let len = usize::try_from(len).map_err(|_| FrameError::TooBig)?;
    if len > max_payload {
        return Err(FrameError::TooBig);
    }
    Ok(Some(Header {
        fin,
        opcode,
        mask: [m[0], m[1], m[2], m[3]],
        len,
        header_len,
    }))
}

/// XORs `data` with `mask`, where `data` starts `pos` bytes into the frame's payload.
pub fn unmask(data: &mut [u8], mask: [u8; 4], pos: usize) {
    let mut key = [0u8; 4];
    for (i, k) in key.iter_mut().enumerate() {
        *k = mask[(pos + i) % 4];
    }
    let word = u32::from_ne_bytes(key);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (b, k) in chunks.into_remainder().iter_mut().zip(key) {
        *b ^= k;
    }
}

/// Appends the header of an unmasked, final server frame carrying `len` payload bytes.
pub fn write_header(out: &mut Vec<u8>, opcode: OpCode, len: usize) {
    out.push(0x80 | opcode.bits());
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(n) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Whether a client may send `code` in a close frame (section 7.4): the defined codes
/// other than those that must never be on the wire (1004-1006, 1015), and the ranges for
/// libraries (3000-3999) and applications (4000-4999).
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = vec![first];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else if payload.len() <= 0xFFFF {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        unmask(&mut p, mask, 0);
        v.extend_from_slice(&p);
        v
    }

    #[test]
    fn a_masked_text_frame_parses_and_unmasks() {
        let bytes = masked(0x81, b"Hello", [0x37, 0xfa, 0x21, 0x3d]);
        // RFC 6455 section 5.7's example: a masked "Hello".
        assert_eq!(
            bytes,
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
        let h = parse_header(&bytes, 100).unwrap().unwrap();
        assert_eq!(
            h,
            Header {
                fin: true,
                opcode: OpCode::Text,
                mask: [0x37, 0xfa, 0x21, 0x3d],
                len: 5,
                header_len: 6
            }
        );
        let mut p = bytes[6..].to_vec();
        unmask(&mut p, h.mask, 0);
        assert_eq!(p, b"Hello");
    }

    #[test]
    fn every_prefix_of_a_header_asks_for_more() {
        for len in [5usize, 300, 70_000] {
            let bytes = masked(0x82, &vec![7u8; len], [1, 2, 3, 4]);
            let h = parse_header(&bytes, 1 << 20).unwrap().unwrap();
            assert_eq!(h.len, len);
            for cut in 0..h.header_len {
                assert_eq!(parse_header(&bytes[..cut], 1 << 20), Ok(None), "cut {cut}");
            }
        }
    }

    #[test]
    fn unmasking_in_pieces_equals_unmasking_at_once() {
        let mask = [9, 8, 7, 6];
        let data: Vec<u8> = (0..=255u8).cycle().take(1001).collect();
        let mut whole = data.clone();
        unmask(&mut whole, mask, 0);
        let mut pieces = data.clone();
        let mut pos = 0;
        for n in [1usize, 3, 5, 64, 7, 921] {
            unmask(&mut pieces[pos..pos + n], mask, pos);
            pos += n;
        }
        assert_eq!(pos, data.len());
        assert_eq!(pieces, whole);
    }

    #[test]
    fn frames_a_client_must_not_send_are_protocol_errors() {
        let proto = |b: &[u8]| matches!(parse_header(b, 1 << 20), Err(FrameError::Protocol(_)));
        assert!(proto(&[0x81, 0x05]), "unmasked");
        assert!(proto(&[0xC1, 0x85, 0, 0, 0, 0]), "rsv1");
        assert!(proto(&[0xA1, 0x85, 0, 0, 0, 0]), "rsv2");
        assert!(proto(&[0x91, 0x85, 0, 0, 0, 0]), "rsv3");
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert!(proto(&[0x80 | op, 0x80, 0, 0, 0, 0]), "opcode {op}");
        }
        assert!(proto(&[0x09, 0x80, 0, 0, 0, 0]), "fragmented ping");
        assert!(
            proto(&[0x89, 0x80 | 126, 0, 126, 0, 0, 0, 0]),
            "ping of 126"
        );
        assert!(
            proto(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
            "top bit of a 64-bit length"
        );
    }

    #[test]
    fn a_payload_over_the_limit_is_refused_from_the_header() {
        let h = [0x82, 0x80 | 127, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(parse_header(&h, 1 << 20), Err(FrameError::TooBig));
        assert!(parse_header(&h, 1 << 32).unwrap().is_some());
        let h = [0x81, 0x80 | 10, 1, 2, 3, 4];
        assert_eq!(parse_header(&h, 9), Err(FrameError::TooBig));
        assert!(parse_header(&h, 10).unwrap().is_some());
    }

    #[test]
    fn server_headers_use_the_shortest_length() {
        let mut out = Vec::new();
        write_header(&mut out, OpCode::Text, 125);
        assert_eq!(out, [0x81, 125]);
        out.clear();
        write_header(&mut out, OpCode::Binary, 126);
        assert_eq!(out, [0x82, 126, 0, 126]);
        out.clear();
        write_header(&mut out, OpCode::Binary, 65_536);
        assert_eq!(out, [0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        out.clear();
        write_header(&mut out, OpCode::Close, 2);
        assert_eq!(out, [0x88, 2]);
    }

    #[test]
    fn close_codes_on_the_wire() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 3999, 4000, 4999,
        ] {
            assert!(valid_close_code(ok), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!valid_close_code(bad), "{bad}");
        }
    }
}
