//! Every durable event, as stored and as sent.
//!
//! A [`Record`] is what the log keeps under an offset: the offset itself, the timestamp the
//! sequencer gave it, the audience (`to`: user ids whose devices receive it and whose inbox
//! index points at it) and the [`Event`]. On the wire an event is a flat map:
//! `{"ev": "<type>", "off", "ts", ...fields}` (plus `"to"` on `/v1/events`).
//!
//! Invariants: `apply` of a record never needs anything but the record and State; an event
//! with an empty audience is in the log (and `/v1/events`) but never on a socket.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::frames::ReceiptKind;

/// One durable event with its place in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub off: u64,
    pub ts: u64,
    pub to: Vec<String>,
    pub event: Event,
}

/// A chat message in a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageEv {
    pub conv: String,
    pub seq: u64,
    pub from: String,
    /// The sending device; `None` for messages published over the HTTP API.
    pub device: Option<String>,
    pub cid: Option<String>,
    pub body: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiptEv {
    pub conv: String,
    pub user: String,
    pub kind: ReceiptKind,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoticeEv {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Value,
}

/// A status as others (or the user) see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Away,
    Busy,
    Invisible,
    Offline,
}

/// Who a presence event is for: both views agree (absent on the wire), only the user's
/// audience, or only the user's own devices (while invisible the two differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceScope {
    Public,
    #[serde(rename = "self")]
    Own,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceEv {
    pub user: String,
    pub status: Status,
    pub devices: u32,
    pub last_seen: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<PresenceScope>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomCreatedEv {
    pub room: String,
    pub conv: String,
    pub name: String,
    pub members: Vec<String>,
}

/// `joined` or `left`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberChange {
    Joined,
    Left,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomMemberEv {
    pub room: String,
    pub conv: String,
    pub user: String,
    pub change: MemberChange,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactsEv {
    pub user: String,
    pub contacts: Vec<String>,
}

/// A call's media kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Media {
    Audio,
    Video,
}

/// Why a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    Hangup,
    Rejected,
    NoAnswer,
    Busy,
    TimeLimit,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallInviteEv {
    pub call: String,
    pub from: String,
    pub device: String,
    /// Every invited user (busy ones included).
    pub to: Vec<String>,
    pub media: Media,
    pub ring_ms: u64,
    pub time_limit_s: Option<u64>,
    pub meta: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallUserEv {
    pub call: String,
    pub user: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallAcceptedEv {
    pub call: String,
    pub user: String,
    pub device: String,
}

/// To the accepting user's other devices: `device` is the one that accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallAnsweredElsewhereEv {
    pub call: String,
    pub user: String,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRejectedEv {
    pub call: String,
    pub user: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallSignalEv {
    pub call: String,
    pub from: String,
    pub device: String,
    /// The one device of the target that receives it (`None`: all of them).
    pub to_device: Option<String>,
    pub kind: String,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallMediaEv {
    pub call: String,
    pub user: String,
    pub audio: bool,
    pub video: bool,
    pub hold: bool,
    pub screen: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallNetworkEv {
    pub call: String,
    pub user: String,
    pub quality: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallTimeWarningEv {
    pub call: String,
    pub remaining_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallEndedEv {
    pub call: String,
    pub reason: EndReason,
    /// Who hung up (for `hangup`).
    pub by: Option<String>,
    pub duration_ms: u64,
}

/// A push the push worker owes: a call invite to a user with no live device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushRequestEv {
    pub user: String,
    pub kind: String,
    pub call: String,
    /// Unix ms after which the push is pointless (the ring is over).
    pub expires_at: u64,
}

/// A device's push token (never sent to sockets: the audience is empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushTokenEv {
    pub user: String,
    pub device: String,
    pub provider: crate::push::provider::ProviderKind,
    pub token: String,
    pub app: Option<String>,
}

/// A token dropped: unregistered by the device, replaced, or refused by the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushTokenRemovedEv {
    pub user: String,
    pub device: String,
    pub provider: crate::push::provider::ProviderKind,
    pub token: String,
    pub reason: String,
}

/// The backend disconnected a user (`POST /v1/users/{user}/disconnect`): every connection
/// token of the user issued before the second of this record's `ts` (`iat` earlier, or no
/// `iat` at all) is refused from now on. Never sent to sockets (the audience is empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokensRevokedEv {
    pub user: String,
    /// The `reason` the backend gave, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Every durable event type. The tag is the wire `ev` name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev")]
pub enum Event {
    #[serde(rename = "message")]
    Message(MessageEv),
    #[serde(rename = "receipt")]
    Receipt(ReceiptEv),
    #[serde(rename = "notice")]
    Notice(NoticeEv),
    #[serde(rename = "presence")]
    Presence(PresenceEv),
    #[serde(rename = "room.created")]
    RoomCreated(RoomCreatedEv),
    #[serde(rename = "room.member")]
    RoomMember(RoomMemberEv),
    #[serde(rename = "contacts")]
    Contacts(ContactsEv),
    #[serde(rename = "call.invite")]
    CallInvite(CallInviteEv),
    #[serde(rename = "call.busy")]
    CallBusy(CallUserEv),
    #[serde(rename = "call.accepted")]
    CallAccepted(CallAcceptedEv),
    #[serde(rename = "call.answered_elsewhere")]
    CallAnsweredElsewhere(CallAnsweredElsewhereEv),
    #[serde(rename = "call.rejected")]
    CallRejected(CallRejectedEv),
    #[serde(rename = "call.signal")]
    CallSignal(CallSignalEv),
    #[serde(rename = "call.media")]
    CallMedia(CallMediaEv),
    #[serde(rename = "call.network")]
    CallNetwork(CallNetworkEv),
    #[serde(rename = "call.left")]
    CallLeft(CallUserEv),
    #[serde(rename = "call.time_warning")]
    CallTimeWarning(CallTimeWarningEv),
    #[serde(rename = "call.ended")]
    CallEnded(CallEndedEv),
    #[serde(rename = "push.request")]
    PushRequest(PushRequestEv),
    #[serde(rename = "push.token")]
    PushToken(PushTokenEv),
    #[serde(rename = "push.token_removed")]
    PushTokenRemoved(PushTokenRemovedEv),
    #[serde(rename = "tokens.revoked")]
    TokensRevoked(TokensRevokedEv),
}

/// Which of a recipient user's devices an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Devices<'a> {
    All,
    Only(&'a str),
    AllBut(&'a str),
}

impl Devices<'_> {
    pub fn includes(&self, device: &str) -> bool {
        match self {
            Devices::All => true,
            Devices::Only(d) => *d == device,
            Devices::AllBut(d) => *d != device,
        }
    }
}

impl Event {
    /// The wire `ev` name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Message(_) => "message",
            Event::Receipt(_) => "receipt",
            Event::Notice(_) => "notice",
            Event::Presence(_) => "presence",
            Event::RoomCreated(_) => "room.created",
            Event::RoomMember(_) => "room.member",
            Event::Contacts(_) => "contacts",
            Event::CallInvite(_) => "call.invite",
            Event::CallBusy(_) => "call.busy",
            Event::CallAccepted(_) => "call.accepted",
            Event::CallAnsweredElsewhere(_) => "call.answered_elsewhere",
            Event::CallRejected(_) => "call.rejected",
            Event::CallSignal(_) => "call.signal",
            Event::CallMedia(_) => "call.media",
            Event::CallNetwork(_) => "call.network",
            Event::CallLeft(_) => "call.left",
            Event::CallTimeWarning(_) => "call.time_warning",
            Event::CallEnded(_) => "call.ended",
            Event::PushRequest(_) => "push.request",
            Event::PushToken(_) => "push.token",
            Event::PushTokenRemoved(_) => "push.token_removed",
            Event::TokensRevoked(_) => "tokens.revoked",
        }
    }

    /// The devices of each recipient that get this event (live and in a replay): a signal
    /// addressed to one device goes there only; `answered_elsewhere` skips the device
    /// that answered.
    pub fn devices(&self) -> Devices<'_> {
        match self {
            Event::CallSignal(CallSignalEv {
                to_device: Some(d), ..
            }) => Devices::Only(d),
            Event::CallAnsweredElsewhere(e) => Devices::AllBut(&e.device),
            _ => Devices::All,
        }
    }
}

/// The wire shape of a record: `{"ev", ...fields, "off", "ts"}`.
#[derive(Serialize)]
pub struct Wire<'a> {
    #[serde(flatten)]
    pub event: &'a Event,
    pub off: u64,
    pub ts: u64,
}

/// The `/v1/events` shape: the wire shape plus the audience as `to`. An event with a `to`
/// of its own (`call.invite`: the invited users) has it as `invited` here, so the object
/// never carries a key twice.
pub struct WireWithAudience<'a> {
    pub event: &'a Event,
    pub off: u64,
    pub ts: u64,
    pub to: &'a [String],
}

impl Serialize for WireWithAudience<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let wire = Wire {
            event: self.event,
            off: self.off,
            ts: self.ts,
        };
        let mut v = serde_json::to_value(&wire).map_err(serde::ser::Error::custom)?;
        if let Value::Object(map) = &mut v {
            if let Some(own) = map.remove("to") {
                map.insert("invited".into(), own);
            }
            map.insert("to".into(), Value::from(self.to.to_vec()));
        }
        v.serialize(s)
    }
}

impl Record {
    pub fn wire(&self) -> Wire<'_> {
        Wire {
            event: &self.event,
            off: self.off,
            ts: self.ts,
        }
    }
    pub fn wire_with_audience(&self) -> WireWithAudience<'_> {
        WireWithAudience {
            event: &self.event,
            off: self.off,
            ts: self.ts,
            to: &self.to,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Codec;
    use serde_json::json;

    fn message() -> Record {
        Record {
            off: 7,
            ts: 1_700_000_000_000,
            to: vec!["a".into(), "b".into()],
            event: Event::Message(MessageEv {
                conv: "dm:a:b".into(),
                seq: 3,
                from: "a".into(),
                device: Some("p1".into()),
                cid: Some("c1".into()),
                body: json!({"text": "hi", "n": [1, 2.5, null]}),
            }),
        }
    }

    #[test]
    fn wire_shape_is_flat_with_off_and_ts() {
        let v = serde_json::to_value(message().wire()).unwrap();
        assert_eq!(
            v,
            json!({"ev":"message","off":7,"ts":1_700_000_000_000u64,"conv":"dm:a:b","seq":3,
                   "from":"a","device":"p1","cid":"c1","body":{"text":"hi","n":[1,2.5,null]}})
        );
    }

    #[test]
    fn msgpack_wire_equals_json_wire() {
        let r = message();
        let m = Codec::Msgpack.encode(&r.wire()).unwrap();
        let j = Codec::Json.encode(&r.wire()).unwrap();
        assert_eq!(
            Codec::Msgpack.decode(&m).unwrap(),
            Codec::Json.decode(&j).unwrap()
        );
    }

    #[test]
    fn the_audience_is_the_only_to_on_v1_events() {
        let r = Record {
            off: 9,
            ts: 1,
            to: vec!["a".into(), "b".into()],
            event: Event::CallInvite(CallInviteEv {
                call: "call-9".into(),
                from: "a".into(),
                device: "d".into(),
                to: vec!["b".into()],
                media: Media::Audio,
                ring_ms: 30000,
                time_limit_s: None,
                meta: json!(null),
            }),
        };
        let text = serde_json::to_string(&r.wire_with_audience()).unwrap();
        assert_eq!(text.matches("\"to\"").count(), 1, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["to"], json!(["a", "b"]));
        assert_eq!(v["invited"], json!(["b"]));
        assert_eq!(v["off"], json!(9));
        let m = Codec::Msgpack.encode(&r.wire_with_audience()).unwrap();
        assert_eq!(Codec::Msgpack.decode(&m).unwrap(), v);
    }

    #[test]
    fn record_round_trips_through_msgpack() {
        let r = message();
        let bytes = rmp_serde::to_vec_named(&r).unwrap();
        let back: Record = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, r);
    }
}
