//! APNs provider-API client for one app (push-anchors.md section 2): HTTP/2, token auth
//! with an ES256 provider JWT made from the `.p8` key, cached and shared by every caller
//! and regenerated after 50 minutes (Apple: no more than once per 20, no less than once
//! per 60 minutes), never per request.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::RwLock;

use super::provider::{redact, Outcome, ProviderKind, PushMessage};
use super::providers::{
    exchange, fit_payload, short_collapse_id, Answer, PushConfigError, METRIC_TOKEN_REFRESHES,
};
use crate::config::ApnsApp;

/// Payload limit of alert and background pushes, bytes.
pub const APNS_MAX_PAYLOAD: usize = 4096;
/// Payload limit of VoIP pushes, bytes.
pub const APNS_MAX_PAYLOAD_VOIP: usize = 5120;
/// Age after which the provider JWT is regenerated.
pub const JWT_MAX_AGE: Duration = Duration::from_secs(50 * 60);
/// Apple refuses provider-token updates more often than this.
const JWT_MIN_AGE: Duration = Duration::from_secs(20 * 60);

/// An APNs app entry that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ApnsSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a PKCS#8 EC P-256 PEM key: {source}")]
    Key {
        path: String,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    #[error("must not be empty")]
    Empty { field: &'static str },
    #[error("not a usable base URL: {0}")]
    BaseUrl(String),
}

impl ApnsSetupError {
    /// As a config error; `prefix` is the app's key (`push.apns.apps[0]`).
    pub fn into_config_error(self, prefix: &str) -> PushConfigError {
        match self {
            ApnsSetupError::Read { path, source } => PushConfigError::Read {
                key: format!("{prefix}.key_file"),
                path,
                source,
            },
            ApnsSetupError::Empty { field } => {
                PushConfigError::invalid(format!("{prefix}.{field}"), "must not be empty")
            }
            ApnsSetupError::BaseUrl(reason) => {
                PushConfigError::invalid("push.apns.base_url", reason)
            }
            other @ ApnsSetupError::Key { .. } => {
                PushConfigError::invalid(format!("{prefix}.key_file"), other.to_string())
            }
        }
    }
}

#[derive(Debug, Serialize)]
struct ProviderClaims<'a> {
    iss: &'a str,
    iat: u64,
}

#[derive(Debug)]
struct ProviderJwt {
    value: String,
    made: Instant,
}

#[derive(Debug, Deserialize, Default)]
struct ApnsErrorBody {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    timestamp: Option<u64>,
}

/// APNs client for one app (one key, one team, one bundle id).
pub struct ApnsClient {
    name: String,
    http: reqwest::Client,
    base_url: reqwest::Url,
    key_id: String,
    team_id: String,
    topic: String,
    key: EncodingKey,
    jwt: RwLock<Option<Arc<ProviderJwt>>>,
}

impl std::fmt::Debug for ApnsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsClient")
            .field("name", &self.name)
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

enum Class {
    Done(Outcome),
    /// 403 ExpiredProviderToken: a new JWT may cure it.
    ExpiredJwt(String),
}

impl ApnsClient {
    /// Reads the app's `.p8` key. `base_url` has no trailing slash.
    pub fn load(
        app: &ApnsApp,
        base_url: &str,
        http: reqwest::Client,
    ) -> Result<Self, ApnsSetupError> {
        for (field, value) in [
            ("key_file", &app.key_file),
            ("key_id", &app.key_id),
            ("team_id", &app.team_id),
            ("topic", &app.topic),
        ] {
            if value.trim().is_empty() {
                return Err(ApnsSetupError::Empty { field });
            }
        }
        let path = app.key_file.clone();
        let pem = std::fs::read(Path::new(&path)).map_err(|source| ApnsSetupError::Read {
            path: path.clone(),
            source,
        })?;
        let key = EncodingKey::from_ec_pem(&pem).map_err(|source| ApnsSetupError::Key {
            path: path.clone(),
            source,
        })?;
        // Sign once now so a key of the wrong curve fails at startup, not on the first push.
        let probe = ProviderClaims {
            iss: &app.team_id,
            iat: 0,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &probe, &key)
            .map_err(|source| ApnsSetupError::Key { path, source })?;
        let base_url =
            reqwest::Url::parse(base_url).map_err(|e| ApnsSetupError::BaseUrl(e.to_string()))?;
        if base_url.cannot_be_a_base() {
            return Err(ApnsSetupError::BaseUrl(base_url.to_string()));
        }
        Ok(ApnsClient {
            name: app.name.clone(),
            http,
            base_url,
            key_id: app.key_id.trim().to_string(),
            team_id: app.team_id.trim().to_string(),
            topic: app.topic.trim().to_string(),
            key,
            jwt: RwLock::new(None),
        })
    }

    /// The app's name (`push.apns.apps[].name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bundle id (VoIP pushes go to `<topic>.voip`).
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Sends one push. `403 ExpiredProviderToken` gets one new JWT and one more try.
    pub async fn send(&self, msg: &PushMessage) -> Outcome {
        let request = match self.prepare(msg) {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        let mut renewed = false;
        loop {
            let jwt = match self.provider_jwt().await {
                Ok(j) => j,
                Err(outcome) => return outcome,
            };
            let mut req = self
                .http
                .post(request.url.clone())
                .header(
                    reqwest::header::AUTHORIZATION,
                    format!("bearer {}", jwt.value),
                )
                .header(reqwest::header::CONTENT_TYPE, "application/json");
            for (name, value) in &request.headers {
                req = req.header(*name, value.as_str());
            }
            let Answer {
                status,
                after,
                body: bytes,
            } = match exchange(req.body(request.body.clone()), "apns").await {
                Ok(a) => a,
                Err(outcome) => return outcome,
            };
            match classify(status, after, &bytes) {
                Class::Done(outcome) => return outcome,
                Class::ExpiredJwt(reason) => {
                    if renewed {
                        return Outcome::AuthFailed {
                            reason: format!(
                                "{reason} (again with a new provider token; check the clock)"
                            ),
                        };
                    }
                    renewed = true;
                    let age = jwt.made.elapsed();
                    if age < JWT_MIN_AGE {
                        tracing::warn!(
                            app = %self.name,
                            age_s = age.as_secs(),
                            "apns: ExpiredProviderToken for a young provider token; check the clock"
                        );
                    }
                    self.invalidate(&jwt.value).await;
                }
            }
        }
    }

    /// The cached provider JWT, made anew when missing or older than [`JWT_MAX_AGE`].
    async fn provider_jwt(&self) -> Result<Arc<ProviderJwt>, Outcome> {
        if let Some(j) = young(&*self.jwt.read().await) {
            return Ok(j);
        }
        let mut slot = self.jwt.write().await;
        if let Some(j) = young(&slot) {
            return Ok(j);
        }
        metrics::counter!(METRIC_TOKEN_REFRESHES, "provider" => "apns").increment(1);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        header.typ = None;
        let claims = ProviderClaims {
            iss: &self.team_id,
            iat: super::providers::now_unix_s(),
        };
        let value =
            jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| Outcome::AuthFailed {
                reason: format!("apns: cannot sign the provider token: {e}"),
            })?;
        tracing::debug!(app = %self.name, "apns: new provider token");
        let jwt = Arc::new(ProviderJwt {
            value,
            made: Instant::now(),
        });
        *slot = Some(jwt.clone());
        Ok(jwt)
    }

    /// Forgets the JWT `used` unless someone has already replaced it.
    async fn invalidate(&self, used: &str) {
        let mut slot = self.jwt.write().await;
        if slot.as_ref().is_some_and(|j| j.value == used) {
            *slot = None;
        }
    }

    fn prepare(&self, msg: &PushMessage) -> Result<Prepared, Outcome> {
        let voip = msg.provider == ProviderKind::ApnsVoip;
        let visible = msg.title.is_some() || msg.body.is_some();
        let mut url = self.base_url.clone();
        match url.path_segments_mut() {
            Ok(mut segments) => {
                segments
                    .pop_if_empty()
                    .extend(["3", "device", msg.token.as_str()]);
            }
            Err(()) => {
                return Err(Outcome::AuthFailed {
                    reason: "apns: push.apns.base_url cannot take a path".into(),
                })
            }
        }
        let (push_type, priority) = if voip {
            ("voip", "10")
        } else if visible {
            ("alert", "10")
        } else {
            // Apple: background pushes must be priority 5.
            ("background", "5")
        };
        let topic = if voip {
            format!("{}.voip", self.topic)
        } else {
            self.topic.clone()
        };
        let mut headers: Vec<(&'static str, String)> = vec![
            ("apns-topic", topic),
            ("apns-push-type", push_type.to_string()),
            ("apns-priority", priority.to_string()),
        ];
        match msg.expires_at_ms {
            Some(at_ms) => headers.push(("apns-expiration", at_ms.div_ceil(1000).to_string())),
            None if voip => headers.push(("apns-expiration", "0".to_string())),
            None => {}
        }
        if !msg.collapse_id.is_empty() {
            headers.push(("apns-collapse-id", short_collapse_id(&msg.collapse_id)));
        }
        let limit = if voip {
            APNS_MAX_PAYLOAD_VOIP
        } else {
            APNS_MAX_PAYLOAD
        };
        let body = fit_payload(
            msg.title.as_deref(),
            msg.body.as_deref(),
            limit,
            |title, body| {
                serde_json::to_vec(&payload_json(msg, voip, title, body)).unwrap_or_default()
            },
        );
        if body.len() > limit {
            tracing::warn!(
                app = %self.name,
                token = %redact(&msg.token),
                bytes = body.len(),
                "apns: payload over the limit even without text (data too large)"
            );
        }
        Ok(Prepared { url, headers, body })
    }
}

struct Prepared {
    url: reqwest::Url,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn young(slot: &Option<Arc<ProviderJwt>>) -> Option<Arc<ProviderJwt>> {
    slot.as_ref()
        .filter(|j| j.made.elapsed() < JWT_MAX_AGE)
        .cloned()
}

/// `{"aps": {...}, <data keys>}`: an alert with sound for visible pushes, content-available
/// for background ones; VoIP payloads carry the data (and the text, if any).
fn payload_json(msg: &PushMessage, voip: bool, title: Option<&str>, body: Option<&str>) -> Value {
    let mut aps = serde_json::Map::new();
    if title.is_some() || body.is_some() {
        let mut alert = serde_json::Map::new();
        if let Some(t) = title {
            alert.insert("title".into(), json!(t));
        }
        if let Some(b) = body {
            alert.insert("body".into(), json!(b));
        }
        aps.insert("alert".into(), Value::Object(alert));
        if !voip {
            aps.insert("sound".into(), json!("default"));
        }
    } else if !voip {
        aps.insert("content-available".into(), json!(1));
    }
    let mut root = serde_json::Map::new();
    root.insert("aps".into(), Value::Object(aps));
    for (k, v) in &msg.data {
        if k != "aps" {
            root.insert(k.clone(), json!(v));
        }
    }
    Value::Object(root)
}

/// Classifies one APNs answer (push-anchors.md section 3).
fn classify(status: StatusCode, after: Option<Duration>, body: &[u8]) -> Class {
    if status.is_success() {
        return Class::Done(Outcome::Sent);
    }
    let code = status.as_u16();
    let err: ApnsErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let reason_code = if err.reason.is_empty() {
        "(no reason)".to_string()
    } else {
        super::providers::cut_chars(&err.reason, 64)
    };
    let reason = format!("apns {code} {reason_code}");
    let outcome = match (code, err.reason.as_str()) {
        (400, "BadDeviceToken" | "DeviceTokenNotForTopic") => Outcome::TokenDead { reason },
        (400, "IdleTimeout") => Outcome::Retry { after, reason },
        (400 | 404 | 405 | 413, _) => Outcome::Rejected { reason },
        (403, "ExpiredProviderToken") => return Class::ExpiredJwt(reason),
        (403, _) => Outcome::AuthFailed { reason },
        (410, _) => Outcome::TokenDead {
            reason: match err.timestamp {
                Some(ts) => format!("{reason} (timestamp {ts})"),
                None => reason,
            },
        },
        // Our JWT cache failed; wait Apple's 20 minutes before the next update.
        (429, "TooManyProviderTokenUpdates") => Outcome::Throttled {
            after: after.unwrap_or(JWT_MIN_AGE),
            reason,
        },
        (429, _) => Outcome::Retry { after, reason },
        (408, _) | (500..=599, _) => Outcome::Retry { after, reason },
        _ => Outcome::Rejected { reason },
    };
    Class::Done(outcome)
}
