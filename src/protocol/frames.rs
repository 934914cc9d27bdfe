//! Client frames: `{"op": "<name>", "id": <u32>?, ...fields}` parsed into typed operations.
//! Parsing checks types and formats (lengths, enums, ranges) and nothing that needs state,
//! so a malformed frame is `bad_request` before any membership check (rule 10.4).

use serde::Deserialize;
use serde_json::Value;

use super::error::ProtoError;

/// Longest user, device, room and cid ids.
pub const MAX_ID_LEN: usize = 128;
pub const MAX_CID_LEN: usize = 64;

/// A decoded client frame: its reply id and its operation.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub id: Option<u32>,
    pub op: ClientOp,
}

/// Client platforms (`hello.platform`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    #[default]
    Web,
    Android,
    Ios,
    Desktop,
    Server,
}

impl Platform {
    pub const ALL: [Platform; 5] = [
        Platform::Web,
        Platform::Android,
        Platform::Ios,
        Platform::Desktop,
        Platform::Server,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Web => "web",
            Platform::Android => "android",
            Platform::Ios => "ios",
            Platform::Desktop => "desktop",
            Platform::Server => "server",
        }
    }
}

/// Receipt kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptKind {
    Delivered,
    Read,
}

/// Statuses a user may choose (`offline` is never chosen: it is the absence of devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChosenStatus {
    #[default]
    Online,
    Away,
    Busy,
    Invisible,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HelloOp {
    #[serde(default)]
    pub token: Option<String>,
    pub device: String,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub since: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SendOp {
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub conv: Option<String>,
    #[serde(default)]
    pub body: Value,
    pub cid: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ReceiptOp {
    pub conv: String,
    pub kind: ReceiptKind,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TypingOp {
    pub conv: String,
    pub on: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct HistoryOp {
    pub conv: String,
    #[serde(default)]
    pub before: Option<u64>,
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ConversationsOp {
    #[serde(default)]
    pub limit: Option<u32>,
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PresenceOp {
    pub status: ChosenStatus,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RefreshOp {
    pub token: String,
}

/// Signal-quality reports of `call.network`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    Poor,
    Ok,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CallInviteOp {
    #[serde(default)]
    pub to: Option<Vec<String>>,
    #[serde(default)]
    pub conv: Option<String>,
    pub media: crate::log::event::Media,
    #[serde(default)]
    pub ring_ms: Option<u64>,
    #[serde(default)]
    pub time_limit_s: Option<u64>,
    #[serde(default)]
    pub meta: Value,
}

/// `call.accept`, `call.leave`, `call.end`: just the call.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CallRefOp {
    pub call: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CallRejectOp {
    pub call: String,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CallSignalOp {
    pub call: String,
    pub to: String,
    #[serde(default)]
    pub to_device: Option<String>,
    pub kind: String,
    #[serde(default)]
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CallMediaOp {
    pub call: String,
    #[serde(default)]
    pub audio: Option<bool>,
    #[serde(default)]
    pub video: Option<bool>,
    #[serde(default)]
    pub hold: Option<bool>,
    #[serde(default)]
    pub screen: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CallNetworkOp {
    pub call: String,
    pub quality: Quality,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PushRegisterOp {
    pub provider: crate::push::provider::ProviderKind,
    pub token: String,
    /// Which configured app the token belongs to (default: the provider's first).
    #[serde(default)]
    pub app: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PushUnregisterOp {
    pub provider: crate::push::provider::ProviderKind,
    /// The token to drop (default: whatever this device has for the provider).
    #[serde(default)]
    pub token: Option<String>,
}

/// Longest push token accepted.
pub const MAX_PUSH_TOKEN_LEN: usize = 4096;

/// Ring time bounds (rule 18), ms.
pub const RING_MS: std::ops::RangeInclusive<u64> = 1_000..=300_000;
pub const DEFAULT_RING_MS: u64 = 30_000;
/// Call time limit bounds (rule 18), s.
pub const TIME_LIMIT_S: std::ops::RangeInclusive<u64> = 1..=86_400;

/// Every operation a client may send.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op")]
pub enum ClientOp {
    #[serde(rename = "hello")]
    Hello(HelloOp),
    #[serde(rename = "refresh")]
    Refresh(RefreshOp),
    #[serde(rename = "send")]
    Send(SendOp),
    #[serde(rename = "receipt")]
    Receipt(ReceiptOp),
    #[serde(rename = "typing")]
    Typing(TypingOp),
    #[serde(rename = "history")]
    History(HistoryOp),
    #[serde(rename = "conversations")]
    Conversations(ConversationsOp),
    #[serde(rename = "unread")]
    Unread {},
    #[serde(rename = "presence")]
    Presence(PresenceOp),
    #[serde(rename = "call.invite")]
    CallInvite(CallInviteOp),
    #[serde(rename = "call.accept")]
    CallAccept(CallRefOp),
    #[serde(rename = "call.reject")]
    CallReject(CallRejectOp),
    #[serde(rename = "call.signal")]
    CallSignal(CallSignalOp),
    #[serde(rename = "call.media")]
    CallMedia(CallMediaOp),
    #[serde(rename = "call.network")]
    CallNetwork(CallNetworkOp),
    #[serde(rename = "call.leave")]
    CallLeave(CallRefOp),
    #[serde(rename = "call.end")]
    CallEnd(CallRefOp),
    #[serde(rename = "push.register")]
    PushRegister(PushRegisterOp),
    #[serde(rename = "push.unregister")]
    PushUnregister(PushUnregisterOp),
}

impl ClientOp {
    /// The op name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            ClientOp::Hello(_) => "hello",
            ClientOp::Refresh(_) => "refresh",
            ClientOp::Send(_) => "send",
            ClientOp::Receipt(_) => "receipt",
            ClientOp::Typing(_) => "typing",
            ClientOp::History(_) => "history",
            ClientOp::Conversations(_) => "conversations",
            ClientOp::Unread {} => "unread",
            ClientOp::Presence(_) => "presence",
            ClientOp::CallInvite(_) => "call.invite",
            ClientOp::CallAccept(_) => "call.accept",
            ClientOp::CallReject(_) => "call.reject",
            ClientOp::CallSignal(_) => "call.signal",
            ClientOp::CallMedia(_) => "call.media",
            ClientOp::CallNetwork(_) => "call.network",
            ClientOp::CallLeave(_) => "call.leave",
            ClientOp::CallEnd(_) => "call.end",
            ClientOp::PushRegister(_) => "push.register",
            ClientOp::PushUnregister(_) => "push.unregister",
        }
    }
}

/// A frame that failed to parse, with the id to answer to (if one could be read).
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub id: Option<u32>,
    pub error: ProtoError,
}

/// Parses a decoded frame value into a typed, format-checked frame.
pub fn parse_frame(value: Value) -> Result<ClientFrame, FrameError> {
    let Value::Object(map) = &value else {
        return Err(FrameError {
            id: None,
            error: ProtoError::bad_request("a frame must be an object"),
        });
    };
    let id = match map.get("id") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) => Some(n),
            None => {
                return Err(FrameError {
                    id: None,
                    error: ProtoError::bad_request("`id` must be an integer 0..=4294967295"),
                })
            }
        },
    };
    let fail = |message: String| FrameError {
        id,
        error: ProtoError::bad_request(message),
    };
    match map.get("op") {
        Some(Value::String(_)) => {}
        Some(_) => return Err(fail("`op` must be a string".into())),
        None => return Err(fail("missing `op`".into())),
    }
    let op: ClientOp = serde_json::from_value(value).map_err(|e| fail(clean_serde_error(&e)))?;
    check_formats(&op).map_err(|e| FrameError { id, error: e })?;
    Ok(ClientFrame { id, op })
}

fn clean_serde_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if text.starts_with("unknown variant") {
        // "unknown variant `teleport`, expected one of ..." -> keep the op name only.
        let name = text.split('`').nth(1).unwrap_or("?");
        return format!("unknown op `{name}`");
    }
    text
}

/// Checks an id-like string: 1..=max chars, no control characters.
pub fn check_id(what: &str, s: &str, max: usize) -> Result<(), ProtoError> {
    let n = s.chars().count();
    if n == 0 || n > max {
        return Err(ProtoError::bad_request(format!(
            "`{what}` must be 1-{max} characters"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(ProtoError::bad_request(format!(
            "`{what}` must not contain control characters"
        )));
    }
    Ok(())
}

/// A user id: an id without `:` (it separates the parts of `dm:<a>:<b>`).
pub fn check_user(what: &str, s: &str) -> Result<(), ProtoError> {
    check_id(what, s, MAX_ID_LEN)?;
    if s.contains(':') {
        return Err(ProtoError::bad_request(format!(
            "`{what}` must not contain ':'"
        )));
    }
    Ok(())
}

fn check_limit(limit: Option<u32>) -> Result<(), ProtoError> {
    match limit {
        Some(n) if !(1..=200).contains(&n) => Err(ProtoError::bad_request("`limit` must be 1-200")),
        _ => Ok(()),
    }
}

fn check_formats(op: &ClientOp) -> Result<(), ProtoError> {
    match op {
        ClientOp::Hello(h) => check_id("device", &h.device, MAX_ID_LEN),
        ClientOp::Send(s) => {
            check_id("cid", &s.cid, MAX_CID_LEN)?;
            match (&s.to, &s.conv) {
                (Some(to), None) => check_user("to", to),
                (None, Some(conv)) => crate::state::ConvId::parse(conv).map(|_| ()),
                _ => Err(ProtoError::bad_request(
                    "`send` needs exactly one of `to` and `conv`",
                )),
            }
        }
        ClientOp::Receipt(r) => crate::state::ConvId::parse(&r.conv).map(|_| ()),
        ClientOp::Typing(t) => crate::state::ConvId::parse(&t.conv).map(|_| ()),
        ClientOp::History(h) => {
            check_limit(h.limit)?;
            crate::state::ConvId::parse(&h.conv).map(|_| ())
        }
        ClientOp::Conversations(c) => check_limit(c.limit),
        ClientOp::CallInvite(c) => {
            match (&c.to, &c.conv) {
                (Some(to), None) => {
                    if to.is_empty() {
                        return Err(ProtoError::bad_request("`to` lists at least one user"));
                    }
                    for u in to {
                        check_user("to", u)?;
                    }
                }
                (None, Some(conv)) => {
                    crate::state::ConvId::parse(conv)?;
                }
                _ => {
                    return Err(ProtoError::bad_request(
                        "`call.invite` needs exactly one of `to` and `conv`",
                    ))
                }
            }
            if c.time_limit_s.is_some_and(|t| !TIME_LIMIT_S.contains(&t)) {
                return Err(ProtoError::bad_request("`time_limit_s` must be 1-86400"));
            }
            Ok(())
        }
        ClientOp::CallSignal(s) => {
            check_id("call", &s.call, MAX_ID_LEN)?;
            check_user("to", &s.to)?;
            check_id("kind", &s.kind, MAX_ID_LEN)?;
            match &s.to_device {
                Some(d) => check_id("to_device", d, MAX_ID_LEN),
                None => Ok(()),
            }
        }
        ClientOp::CallAccept(c) | ClientOp::CallLeave(c) | ClientOp::CallEnd(c) => {
            check_id("call", &c.call, MAX_ID_LEN)
        }
        ClientOp::CallReject(c) => check_id("call", &c.call, MAX_ID_LEN),
        ClientOp::CallMedia(c) => check_id("call", &c.call, MAX_ID_LEN),
        ClientOp::CallNetwork(c) => check_id("call", &c.call, MAX_ID_LEN),
        ClientOp::PushRegister(p) => {
            check_id("token", &p.token, MAX_PUSH_TOKEN_LEN)?;
            match &p.app {
                Some(a) => check_id("app", a, MAX_ID_LEN),
                None => Ok(()),
            }
        }
        ClientOp::PushUnregister(p) => match &p.token {
            Some(t) => check_id("token", t, MAX_PUSH_TOKEN_LEN),
            None => Ok(()),
        },
        ClientOp::Refresh(_) | ClientOp::Unread {} | ClientOp::Presence(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;
    use serde_json::json;

    fn err(v: Value) -> FrameError {
        parse_frame(v).unwrap_err()
    }

    #[test]
    fn a_send_frame_parses() {
        let f =
            parse_frame(json!({"op":"send","id":7,"to":"bob","body":{"x":1},"cid":"c1"})).unwrap();
        assert_eq!(f.id, Some(7));
        match f.op {
            ClientOp::Send(s) => {
                assert_eq!(s.to.as_deref(), Some("bob"));
                assert_eq!(s.body, json!({"x":1}));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_op_keeps_the_id() {
        let e = err(json!({"op":"teleport","id":7}));
        assert_eq!(e.id, Some(7));
        assert_eq!(e.error.code, ErrorCode::BadRequest);
        assert!(e.error.message.contains("teleport"));
    }

    #[test]
    fn wrong_types_are_bad_request() {
        for v in [
            json!({"op":5,"id":1}),
            json!({"id":3}),
            json!({"op":"send","id":1,"to":123,"body":"x","cid":"c"}),
            json!({"op":"send","id":1,"to":"b","body":"x","cid":99}),
            json!({"op":"receipt","id":1,"conv":"dm:a:b","kind":"seen","seq":1}),
            json!({"op":"typing","id":1,"conv":"dm:a:b","on":"yes"}),
            json!({"op":"history","id":1,"conv":42}),
            json!({"op":"presence","id":1,"status":"sleeping"}),
            json!({"op":"history","id":1,"conv":"dm:a:b","limit":0}),
            json!({"op":"send","id":1,"to":"b","body":"x","cid":""}),
        ] {
            let e = err(v.clone());
            assert_eq!(e.error.code, ErrorCode::BadRequest, "{v}");
            assert_eq!(
                e.id,
                v.get("id").and_then(Value::as_u64).map(|n| n as u32),
                "{v}"
            );
        }
    }

    #[test]
    fn non_objects_and_bad_ids_have_no_reply_id() {
        assert_eq!(err(json!([1, 2])).id, None);
        assert_eq!(err(json!({"op":"unread","id":"x"})).id, None);
        assert_eq!(err(json!({"op":"unread","id":-1})).id, None);
    }
}
