//! The provider seam: one push to one token, and what came of it. The worker decides
//! what to do with an [`Outcome`]; the providers (`fcm`, `apns`) only speak HTTP and
//! classify answers (shared research: push-anchors.md section 3).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Push providers a device token can belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Fcm,
    Apns,
    /// PushKit (VoIP) tokens, for incoming calls on iOS.
    ApnsVoip,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Fcm => "fcm",
            ProviderKind::Apns => "apns",
            ProviderKind::ApnsVoip => "apns_voip",
        }
    }
}

/// One push, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct PushMessage {
    pub provider: ProviderKind,
    /// The app (credentials) the token belongs to; `None`: the provider's first app.
    pub app: Option<String>,
    pub token: String,
    /// Visible notification text; `None` for data-only pushes (calls).
    pub title: Option<String>,
    pub body: Option<String>,
    /// Data for the app (`conv`, `seq`, `off`, `call`, `type`): strings only (FCM's rule).
    pub data: BTreeMap<String, String>,
    /// The same id for every attempt, so a retried push never shows twice.
    pub collapse_id: String,
    /// Incoming calls: high priority (FCM HIGH, APNs 10 / voip).
    pub urgent: bool,
    /// Unix ms after which the push is pointless (APNs `apns-expiration`, FCM `ttl`).
    pub expires_at_ms: Option<u64>,
}

/// What a send attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent,
    /// Try again later (5xx, timeouts, per-token 429); `after` from Retry-After if given.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// The whole provider app is throttled (FCM 429): pause it all for `after`.
    Throttled {
        after: Duration,
        reason: String,
    },
    /// The token is dead (UNREGISTERED, 410, BadDeviceToken, SENDER_ID_MISMATCH): prune it.
    TokenDead {
        reason: String,
    },
    /// Our payload or headers were refused: drop the push and alert (a bug of ours).
    Rejected {
        reason: String,
    },
    /// Credentials refused (or missing): pause the app and alert the operator.
    AuthFailed {
        reason: String,
    },
}

impl Outcome {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Retry { .. } => "retry",
            Outcome::Throttled { .. } => "throttled",
            Outcome::TokenDead { .. } => "token_dead",
            Outcome::Rejected { .. } => "rejected",
            Outcome::AuthFailed { .. } => "auth_failed",
        }
    }
}

/// A token, shortened for logs (tokens are never logged whole).
pub fn redact(token: &str) -> String {
    let n = token.chars().count();
    if n <= 8 {
        return "…".into();
    }
    let head: String = token.chars().take(4).collect();
    let tail: String = token.chars().skip(n - 4).collect();
    format!("{head}…{tail}")
}
