//! Byte layout of every key in the `log` tree. All integers are big-endian so that sled's
//! lexicographic order is numeric order and ranges scan in offset / seq order.
//!
//! ```text
//! b'e' off:u64                          -> crc32:u32 ++ msgpack(Record)   the events
//! b'i' len:u16 user off:u64             -> ()                             per-user inbox
//! b'c' len:u16 conv seq:u64             -> off:u64                        per-conversation seq
//! b'd' len:u16 user cid                 -> off:u64                        (user, cid) dedupe
//! b'o' len:u16 user len:u16 device job:u64 -> msgpack(push job)           push outbox
//! b'x' job:u64                           -> msgpack(dead push job)        push dead letters
//! b'm' name                             -> value                         meta (`floor`: u64)
//! ```
//! Variable-length parts carry a length prefix, so one user's keys never interleave with
//! another's whose id it prefixes.

pub const EVENT: u8 = b'e';
pub const INBOX: u8 = b'i';
pub const CONV: u8 = b'c';
pub const DEDUPE: u8 = b'd';
pub const OUTBOX: u8 = b'o';
pub const DEAD: u8 = b'x';
pub const META: u8 = b'm';

/// The retention floor: the oldest offset the log still serves (u64 value).
pub const FLOOR: &[u8] = b"mfloor";

pub fn event(off: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = EVENT;
    k[1..].copy_from_slice(&off.to_be_bytes());
    k
}

/// Decodes an event key back to its offset.
pub fn event_off(key: &[u8]) -> Option<u64> {
    match key {
        [EVENT, rest @ ..] if rest.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(rest);
            Some(u64::from_be_bytes(b))
        }
        _ => None,
    }
}

/// `tag len:u16 text` — the prefix shared by every key of one user / conversation.
pub fn prefix(tag: u8, text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    // Ids are at most a few hundred bytes (checked at the protocol edge), far below u16::MAX.
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(3 + bytes.len() + 8);
    k.push(tag);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(bytes);
    k
}

pub fn inbox(user: &str, off: u64) -> Vec<u8> {
    let mut k = prefix(INBOX, user);
    k.extend_from_slice(&off.to_be_bytes());
    k
}

pub fn conv_seq(conv: &str, seq: u64) -> Vec<u8> {
    let mut k = prefix(CONV, conv);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn dedupe(user: &str, cid: &str) -> Vec<u8> {
    let mut k = prefix(DEDUPE, user);
    k.extend_from_slice(cid.as_bytes());
    k
}

/// The outbox prefix of one device: every push it is owed.
pub fn outbox_device(user: &str, device: &str) -> Vec<u8> {
    let mut k = prefix(OUTBOX, user);
    let d = device.as_bytes();
    k.extend_from_slice(&u16::try_from(d.len()).unwrap_or(u16::MAX).to_be_bytes());
    k.extend_from_slice(d);
    k
}

pub fn outbox(user: &str, device: &str, job: u64) -> Vec<u8> {
    let mut k = outbox_device(user, device);
    k.extend_from_slice(&job.to_be_bytes());
    k
}

pub fn dead(job: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = DEAD;
    k[1..].copy_from_slice(&job.to_be_bytes());
    k
}

/// The trailing big-endian u64 of a key (inbox offset, conversation seq).
pub fn trailing_u64(key: &[u8]) -> Option<u64> {
    let n = key.len();
    if n < 8 {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[n - 8..]);
    Some(u64::from_be_bytes(b))
}

/// A stored big-endian u64 value.
pub fn u64_value(v: &[u8]) -> Option<u64> {
    let b: [u8; 8] = v.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_byte_exact() {
        assert_eq!(event(258), [b'e', 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(
            inbox("al", 1),
            vec![b'i', 0, 2, b'a', b'l', 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(
            conv_seq("dm:a:b", 2),
            [&[b'c', 0, 6][..], b"dm:a:b", &[0, 0, 0, 0, 0, 0, 0, 2]].concat()
        );
        assert_eq!(dedupe("u", "c1"), vec![b'd', 0, 1, b'u', b'c', b'1']);
        assert_eq!(event_off(&event(99)), Some(99));
        assert_eq!(trailing_u64(&inbox("x", 77)), Some(77));
    }

    #[test]
    fn offsets_sort_numerically_and_users_do_not_interleave() {
        assert!(event(255) < event(256));
        assert!(inbox("al", u64::MAX) < inbox("alice", 0));
        assert!(inbox("al", 1) < inbox("al", 256));
    }
}
