//! Error codes of replies (`{"ok":false,"error":{"code",...}}`) and the close codes the
//! server sends. One place decides how each maps to HTTP status codes.

use serde::Serialize;

/// The `error.code` of a failed reply (protocol section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    Busy,
    RateLimited,
    TooLarge,
    /// Asked for events retention has deleted (HTTP API only).
    Expired,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The HTTP status the backend API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::Busy => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::Expired => 410,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Busy => "busy",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Expired => "expired",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A refused request: a code for machines and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtoError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtoError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
    }
}

/// WebSocket close codes the server sends (protocol section 2, plus RFC 6455 ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// A session silent past `heartbeat.timeout_ms`.
    GoingAway = 1001,
    /// A binary frame on the JSON subprotocol or text on MessagePack.
    UnsupportedData = 1003,
    /// A frame that is not JSON / MessagePack at all.
    InvalidPayload = 1007,
    /// A message over `limits.max_frame_bytes`.
    TooBig = 1009,
    /// Broker shutting down, or the same device connected again; reconnect with `since`.
    ShuttingDown = 4000,
    /// Bad or expired token, or a first frame that is not `hello`.
    Unauthorized = 4001,
    /// Disconnected by the backend.
    Kicked = 4003,
    /// The outbound queue overflowed; reconnect with `since`.
    SlowConsumer = 4008,
    /// Rate limit exceeded repeatedly.
    RateLimited = 4009,
    /// No `hello` in time.
    HelloTimeout = 4011,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        self as u16
    }
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::GoingAway => "heartbeat timeout",
            CloseCode::UnsupportedData => "wrong frame type for the subprotocol",
            CloseCode::InvalidPayload => "frame is not valid for the subprotocol",
            CloseCode::TooBig => "message too large",
            CloseCode::ShuttingDown => "shutting down; reconnect with since",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Kicked => "disconnected by the backend",
            CloseCode::SlowConsumer => "slow consumer; reconnect with since",
            CloseCode::RateLimited => "rate limited",
            CloseCode::HelloTimeout => "no hello in time",
        }
    }
}
