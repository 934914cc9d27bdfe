//! The two encodings of the protocol: JSON in text frames and MessagePack (named maps) in
//! binary frames. Decoding is a pure function over bytes; encoding never fails for the
//! types the broker sends (string-keyed maps only).

use bytes::Bytes;
use serde::Serialize;

/// Subprotocol names offered in `Sec-WebSocket-Protocol`.
pub const JSON_PROTOCOL: &str = "switchboard.v1.json";
pub const MSGPACK_PROTOCOL: &str = "switchboard.v1.msgpack";

/// The encoding of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Json,
    Msgpack,
}

/// Why bytes could not be decoded at all (the socket is closed with 1007).
#[derive(Debug, thiserror::Error)]
#[error("undecodable {codec:?} frame: {reason}")]
pub struct DecodeError {
    pub codec: Codec,
    pub reason: String,
}

/// Why a value could not be encoded (a bug: our own types always encode).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode frame: {0}")]
pub struct EncodeError(pub String);

impl Codec {
    /// Picks the codec from a `Sec-WebSocket-Protocol` offer: the first known protocol the
    /// client offers; JSON when it offers none; `None` when it offers only unknown ones.
    pub fn negotiate(offer: Option<&str>) -> Option<(Codec, Option<&'static str>)> {
        let Some(offer) = offer.map(str::trim).filter(|s| !s.is_empty()) else {
            return Some((Codec::Json, None));
        };
        for name in offer.split(',').map(str::trim) {
            if name == JSON_PROTOCOL {
                return Some((Codec::Json, Some(JSON_PROTOCOL)));
            }
            if name == MSGPACK_PROTOCOL {
                return Some((Codec::Msgpack, Some(MSGPACK_PROTOCOL)));
            }
        }
        None
    }

    /// True when frames of this codec travel as binary WebSocket frames.
    pub fn is_binary(self) -> bool {
        matches!(self, Codec::Msgpack)
    }

    /// Decodes one whole message into a generic value.
    pub fn decode(self, bytes: &[u8]) -> Result<serde_json::Value, DecodeError> {
        match self {
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| DecodeError {
                codec: self,
                reason: e.to_string(),
            }),
            Codec::Msgpack => {
                let mut rest = bytes;
                let mut de = rmp_serde::Deserializer::new(&mut rest);
                let v = serde::Deserialize::deserialize(&mut de).map_err(|e| DecodeError {
                    codec: self,
                    reason: e.to_string(),
                })?;
                if rest.is_empty() {
                    Ok(v)
                } else {
                    Err(DecodeError {
                        codec: self,
                        reason: "trailing bytes after the MessagePack value".into(),
                    })
                }
            }
        }
    }

    /// Encodes a value as one frame payload.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes, EncodeError> {
        match self {
            Codec::Json => serde_json::to_vec(value)
                .map(Bytes::from)
                .map_err(|e| EncodeError(e.to_string())),
            Codec::Msgpack => rmp_serde::to_vec_named(value)
                .map(Bytes::from)
                .map_err(|e| EncodeError(e.to_string())),
        }
    }
}

/// Length of a value's JSON encoding, without building it (the measure of body limits).
pub fn json_len(v: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter(0);
    match serde_json::to_writer(&mut c, v) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn negotiation_prefers_the_first_known_offer() {
        assert_eq!(Codec::negotiate(None), Some((Codec::Json, None)));
        assert_eq!(
            Codec::negotiate(Some("x-unknown.v9, switchboard.v1.msgpack")),
            Some((Codec::Msgpack, Some(MSGPACK_PROTOCOL)))
        );
        assert_eq!(
            Codec::negotiate(Some("switchboard.v1.json")),
            Some((Codec::Json, Some(JSON_PROTOCOL)))
        );
        assert_eq!(Codec::negotiate(Some("switchboard.v9.xml")), None);
    }

    #[test]
    fn msgpack_round_trips_json_values_exactly() {
        let v = json!({"s": "h\u{e9}llo", "n": 42, "neg": -7, "big": 1u64 << 40, "f": 1.5,
                       "b": true, "nil": null, "list": [1, "two", {"three": [3]}]});
        let bytes = Codec::Msgpack.encode(&v).unwrap();
        assert_eq!(Codec::Msgpack.decode(&bytes).unwrap(), v);
        let bytes = Codec::Json.encode(&v).unwrap();
        assert_eq!(Codec::Json.decode(&bytes).unwrap(), v);
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(Codec::Msgpack.decode(&[0xc1, 0xc1, 0xc1]).is_err());
        assert!(Codec::Json.decode(b"this is {not json").is_err());
        assert!(
            Codec::Msgpack.decode(&[0x01, 0x02]).is_err(),
            "trailing bytes"
        );
    }
}
