//! Commands: everything the sequencer can be asked to do. Sessions and the HTTP API build
//! them; only the sequencer turns them into events.

use serde_json::Value;
use tokio::sync::oneshot;

use crate::fanout::{SessionHandle, SessionId};
use crate::protocol::{ClientOp, ProtoError};

/// A successful API answer: an HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiReply {
    pub status: u16,
    pub body: Value,
}

pub type ApiResult = Result<ApiReply, ProtoError>;

/// A request from the backend HTTP API.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiCmd {
    CreateRoom {
        id: String,
        name: String,
        members: Vec<String>,
    },
    AddMember {
        room: String,
        user: String,
    },
    RemoveMember {
        room: String,
        user: String,
    },
    Publish {
        room: String,
        from: String,
        body: Value,
        cid: Option<String>,
    },
    Notice {
        user: String,
        kind: String,
        data: Value,
    },
    SetContacts {
        user: String,
        contacts: Vec<String>,
    },
    Disconnect {
        user: String,
        /// The backend's reason, kept in the `tokens.revoked` event.
        reason: Option<String>,
    },
    Presence {
        user: String,
    },
    /// A room's name and members.
    Room {
        room: String,
    },
    Connections,
    History {
        conv: String,
        before: Option<u64>,
        limit: usize,
    },
    Stats,
}

/// What a session asks when its `hello` is authenticated.
#[derive(Debug)]
pub struct HelloCmd {
    pub handle: SessionHandle,
    pub reply_id: Option<u32>,
    pub since: Option<u64>,
    /// The token's `contacts` claim, when it has one.
    pub contacts: Option<Vec<String>>,
    /// The token's `iat` (Unix s), checked against a backend disconnect.
    pub iat: Option<u64>,
    /// Answered once the session is registered (or refused).
    pub done: oneshot::Sender<Result<(), ProtoError>>,
}

#[derive(Debug)]
pub enum Command {
    Hello(Box<HelloCmd>),
    /// The session's socket is gone.
    Goodbye {
        session: SessionId,
    },
    /// An operation of a session past hello.
    Op {
        session: SessionId,
        id: Option<u32>,
        op: ClientOp,
    },
    /// A session's `refresh` whose token verified for the session's own user: accepted
    /// unless the token was issued before a backend disconnect of that user.
    Refresh {
        session: SessionId,
        id: Option<u32>,
        /// The new token's `exp` (Unix s).
        exp: u64,
        /// The new token's `iat` (Unix s).
        iat: Option<u64>,
    },
    /// A frame of a session that failed before reaching State (answered in order).
    Reject {
        session: SessionId,
        id: Option<u32>,
        error: ProtoError,
    },
    Api(ApiCmd, oneshot::Sender<ApiResult>),
    /// The push worker found a token dead: prune it (unless re-registered since).
    PushTokenDead {
        user: String,
        device: String,
        provider: crate::push::provider::ProviderKind,
        token: String,
        reason: String,
    },
    /// Write a snapshot of State now (scheduled).
    Snapshot,
    /// Retention: move the floor up to `floor` (never past the committed head + 1, never
    /// down), durably, before anything below it is deleted. Answers the floor in force.
    SetFloor {
        floor: u64,
        done: oneshot::Sender<Result<u64, crate::log::LogError>>,
    },
    /// The scheduled sweep: end leftover sessions and presence entries.
    Sweep,
    /// Shutdown has begun: session ends no longer change presence.
    Drain,
    /// Commit, flush and stop.
    Stop(oneshot::Sender<()>),
}
