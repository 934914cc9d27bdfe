//! Conversation ids: `dm:<a>:<b>` (the two user ids sorted) and `room:<id>`.

use std::fmt;

use crate::protocol::frames::{check_id, check_user, MAX_ID_LEN};
use crate::protocol::ProtoError;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConvId {
    /// A direct conversation; `.0 <= .1`.
    Dm(String, String),
    /// A room, by its bare id.
    Room(String),
}

impl ConvId {
    /// The direct conversation of two users.
    pub fn dm(x: &str, y: &str) -> ConvId {
        if x <= y {
            ConvId::Dm(x.to_string(), y.to_string())
        } else {
            ConvId::Dm(y.to_string(), x.to_string())
        }
    }

    /// Parses and checks a conversation id (`bad_request` when malformed).
    pub fn parse(s: &str) -> Result<ConvId, ProtoError> {
        if let Some(rest) = s.strip_prefix("dm:") {
            let Some((a, b)) = rest.split_once(':') else {
                return Err(ProtoError::bad_request("a dm id is dm:<user>:<user>"));
            };
            check_user("conv", a)?;
            check_user("conv", b)?;
            if a > b {
                return Err(ProtoError::bad_request(
                    "the two user ids of a dm id are sorted",
                ));
            }
            Ok(ConvId::Dm(a.to_string(), b.to_string()))
        } else if let Some(room) = s.strip_prefix("room:") {
            check_id("conv", room, MAX_ID_LEN)?;
            Ok(ConvId::Room(room.to_string()))
        } else {
            Err(ProtoError::bad_request(
                "a conversation id is dm:<a>:<b> or room:<id>",
            ))
        }
    }

    /// The other user of a dm, seen from `me`.
    pub fn peer(&self, me: &str) -> Option<&str> {
        match self {
            ConvId::Dm(a, b) if a == me => Some(b),
            ConvId::Dm(a, _) => Some(a),
            ConvId::Room(_) => None,
        }
    }
}

impl fmt::Display for ConvId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvId::Dm(a, b) => write!(f, "dm:{a}:{b}"),
            ConvId::Room(r) => write!(f, "room:{r}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_ids_are_sorted_and_round_trip() {
        assert_eq!(ConvId::dm("zed", "amy").to_string(), "dm:amy:zed");
        assert_eq!(
            ConvId::parse("dm:amy:zed").unwrap(),
            ConvId::dm("zed", "amy")
        );
        assert!(ConvId::parse("dm:zed:amy").is_err());
        assert!(ConvId::parse("dm:a").is_err());
        assert_eq!(
            ConvId::parse("room:ops").unwrap(),
            ConvId::Room("ops".into())
        );
        assert!(ConvId::parse("room:").is_err());
        assert!(ConvId::parse("chan:x").is_err());
        assert_eq!(ConvId::dm("a", "b").peer("a"), Some("b"));
    }
}
