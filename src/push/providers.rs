//! The configured push providers: one FCM client per FCM app, one APNs client per APNs
//! app, one shared HTTP client per provider. [`Providers::send`] routes a
//! [`PushMessage`] to the right app and counts the [`Outcome`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::apns::ApnsClient;
use super::fcm::FcmClient;
use super::provider::{redact, Outcome, ProviderKind, PushMessage};
use crate::config::PushConfig;

/// Push attempts, by `provider` (`fcm`, `apns`, `apns_voip`) and `outcome` ([`Outcome::label`]).
pub const METRIC_PUSH_ATTEMPTS: &str = "switchboard_push_attempts_total";
/// Credential refreshes (FCM OAuth2 access tokens, APNs provider JWTs), by `provider`.
pub const METRIC_TOKEN_REFRESHES: &str = "switchboard_push_token_refreshes_total";

/// Connect timeout of the provider HTTP clients.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Whole-request timeout of the provider HTTP clients.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// A push configuration that cannot be used; `key` names the offending config key.
#[derive(Debug, thiserror::Error)]
pub enum PushConfigError {
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        key: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl PushConfigError {
    /// The config key the error is about (e.g. `push.fcm.apps[0].service_account`).
    pub fn key(&self) -> &str {
        match self {
            PushConfigError::Read { key, .. } | PushConfigError::Invalid { key, .. } => key,
        }
    }

    pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        PushConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Every configured push app, ready to send.
pub struct Providers {
    fcm: Vec<Arc<FcmClient>>,
    apns: Vec<Arc<ApnsClient>>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers")
            .field("fcm", &self.app_names(ProviderKind::Fcm))
            .field("apns", &self.app_names(ProviderKind::Apns))
            .finish()
    }
}

impl Providers {
    /// Loads every app's credentials (service-account JSON, `.p8` keys) and builds the
    /// HTTP clients. Reads files: call it at startup, not per push.
    pub fn from_config(cfg: &PushConfig) -> Result<Providers, PushConfigError> {
        let mut fcm = Vec::new();
        if !cfg.fcm.apps.is_empty() {
            let base = check_base_url("push.fcm.base_url", &cfg.fcm.base_url)?;
            let http = http_client("push.fcm.ca_cert", &cfg.fcm.ca_cert, false)?;
            check_names(
                "push.fcm.apps",
                cfg.fcm.apps.iter().map(|a| a.name.as_str()),
            )?;
            for (i, app) in cfg.fcm.apps.iter().enumerate() {
                let client = FcmClient::load(app, &base, http.clone()).map_err(|e| {
                    e.into_config_error(&format!("push.fcm.apps[{i}].service_account"))
                })?;
                fcm.push(Arc::new(client));
            }
        }
        let mut apns = Vec::new();
        if !cfg.apns.apps.is_empty() {
            let base = check_base_url("push.apns.base_url", &cfg.apns.base_url)?;
            let http = http_client("push.apns.ca_cert", &cfg.apns.ca_cert, true)?;
            check_names(
                "push.apns.apps",
                cfg.apns.apps.iter().map(|a| a.name.as_str()),
            )?;
            for (i, app) in cfg.apns.apps.iter().enumerate() {
                let client = ApnsClient::load(app, &base, http.clone())
                    .map_err(|e| e.into_config_error(&format!("push.apns.apps[{i}]")))?;
                apns.push(Arc::new(client));
            }
        }
        Ok(Providers { fcm, apns })
    }

    /// Whether at least one app can take pushes of this kind.
    pub fn configured(&self, kind: ProviderKind) -> bool {
        match kind {
            ProviderKind::Fcm => !self.fcm.is_empty(),
            ProviderKind::Apns | ProviderKind::ApnsVoip => !self.apns.is_empty(),
        }
    }

    /// The configured app names of a provider, the default (first) one first.
    pub fn app_names(&self, kind: ProviderKind) -> Vec<&str> {
        match kind {
            ProviderKind::Fcm => self.fcm.iter().map(|c| c.name()).collect(),
            ProviderKind::Apns | ProviderKind::ApnsVoip => {
                self.apns.iter().map(|c| c.name()).collect()
            }
        }
    }

    /// Sends one push and says what came of it. Never panics, never logs a whole token.
    /// No app for the message (none configured, or an unknown `app`) is `AuthFailed`, so
    /// the worker pauses instead of dropping the push.
    pub async fn send(&self, msg: &PushMessage) -> Outcome {
        let outcome = match msg.provider {
            ProviderKind::Fcm => match pick(&self.fcm, msg.app.as_deref(), |c| c.name()) {
                Ok(client) => client.send(msg).await,
                Err(reason) => Outcome::AuthFailed { reason },
            },
            ProviderKind::Apns | ProviderKind::ApnsVoip => {
                match pick(&self.apns, msg.app.as_deref(), |c| c.name()) {
                    Ok(client) => client.send(msg).await,
                    Err(reason) => Outcome::AuthFailed { reason },
                }
            }
        };
        metrics::counter!(
            METRIC_PUSH_ATTEMPTS,
            "provider" => msg.provider.as_str(),
            "outcome" => outcome.label()
        )
        .increment(1);
        match &outcome {
            Outcome::Sent => tracing::debug!(
                provider = msg.provider.as_str(),
                token = %redact(&msg.token),
                "push sent"
            ),
            other => tracing::info!(
                provider = msg.provider.as_str(),
                token = %redact(&msg.token),
                outcome = other.label(),
                detail = ?other,
                "push not sent"
            ),
        }
        outcome
    }
}

fn pick<'a, C>(
    clients: &'a [Arc<C>],
    app: Option<&str>,
    name: impl Fn(&C) -> &str,
) -> Result<&'a Arc<C>, String> {
    match app {
        None => clients
            .first()
            .ok_or_else(|| "no app configured".to_string()),
        Some(wanted) => clients
            .iter()
            .find(|c| name(c) == wanted)
            .ok_or_else(|| format!("no app configured with name {wanted:?}")),
    }
}

fn check_names<'a>(key: &str, names: impl Iterator<Item = &'a str>) -> Result<(), PushConfigError> {
    let mut seen: Vec<&str> = Vec::new();
    for (i, name) in names.enumerate() {
        if name.is_empty() {
            return Err(PushConfigError::invalid(
                format!("{key}[{i}].name"),
                "must not be empty",
            ));
        }
        if seen.contains(&name) {
            return Err(PushConfigError::invalid(
                format!("{key}[{i}].name"),
                format!("duplicate app name {name:?}"),
            ));
        }
        seen.push(name);
    }
    Ok(())
}

fn check_base_url(key: &str, raw: &str) -> Result<String, PushConfigError> {
    let trimmed = raw.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(trimmed)
        .map_err(|e| PushConfigError::invalid(key, format!("not a URL ({e})")))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(PushConfigError::invalid(key, "must be an http(s) URL"));
    }
    Ok(trimmed.to_string())
}

/// One HTTP client for a provider: timeouts, the optional extra CA (a PEM file path, or
/// the PEM itself), HTTP/2 only for APNs (ALPN `h2` over TLS, prior knowledge on `http`).
fn http_client(
    ca_key: &str,
    ca_cert: &str,
    http2_only: bool,
) -> Result<reqwest::Client, PushConfigError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")));
    if http2_only {
        builder = builder
            .http2_prior_knowledge()
            .http2_keep_alive_interval(Duration::from_secs(60))
            .http2_keep_alive_while_idle(true);
    }
    let ca_cert = ca_cert.trim();
    if !ca_cert.is_empty() {
        let pem = if ca_cert.starts_with("-----BEGIN") {
            ca_cert.as_bytes().to_vec()
        } else {
            std::fs::read(Path::new(ca_cert)).map_err(|source| PushConfigError::Read {
                key: ca_key.to_string(),
                path: ca_cert.to_string(),
                source,
            })?
        };
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            PushConfigError::invalid(ca_key, format!("not a PEM certificate ({e})"))
        })?;
        if certs.is_empty() {
            return Err(PushConfigError::invalid(
                ca_key,
                "no certificate in the PEM",
            ));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| {
        PushConfigError::invalid(ca_key, format!("cannot build the HTTP client ({e})"))
    })
}

// ---- helpers shared by fcm.rs and apns.rs ----

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn now_unix_s() -> u64 {
    now_unix_ms() / 1000
}

/// A reqwest error as text, without the URL (APNs URLs carry the device token).
pub(crate) fn request_error_text(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let connect = e.is_connect();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if timeout {
        format!("timeout ({text})")
    } else if connect {
        format!("connection failed ({text})")
    } else {
        text
    }
}

/// The `Retry-After` header: delta-seconds or an HTTP-date (IMF-fixdate).
/// A provider's answer: status, Retry-After and body.
pub(crate) struct Answer {
    pub status: reqwest::StatusCode,
    pub after: Option<Duration>,
    pub body: bytes::Bytes,
}

/// Sends a request and reads the whole answer. A transport failure (no answer, or a body
/// that could not be read) is a `Retry`, labelled with the provider's name.
pub(crate) async fn exchange(
    req: reqwest::RequestBuilder,
    provider: &str,
) -> Result<Answer, Outcome> {
    let resp = req.send().await.map_err(|e| Outcome::Retry {
        after: None,
        reason: format!("{provider}: {}", request_error_text(e)),
    })?;
    let status = resp.status();
    let after = retry_after(resp.headers());
    let body = resp.bytes().await.map_err(|e| Outcome::Retry {
        after,
        reason: format!(
            "{provider}: reading the response: {}",
            request_error_text(e)
        ),
    })?;
    Ok(Answer {
        status,
        after,
        body,
    })
}

pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, now_unix_s())
}

pub(crate) fn parse_retry_after(value: &str, now_s: u64) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_http_date(value)?;
    Some(Duration::from_secs(at.saturating_sub(now_s)))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` → unix seconds.
fn parse_http_date(s: &str) -> Option<u64> {
    let rest = s.split_once(", ").map(|(_, r)| r).unwrap_or(s);
    let mut parts = rest.split_whitespace();
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let h: u64 = hms.next()?.parse().ok()?;
    let m: u64 = hms.next()?.parse().ok()?;
    let sec: u64 = hms.next()?.parse().ok()?;
    if parts.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day as i64);
    if days < 0 {
        return None;
    }
    Some(days as u64 * 86_400 + h * 3600 + m * 60 + sec)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `s` cut to `n` characters plus `…` when longer.
pub(crate) fn cut_chars(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        None => s.to_string(),
        Some((at, _)) => {
            let mut out = s[..at].to_string();
            out.push('…');
            out
        }
    }
}

/// Serializes a payload built from the notification text, shortening the body (then the
/// title) until it fits `limit` bytes. Never fails: if even empty text does not fit, the
/// smallest payload is returned and the provider decides.
pub(crate) fn fit_payload(
    title: Option<&str>,
    body: Option<&str>,
    limit: usize,
    build: impl Fn(Option<&str>, Option<&str>) -> Vec<u8>,
) -> Vec<u8> {
    let full = build(title, body);
    if full.len() <= limit {
        return full;
    }
    // Longest prefix of `text` (in chars) whose payload fits, by binary search.
    let shrink = |text: &str, make: &dyn Fn(&str) -> Vec<u8>| -> Option<Vec<u8>> {
        let total = text.chars().count();
        let (mut lo, mut hi) = (0usize, total);
        let mut best = None;
        while lo <= hi {
            let mid = lo + (hi - lo) / 2;
            let candidate = make(&cut_chars(text, mid));
            if candidate.len() <= limit {
                best = Some(candidate);
                lo = mid + 1;
            } else if mid == 0 {
                break;
            } else {
                hi = mid - 1;
            }
        }
        best
    };
    if let Some(body) = body {
        if let Some(fit) = shrink(body, &|b| build(title, Some(b))) {
            return fit;
        }
    }
    let body = body.map(|_| "…");
    if let Some(title) = title {
        if let Some(fit) = shrink(title, &|t| build(Some(t), body)) {
            return fit;
        }
    }
    build(title.map(|_| "…"), body)
}

/// A collapse id of at most 64 bytes: kept as is when short, else a prefix plus a hash
/// of the whole id (so distinct long ids stay distinct).
pub(crate) fn short_collapse_id(id: &str) -> String {
    const MAX: usize = 64;
    if id.len() <= MAX {
        return id.to_string();
    }
    // FNV-1a 64.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let suffix = format!("-{hash:016x}");
    let mut cut = MAX - suffix.len();
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &id[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120", 0), Some(Duration::from_secs(120)));
        // 1994-11-06T08:49:37Z = 784111777
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_700),
            Some(Duration::from_secs(77))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", 784_111_800),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", 0), None);
    }

    #[test]
    fn collapse_ids_fit() {
        assert_eq!(short_collapse_id("m-1"), "m-1");
        let long = "é".repeat(100);
        let a = short_collapse_id(&long);
        assert!(a.len() <= 64);
        let b = short_collapse_id(&format!("{long}x"));
        assert_ne!(a, b);
    }

    #[test]
    fn fit_shrinks_body_first() {
        let build = |t: Option<&str>, b: Option<&str>| {
            serde_json::to_vec(&serde_json::json!({"t": t, "b": b})).unwrap_or_default()
        };
        let body = "x".repeat(500);
        let out = fit_payload(Some("title"), Some(&body), 100, build);
        assert!(out.len() <= 100);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["t"], "title");
        assert!(v["b"].as_str().unwrap_or_default().ends_with('…'));
    }
}
