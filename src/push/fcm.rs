//! FCM HTTP v1 client for one Firebase project (push-anchors.md section 1).
//!
//! Credentials: a service-account JSON; OAuth2 access tokens come from its `token_uri`
//! through the JWT-bearer grant (RS256 assertion), are cached and shared by every caller,
//! and are refreshed single-flight when less than 5 minutes remain.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{Mutex, RwLock};

use super::provider::{Outcome, PushMessage};
use super::providers::{
    exchange, fit_payload, now_unix_ms, now_unix_s, request_error_text, retry_after,
    short_collapse_id, Answer, PushConfigError, METRIC_TOKEN_REFRESHES,
};
use crate::config::FcmApp;

/// OAuth2 scope of FCM sends.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// FCM's payload limit, bytes.
pub const FCM_MAX_PAYLOAD: usize = 4096;
/// Refresh the access token when less than this remains.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Lifetime asked for in the assertion (`exp - iat`), s.
const ASSERTION_LIFETIME_S: u64 = 3600;
/// FCM 429 without Retry-After: pause the project this long.
const DEFAULT_THROTTLE: Duration = Duration::from_secs(60);
/// Longest `android.ttl` FCM takes (4 weeks), s.
const MAX_TTL_S: u64 = 28 * 24 * 3600;

const FCM_ERROR_TYPE: &str = "type.googleapis.com/google.firebase.fcm.v1.FcmError";
const BAD_REQUEST_TYPE: &str = "type.googleapis.com/google.rpc.BadRequest";

/// A service-account file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FcmSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a service-account JSON: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field {field} is missing or empty")]
    MissingField { path: String, field: &'static str },
    #[error("{path}: private_key is not an RSA PEM key: {source}")]
    Key {
        path: String,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
}

impl FcmSetupError {
    /// As a config error about `key` (the `service_account` entry).
    pub fn into_config_error(self, key: &str) -> PushConfigError {
        match self {
            FcmSetupError::Read { path, source } => PushConfigError::Read {
                key: key.to_string(),
                path,
                source,
            },
            other => PushConfigError::invalid(key, other.to_string()),
        }
    }
}

/// The fields of a service-account JSON that FCM needs.
#[derive(Debug, Clone, Deserialize)]
struct ServiceAccount {
    #[serde(default)]
    project_id: String,
    #[serde(default)]
    client_email: String,
    #[serde(default)]
    private_key: String,
    #[serde(default)]
    private_key_id: String,
    #[serde(default)]
    token_uri: String,
}

#[derive(Debug, Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
struct TokenError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

#[derive(Debug)]
struct AccessToken {
    value: String,
    refresh_at: Instant,
}

/// FCM client for one app (one service account, one project).
pub struct FcmClient {
    name: String,
    http: reqwest::Client,
    send_url: String,
    project_id: String,
    client_email: String,
    key_id: String,
    token_uri: String,
    key: EncodingKey,
    token: RwLock<Option<Arc<AccessToken>>>,
    refresh: Mutex<()>,
}

impl std::fmt::Debug for FcmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmClient")
            .field("name", &self.name)
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .finish_non_exhaustive()
    }
}

/// What one HTTP answer means.
enum Class {
    Done(Outcome),
    /// 401 that a new access token may cure.
    Unauthenticated(String),
}

impl FcmClient {
    /// Reads the app's service-account JSON. `base_url` has no trailing slash.
    pub fn load(
        app: &FcmApp,
        base_url: &str,
        http: reqwest::Client,
    ) -> Result<Self, FcmSetupError> {
        let path = app.service_account.clone();
        let raw = std::fs::read(Path::new(&path)).map_err(|source| FcmSetupError::Read {
            path: path.clone(),
            source,
        })?;
        let sa: ServiceAccount =
            serde_json::from_slice(&raw).map_err(|source| FcmSetupError::Parse {
                path: path.clone(),
                source,
            })?;
        for (field, value) in [
            ("project_id", &sa.project_id),
            ("client_email", &sa.client_email),
            ("private_key", &sa.private_key),
            ("token_uri", &sa.token_uri),
        ] {
            if value.trim().is_empty() {
                return Err(FcmSetupError::MissingField { path, field });
            }
        }
        let key = EncodingKey::from_rsa_pem(sa.private_key.as_bytes()).map_err(|source| {
            FcmSetupError::Key {
                path: path.clone(),
                source,
            }
        })?;
        Ok(FcmClient {
            name: app.name.clone(),
            http,
            send_url: format!("{base_url}/v1/projects/{}/messages:send", sa.project_id),
            project_id: sa.project_id,
            client_email: sa.client_email,
            key_id: sa.private_key_id,
            token_uri: sa.token_uri,
            key,
            token: RwLock::new(None),
            refresh: Mutex::new(()),
        })
    }

    /// The app's name (`push.fcm.apps[].name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Firebase project id of the service account.
    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// Sends one push. A 401 (not `THIRD_PARTY_AUTH_ERROR`) gets one new access token and
    /// one more try; a second 401 is `AuthFailed`.
    pub async fn send(&self, msg: &PushMessage) -> Outcome {
        let body = build_body(msg);
        let mut reauthed = false;
        loop {
            let token = match self.access_token().await {
                Ok(t) => t,
                Err(outcome) => return outcome,
            };
            let req = self
                .http
                .post(&self.send_url)
                .bearer_auth(&token.value)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            let Answer {
                status,
                after,
                body: bytes,
            } = match exchange(req, "fcm").await {
                Ok(a) => a,
                Err(outcome) => return outcome,
            };
            match classify(status, after, &bytes) {
                Class::Done(outcome) => return outcome,
                Class::Unauthenticated(reason) => {
                    if reauthed {
                        return Outcome::AuthFailed {
                            reason: format!("fcm: {reason} (again with a new access token)"),
                        };
                    }
                    reauthed = true;
                    tracing::info!(app = %self.name, "fcm: 401, refreshing the access token");
                    self.invalidate(&token.value).await;
                }
            }
        }
    }

    /// The cached access token, fetched first if missing or about to expire. One fetch at
    /// a time: concurrent callers wait for it and share its result.
    async fn access_token(&self) -> Result<Arc<AccessToken>, Outcome> {
        if let Some(t) = fresh(&*self.token.read().await) {
            return Ok(t);
        }
        let _single_flight = self.refresh.lock().await;
        if let Some(t) = fresh(&*self.token.read().await) {
            return Ok(t);
        }
        let token = Arc::new(self.fetch_token().await?);
        *self.token.write().await = Some(token.clone());
        Ok(token)
    }

    /// Forgets the token `used` unless someone has already replaced it.
    async fn invalidate(&self, used: &str) {
        let mut slot = self.token.write().await;
        if slot.as_ref().is_some_and(|t| t.value == used) {
            *slot = None;
        }
    }

    fn assertion(&self) -> Result<String, Outcome> {
        let iat = now_unix_s();
        let claims = AssertionClaims {
            iss: &self.client_email,
            scope: FCM_SCOPE,
            aud: &self.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME_S,
        };
        let mut header = Header::new(Algorithm::RS256);
        if !self.key_id.is_empty() {
            header.kid = Some(self.key_id.clone());
        }
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| Outcome::AuthFailed {
            reason: format!("fcm: cannot sign the OAuth2 assertion: {e}"),
        })
    }

    async fn fetch_token(&self) -> Result<AccessToken, Outcome> {
        metrics::counter!(METRIC_TOKEN_REFRESHES, "provider" => "fcm").increment(1);
        let assertion = self.assertion()?;
        let started = Instant::now();
        let resp = self
            .http
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| Outcome::Retry {
                after: None,
                reason: format!("fcm token endpoint: {}", request_error_text(e)),
            })?;
        let status = resp.status();
        let after = retry_after(resp.headers());
        let bytes = resp.bytes().await.map_err(|e| Outcome::Retry {
            after,
            reason: format!("fcm token endpoint: {}", request_error_text(e)),
        })?;
        if status.is_success() {
            let parsed: TokenResponse =
                serde_json::from_slice(&bytes).map_err(|e| Outcome::AuthFailed {
                    reason: format!("fcm token endpoint: unexpected answer ({e})"),
                })?;
            if parsed.access_token.is_empty() {
                return Err(Outcome::AuthFailed {
                    reason: "fcm token endpoint: empty access_token".into(),
                });
            }
            let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(3600));
            let margin = REFRESH_MARGIN.min(lifetime / 2);
            tracing::debug!(app = %self.name, expires_in = lifetime.as_secs(), "fcm: new access token");
            return Ok(AccessToken {
                value: parsed.access_token,
                refresh_at: started + lifetime - margin,
            });
        }
        let err: TokenError = serde_json::from_slice(&bytes).unwrap_or_default();
        let what = if err.error.is_empty() {
            format!("HTTP {}", status.as_u16())
        } else if err.error_description.is_empty() {
            format!("HTTP {} {}", status.as_u16(), err.error)
        } else {
            format!(
                "HTTP {} {}: {}",
                status.as_u16(),
                err.error,
                err.error_description
            )
        };
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(Outcome::Retry {
                after,
                reason: format!("fcm token endpoint: {what}"),
            });
        }
        // invalid_grant (bad key, clock skew, deleted account), invalid_client, ...
        Err(Outcome::AuthFailed {
            reason: format!("fcm token endpoint: {what}"),
        })
    }
}

fn fresh(slot: &Option<Arc<AccessToken>>) -> Option<Arc<AccessToken>> {
    slot.as_ref()
        .filter(|t| Instant::now() < t.refresh_at)
        .cloned()
}

/// The `messages:send` request body, the notification text shortened to fit 4096 bytes.
fn build_body(msg: &PushMessage) -> Vec<u8> {
    let now_ms = now_unix_ms();
    fit_payload(
        msg.title.as_deref(),
        msg.body.as_deref(),
        FCM_MAX_PAYLOAD,
        |title, body| {
            let value = message_json(msg, title, body, now_ms);
            serde_json::to_vec(&value).unwrap_or_default()
        },
    )
}

fn message_json(msg: &PushMessage, title: Option<&str>, body: Option<&str>, now_ms: u64) -> Value {
    let visible = title.is_some() || body.is_some();
    let mut message = serde_json::Map::new();
    message.insert("token".into(), json!(msg.token));
    if !msg.data.is_empty() {
        let data: BTreeMap<&str, &str> = msg
            .data
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        message.insert("data".into(), json!(data));
    }
    if visible {
        let mut n = serde_json::Map::new();
        if let Some(t) = title {
            n.insert("title".into(), json!(t));
        }
        if let Some(b) = body {
            n.insert("body".into(), json!(b));
        }
        message.insert("notification".into(), Value::Object(n));
    }

    // Android: high priority for calls and visible notifications.
    let mut android = serde_json::Map::new();
    android.insert(
        "priority".into(),
        json!(if msg.urgent || visible {
            "HIGH"
        } else {
            "NORMAL"
        }),
    );
    let expiry_s = msg.expires_at_ms.map(|at| at.div_ceil(1000));
    if let Some(at_ms) = msg.expires_at_ms {
        let ttl = at_ms.saturating_sub(now_ms).div_ceil(1000).min(MAX_TTL_S);
        android.insert("ttl".into(), json!(format!("{ttl}s")));
    }
    if !msg.collapse_id.is_empty() {
        android.insert("collapse_key".into(), json!(msg.collapse_id));
    }
    message.insert("android".into(), Value::Object(android));

    // iOS through FCM: alert or background, matching priority (background must be 5).
    let mut headers = serde_json::Map::new();
    headers.insert(
        "apns-priority".into(),
        json!(if visible { "10" } else { "5" }),
    );
    headers.insert(
        "apns-push-type".into(),
        json!(if visible { "alert" } else { "background" }),
    );
    if !msg.collapse_id.is_empty() {
        headers.insert(
            "apns-collapse-id".into(),
            json!(short_collapse_id(&msg.collapse_id)),
        );
    }
    if let Some(at) = expiry_s {
        headers.insert("apns-expiration".into(), json!(at.to_string()));
    }
    let aps = if visible {
        json!({"sound": "default"})
    } else {
        json!({"content-available": 1})
    };
    message.insert(
        "apns".into(),
        json!({"headers": headers, "payload": {"aps": aps}}),
    );
    json!({ "message": message })
}

#[derive(Debug, Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: ErrorBody,
}

#[derive(Debug, Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<Value>,
}

impl ErrorBody {
    fn fcm_error_code(&self) -> Option<&str> {
        self.details
            .iter()
            .find(|d| d.get("@type").and_then(Value::as_str) == Some(FCM_ERROR_TYPE))
            .and_then(|d| d.get("errorCode"))
            .and_then(Value::as_str)
    }

    /// A `BadRequest` violation on `message.token`, or FCM's "not a valid FCM
    /// registration token" message.
    fn blames_token(&self) -> bool {
        let violation = self
            .details
            .iter()
            .filter(|d| d.get("@type").and_then(Value::as_str) == Some(BAD_REQUEST_TYPE))
            .filter_map(|d| d.get("fieldViolations").and_then(Value::as_array))
            .flatten()
            .any(|v| v.get("field").and_then(Value::as_str) == Some("message.token"));
        violation
            || self
                .message
                .to_ascii_lowercase()
                .contains("registration token")
    }
}

/// Classifies one `messages:send` answer (push-anchors.md section 3): the FcmError
/// `errorCode` first, then the HTTP status and canonical status.
fn classify(status: StatusCode, after: Option<Duration>, body: &[u8]) -> Class {
    if status.is_success() {
        return Class::Done(Outcome::Sent);
    }
    let code = status.as_u16();
    let parsed: Option<ErrorEnvelope> = serde_json::from_slice(body).ok();
    let err = parsed.map(|e| e.error).unwrap_or_default();
    let detail = if err.message.is_empty() {
        String::new()
    } else {
        format!(": {}", truncate_for_log(&err.message))
    };
    let canonical = if err.status.is_empty() {
        String::new()
    } else {
        format!(" {}", err.status)
    };
    let done = Class::Done;
    match err.fcm_error_code() {
        Some(ec @ ("UNREGISTERED" | "SENDER_ID_MISMATCH")) => {
            return done(Outcome::TokenDead {
                reason: format!("fcm {code} {ec}{detail}"),
            })
        }
        Some("INVALID_ARGUMENT") => return done(invalid_argument(code, &err, &detail)),
        Some(ec @ "QUOTA_EXCEEDED") => {
            return done(Outcome::Throttled {
                after: after.unwrap_or(DEFAULT_THROTTLE),
                reason: format!("fcm {code} {ec}{detail}"),
            })
        }
        Some(ec @ ("UNAVAILABLE" | "INTERNAL")) => {
            return done(Outcome::Retry {
                after,
                reason: format!("fcm {code} {ec}{detail}"),
            })
        }
        Some(ec @ ("THIRD_PARTY_AUTH_ERROR" | "APNS_AUTH_ERROR")) => {
            return done(Outcome::AuthFailed {
                reason: format!("fcm {code} {ec}{detail}"),
            })
        }
        _ => {}
    }
    let reason = format!("fcm {code}{canonical}{detail}");
    let outcome = match code {
        400 => invalid_argument(code, &err, &detail),
        401 => return Class::Unauthenticated(reason),
        // PERMISSION_DENIED without FcmError: API disabled, missing role.
        403 => Outcome::AuthFailed { reason },
        // No FcmError: wrong project id or base URL, not a dead token.
        404 => Outcome::AuthFailed { reason },
        429 => Outcome::Throttled {
            after: after.unwrap_or(DEFAULT_THROTTLE),
            reason,
        },
        408 => Outcome::Retry { after, reason },
        500..=599 => {
            let reason = if err.status.is_empty() && !body.is_empty() && !looks_like_json(body) {
                format!("fcm {code} (non-JSON body)")
            } else {
                reason
            };
            Outcome::Retry { after, reason }
        }
        _ => Outcome::Rejected { reason },
    };
    done(outcome)
}

fn invalid_argument(code: u16, err: &ErrorBody, detail: &str) -> Outcome {
    if err.blames_token() {
        Outcome::TokenDead {
            reason: format!("fcm {code} INVALID_ARGUMENT (token){detail}"),
        }
    } else {
        Outcome::Rejected {
            reason: format!("fcm {code} INVALID_ARGUMENT{detail}"),
        }
    }
}

fn looks_like_json(body: &[u8]) -> bool {
    body.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{')
}

fn truncate_for_log(s: &str) -> String {
    super::providers::cut_chars(s, 200)
}
