//! Local stand-ins for FCM HTTP v1 and APNs, scripted and recording (push-anchors.md §7).
//!
//! - [`FcmMock`]: plain HTTP/1.1 on `127.0.0.1:0`. `POST /token` checks the RS256
//!   JWT-bearer assertion against [`TEST_RSA_PUBLIC_PEM`] (kid, iss, aud = token_uri, scope,
//!   exp - iat <= 3600) and issues access tokens; `POST /v1/projects/{id}/messages:send`
//!   checks the bearer token, the project and the message shape, then answers from its
//!   script (default `200 {"name": "projects/<id>/messages/<n>"}`).
//! - [`ApnsMock`]: HTTP/2 over TLS (a CA made with rcgen at start; the client trusts it
//!   through `push.apns.ca_cert`). `POST /3/device/{token}` checks the ES256 provider JWT
//!   (kid, iss = team, iat <= 1 h old) and the apns-* headers, then answers from its script
//!   (default `200` with an `apns-id`).
//! - Canned error answers in the providers' documented shapes ([`fcm_unregistered`],
//!   [`apns_error`], ...), and helpers that write a service-account JSON / `.p8` key into
//!   a temp dir and build the [`PushConfig`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard::config::{ApnsApp, ApnsConfig, FcmApp, FcmConfig, PushConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ===========================================================================================
// TEST FIXTURE ONLY — NOT A SECRET. This RSA-2048 key pair was generated for these tests
// (`openssl genpkey -algorithm RSA`), signs nothing but mock OAuth2 assertions sent to
// FcmMock on 127.0.0.1, and must never be used for anything real.
// ===========================================================================================
pub const TEST_RSA_PRIVATE_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDUOJKncoVUoVFh\n\
YyRsVfnjv8UdNYh8K++5MKOBbOY4WUtI2RX5xLhl5772hRWITmrrk41UNvuYNszH\n\
Gf4eHBvlXQi2XCPXj8+z1mmqn1Ai6/jZhaQisBm4vaPcIqL9Jfwy+jGZVc/rxMZe\n\
EZMECwAW+zm9+NN/khmslMmM+FZtkbC24ml+Bo9NIPwkHT0j3Q4tdC74RBaZ/eab\n\
Lf3pxHIvumQV0fp7pmlUsMf/Si4+Pv2IHKiOticZR+PiQgtCbeT1MT9kpLs+iBv+\n\
NxQiB9kUj3KWKtZ/CVPqFBR43C6W93UkO+JjFO86wpVQ5hFgpmV/0P0rpJLb9Kav\n\
vo5djFkXAgMBAAECggEAC2JYuG0z3c0kvz0N3SN99Jh68gz6T1iEBlxayQljqC4r\n\
rbK6s3VSdvthiq14JDtT3Pzc6sf9FlAKPojHnit5cgP1mnxPp+adCIakXUGPXCNq\n\
BZeRRt/iriUhWLohVPcbekvIxIyOSy8SsEUjeWbY3S+I2QbNQao/gLrsI1XHCev0\n\
kbRA2zU8eDV/0bA8osSduVp62y959gNdicStpwNXB7Dxk2K9zpRXchEdX0qTqvVo\n\
ORn9J7/oVKZZ8a5ZMmbrAH5cZRIuDq+LA5dQVGZGaANJNFP7mpUadnA3JHY4JRuI\n\
8JYu6sK7H+h+Mg28uUf0woyYcvCSjXW0gTxh8FbZUQKBgQD2jZ74/dELPg1yE5gs\n\
bfDjXlVJK5+3k+d0p9AieqFdBAnhAsoLCo0Z0797J5xUYK/m8FXdwGbpX1nvaWCD\n\
Wm6fr+DUVW2BcXSN2V2UhliodajTPHt2LRoLFZfF6MCvGteGOyUvdDvfWLnkKFyu\n\
O6OJ3DQPpvx7d7WcTHVFOjdzKwKBgQDcWjIY1nLD1HH/RhSyldl9apZkS2i46zGn\n\
URUjqckTflrQh24G8FDxIWwkS/z6drC7TMmR2hZDIewxdmJEmLu9FcuttwjcPUZY\n\
lWcfCvcEeMutrhFdke8mb1XUwuw9CUUYpB7rfN6EZ2gbBoVXGV513FAEar8NMdZU\n\
mA8A91mrxQKBgQCBnhaTZCzAMlEzReXchbf8cJ15qDuBcXpfM9ISLlIi6nqfFq5N\n\
e7COgWnLPxnKqkIPsQ4TVJFF42EOomGg7Kv3u6kBOCAnyxOxdzLhYHe/qIum8cce\n\
a7ujVCjEXQbfh8cCxJlaB0tqseSYdDe1SZlCYsfj6rAV4OtTTkbgrCh2nQKBgQCl\n\
zZR+jfZjFhsFCxWN3yV8slQheYB+DDMbg+5VHG95pIzu9ci7nd454n09vpPHXsHS\n\
3Y+amLBBqWfRPBPrK8WwHJNazivzlIO3KgwjFpwSGFaiBCV689EwaXv7EQSzVKNS\n\
TEQby6SfmjOCimCQzjz+kF0BRdUmN4bftl8ryfMGRQKBgElqRMLFYGdLG1vE9xie\n\
hzovmOI2pJnz0v79PkwcWPuOY1r3+O3d60dZ6axzQQbhy6/rZUvc04Z7pmRPZy1M\n\
vJHl7NhIsEyb2vISlM0P/tx8qEZ0zm3uTH8x4hEkaj0CRYm092RG7HK0oJ09+MOo\n\
wsBs8k3XVTL738lrMJVrMzba\n\
-----END PRIVATE KEY-----\n\
";
/// The public half of [`TEST_RSA_PRIVATE_PEM`] (TEST FIXTURE ONLY).
pub const TEST_RSA_PUBLIC_PEM: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA1DiSp3KFVKFRYWMkbFX5\n\
47/FHTWIfCvvuTCjgWzmOFlLSNkV+cS4Zee+9oUViE5q65ONVDb7mDbMxxn+Hhwb\n\
5V0Itlwj14/Ps9Zpqp9QIuv42YWkIrAZuL2j3CKi/SX8MvoxmVXP68TGXhGTBAsA\n\
Fvs5vfjTf5IZrJTJjPhWbZGwtuJpfgaPTSD8JB09I90OLXQu+EQWmf3mmy396cRy\n\
L7pkFdH6e6ZpVLDH/0ouPj79iByojrYnGUfj4kILQm3k9TE/ZKS7Pogb/jcUIgfZ\n\
FI9ylirWfwlT6hQUeNwulvd1JDviYxTvOsKVUOYRYKZlf9D9K6SS2/Smr76OXYxZ\n\
FwIDAQAB\n\
-----END PUBLIC KEY-----\n\
";

/// Project of the test service account.
pub const FCM_PROJECT_ID: &str = "switchboard-test";
pub const FCM_CLIENT_EMAIL: &str = "push@switchboard-test.iam.gserviceaccount.com";
pub const FCM_KEY_ID: &str = "0123456789abcdef0123456789abcdef01234567";
/// Key id and team of the test APNs key.
pub const APNS_KEY_ID: &str = "ABC123DEFG";
pub const APNS_TEAM_ID: &str = "TEAM123456";
pub const APNS_TOPIC: &str = "com.example.switchboard";

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Scripted {
    pub fn empty(status: u16) -> Self {
        Scripted {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn json(status: u16, body: Value) -> Self {
        Scripted {
            status,
            headers: vec![(
                "content-type".into(),
                "application/json; charset=UTF-8".into(),
            )],
            body: body.to_string().into_bytes(),
        }
    }

    pub fn text(status: u16, content_type: &str, body: &str) -> Self {
        Scripted {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: body.as_bytes().to_vec(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut builder = Response::builder().status(self.status);
        for (k, v) in &self.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        builder
            .body(Full::new(Bytes::from(self.body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
    }
}

/// One request a mock received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// The body as JSON, when it is.
    pub json: Option<Value>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

async fn record(req: Request<Incoming>) -> Recorded {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let version = format!("{:?}", req.version());
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let json = serde_json::from_slice(&body).ok();
    Recorded {
        method,
        path,
        version,
        headers,
        body,
        json,
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_form(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

/// The `push` section of the shipped config/switchboard.toml, with these providers.
pub fn push_config(fcm: FcmConfig, apns: ApnsConfig) -> PushConfig {
    let all: toml::Value = toml::from_str(include_str!("../../config/switchboard.toml"))
        .expect("config/switchboard.toml parses");
    let section = all.get("push").cloned().expect("config has [push]");
    let mut cfg = PushConfig::deserialize(section).expect("[push] deserializes");
    cfg.fcm = fcm;
    cfg.apns = apns;
    cfg
}

/// An FCM section with no app.
pub fn no_fcm() -> FcmConfig {
    FcmConfig {
        base_url: "https://fcm.googleapis.com".into(),
        ca_cert: String::new(),
        apps: Vec::new(),
    }
}

/// An APNs section with no app.
pub fn no_apns() -> ApnsConfig {
    ApnsConfig {
        base_url: "https://api.sandbox.push.apple.com".into(),
        ca_cert: String::new(),
        apps: Vec::new(),
    }
}

// ---------------------------------------------------------------- FCM

/// FCM's error envelope (…/rest/v1/ErrorCode): `details` are full detail objects.
pub fn fcm_error(status: u16, canonical: &str, message: &str, details: Vec<Value>) -> Scripted {
    Scripted::json(
        status,
        json!({"error": {"code": status, "message": message, "status": canonical, "details": details}}),
    )
}

/// The `FcmError` detail with this `errorCode`.
pub fn fcm_error_code(code: &str) -> Value {
    json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code})
}

/// A `google.rpc.BadRequest` detail with one field violation.
pub fn bad_request_violation(field: &str, description: &str) -> Value {
    json!({"@type": "type.googleapis.com/google.rpc.BadRequest",
           "fieldViolations": [{"field": field, "description": description}]})
}

pub fn fcm_unregistered() -> Scripted {
    fcm_error(
        404,
        "NOT_FOUND",
        "Requested entity was not found.",
        vec![fcm_error_code("UNREGISTERED")],
    )
}

/// 400 INVALID_ARGUMENT blaming `message.token`.
pub fn fcm_invalid_token() -> Scripted {
    fcm_error(
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        vec![
            fcm_error_code("INVALID_ARGUMENT"),
            bad_request_violation("message.token", "Invalid registration token"),
        ],
    )
}

/// 400 INVALID_ARGUMENT about the payload (here: a reserved data key).
pub fn fcm_invalid_payload() -> Scripted {
    fcm_error(
        400,
        "INVALID_ARGUMENT",
        "Invalid value at 'message.data[0].key' (from): reserved key",
        vec![
            fcm_error_code("INVALID_ARGUMENT"),
            bad_request_violation("message.data[0].key", "Invalid data key: from"),
        ],
    )
}

pub fn fcm_sender_id_mismatch() -> Scripted {
    fcm_error(
        403,
        "PERMISSION_DENIED",
        "SenderId mismatch",
        vec![fcm_error_code("SENDER_ID_MISMATCH")],
    )
}

/// 403 without FcmError: the API is disabled or the account lacks the role.
pub fn fcm_permission_denied() -> Scripted {
    fcm_error(
        403,
        "PERMISSION_DENIED",
        "Firebase Cloud Messaging API has not been used in project 1234 before or it is disabled.",
        vec![],
    )
}

pub fn fcm_unauthenticated() -> Scripted {
    fcm_error(
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
        vec![],
    )
}

pub fn fcm_third_party_auth_error() -> Scripted {
    fcm_error(
        401,
        "UNAUTHENTICATED",
        "Auth error from APNS or Web Push Service",
        vec![fcm_error_code("THIRD_PARTY_AUTH_ERROR")],
    )
}

/// 429 QUOTA_EXCEEDED, with `Retry-After` when given.
pub fn fcm_quota_exceeded(retry_after: Option<&str>) -> Scripted {
    let s = fcm_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Send requests'.",
        vec![fcm_error_code("QUOTA_EXCEEDED")],
    );
    match retry_after {
        Some(v) => s.header("retry-after", v),
        None => s,
    }
}

pub fn fcm_unavailable() -> Scripted {
    fcm_error(
        503,
        "UNAVAILABLE",
        "The service is currently unavailable.",
        vec![fcm_error_code("UNAVAILABLE")],
    )
}

/// A Google front-end HTML error page (not JSON).
pub fn google_html_error(status: u16) -> Scripted {
    Scripted::text(
        status,
        "text/html; charset=UTF-8",
        &format!(
            "<!DOCTYPE html>\n<html lang=en>\n<meta charset=utf-8>\n<title>Error {status} (Server Error)!!1</title>\n\
             <p><b>{status}.</b> <ins>That’s an error.</ins>\n<p>The server encountered a temporary error \
             and could not complete your request.<p>Please try again in 30 seconds. <ins>That’s all we know.</ins>\n"
        ),
    )
}

/// The token endpoint's answer to a bad assertion.
pub fn oauth_invalid_grant() -> Scripted {
    Scripted::json(
        400,
        json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
    )
}

#[derive(Default)]
struct FcmState {
    sends: Vec<Recorded>,
    token_requests: Vec<Recorded>,
    assertion_errors: Vec<String>,
    send_script: VecDeque<Scripted>,
    token_script: VecDeque<Scripted>,
    issued: HashSet<String>,
    expires_in: u64,
    next_token: u64,
    next_message: u64,
}

/// Scripted FCM (token endpoint + messages:send) on 127.0.0.1.
pub struct FcmMock {
    pub addr: SocketAddr,
    state: Arc<Mutex<FcmState>>,
    task: JoinHandle<()>,
}

impl Drop for FcmMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FcmMock {
    pub async fn start() -> FcmMock {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fcm mock");
        let addr = listener.local_addr().expect("fcm mock addr");
        let state = Arc::new(Mutex::new(FcmState {
            expires_in: 3599,
            ..FcmState::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(fcm_handle(addr, state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FcmMock { addr, state, task }
    }

    /// What `push.fcm.base_url` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The service account's `token_uri`.
    pub fn token_uri(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FcmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an answer for the next `messages:send` that passes the auth check.
    pub fn push_send(&self, answer: Scripted) {
        self.lock().send_script.push_back(answer);
    }

    /// Queues an answer for the next token request (after it is counted and checked).
    pub fn push_token(&self, answer: Scripted) {
        self.lock().token_script.push_back(answer);
    }

    /// `expires_in` of the access tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.lock().expires_in = secs;
    }

    /// Forgets every issued access token: the next send gets 401 UNAUTHENTICATED.
    pub fn revoke_tokens(&self) {
        self.lock().issued.clear();
    }

    pub fn sends(&self) -> Vec<Recorded> {
        self.lock().sends.clone()
    }

    pub fn token_requests(&self) -> Vec<Recorded> {
        self.lock().token_requests.clone()
    }

    /// Why the token endpoint refused assertions (empty when all were valid).
    pub fn assertion_errors(&self) -> Vec<String> {
        self.lock().assertion_errors.clone()
    }

    /// Writes the test service-account JSON (token_uri pointing here) into `dir`.
    pub fn write_service_account(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        let sa = json!({
            "type": "service_account",
            "project_id": FCM_PROJECT_ID,
            "private_key_id": FCM_KEY_ID,
            "private_key": TEST_RSA_PRIVATE_PEM,
            "client_email": FCM_CLIENT_EMAIL,
            "client_id": "100000000000000000000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri(),
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&sa).expect("json"))
            .expect("write service account");
        path
    }

    /// An app whose service account (written into `dir`) points at this mock.
    pub fn app(&self, dir: &Path, name: &str) -> FcmApp {
        let path = self.write_service_account(dir, &format!("fcm-{name}.json"));
        FcmApp {
            name: name.to_string(),
            service_account: path.to_string_lossy().into_owned(),
        }
    }

    /// `push.fcm` pointing at this mock.
    pub fn config(&self, apps: Vec<FcmApp>) -> FcmConfig {
        FcmConfig {
            base_url: self.base_url(),
            ca_cert: String::new(),
            apps,
        }
    }
}

fn fcm_check_assertion(addr: SocketAddr, form: &HashMap<String, String>) -> Result<(), String> {
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return Err(format!("bad grant_type {:?}", form.get("grant_type")));
    }
    let assertion = form.get("assertion").ok_or("no assertion")?;
    let header = jsonwebtoken::decode_header(assertion).map_err(|e| format!("header: {e}"))?;
    if header.alg != Algorithm::RS256 {
        return Err(format!("alg {:?}", header.alg));
    }
    if header.kid.as_deref() != Some(FCM_KEY_ID) {
        return Err(format!("kid {:?}", header.kid));
    }
    let key =
        DecodingKey::from_rsa_pem(TEST_RSA_PUBLIC_PEM.as_bytes()).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[format!("http://{addr}/token")]);
    validation.set_issuer(&[FCM_CLIENT_EMAIL]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let data = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|e| format!("verify: {e}"))?;
    let claims = data.claims;
    let scope = claims["scope"].as_str().unwrap_or_default();
    if !scope
        .split_whitespace()
        .any(|s| s == "https://www.googleapis.com/auth/firebase.messaging")
    {
        return Err(format!("scope {scope:?}"));
    }
    let iat = claims["iat"].as_u64().ok_or("iat")?;
    let exp = claims["exp"].as_u64().ok_or("exp")?;
    if exp <= iat || exp - iat > 3600 {
        return Err(format!("exp - iat = {}", exp as i64 - iat as i64));
    }
    if iat > now_s() + 60 {
        return Err("iat in the future".into());
    }
    Ok(())
}

fn fcm_check_message(body: &Option<Value>) -> Result<(), String> {
    let message = body
        .as_ref()
        .and_then(|b| b.get("message"))
        .ok_or("no message")?;
    let targets = ["token", "topic", "condition"]
        .iter()
        .filter(|k| message.get(**k).is_some())
        .count();
    if targets != 1 {
        return Err("exactly one of token, topic, condition".into());
    }
    if let Some(data) = message.get("data") {
        let ok = data
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string));
        if !ok {
            return Err("data values must be strings".into());
        }
    }
    if let Some(ttl) = message.pointer("/android/ttl") {
        let ok = ttl
            .as_str()
            .and_then(|t| t.strip_suffix('s'))
            .is_some_and(|n| n.parse::<u64>().is_ok());
        if !ok {
            return Err(format!("bad android.ttl {ttl}"));
        }
    }
    if let Some(p) = message.pointer("/android/priority") {
        if p != "HIGH" && p != "NORMAL" {
            return Err(format!("bad android.priority {p}"));
        }
    }
    Ok(())
}

async fn fcm_handle(
    addr: SocketAddr,
    state: Arc<Mutex<FcmState>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let rec = record(req).await;
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    if rec.method == "POST" && rec.path == "/token" {
        st.token_requests.push(rec.clone());
        let form = parse_form(&rec.body);
        if let Err(e) = fcm_check_assertion(addr, &form) {
            st.assertion_errors.push(e.clone());
            return Scripted::json(
                400,
                json!({"error": "invalid_grant", "error_description": e}),
            )
            .into_response();
        }
        if let Some(answer) = st.token_script.pop_front() {
            return answer.into_response();
        }
        st.next_token += 1;
        let token = format!("ya29.test-{}", st.next_token);
        st.issued.insert(token.clone());
        return Scripted::json(
            200,
            json!({"access_token": token, "expires_in": st.expires_in, "token_type": "Bearer"}),
        )
        .into_response();
    }
    let Some(project) = rec
        .path
        .strip_prefix("/v1/projects/")
        .and_then(|p| p.strip_suffix("/messages:send"))
        .map(str::to_string)
    else {
        return fcm_error(404, "NOT_FOUND", "no such path", vec![]).into_response();
    };
    st.sends.push(rec.clone());
    let bearer = rec
        .header("authorization")
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !st.issued.contains(bearer) {
        return fcm_unauthenticated().into_response();
    }
    if project != FCM_PROJECT_ID {
        return fcm_error(403, "PERMISSION_DENIED", "wrong project", vec![]).into_response();
    }
    if let Err(e) = fcm_check_message(&rec.json) {
        return fcm_error(
            400,
            "INVALID_ARGUMENT",
            &e,
            vec![fcm_error_code("INVALID_ARGUMENT")],
        )
        .into_response();
    }
    if let Some(answer) = st.send_script.pop_front() {
        return answer.into_response();
    }
    st.next_message += 1;
    Scripted::json(
        200,
        json!({"name": format!("projects/{project}/messages/{}", st.next_message)}),
    )
    .into_response()
}

// ---------------------------------------------------------------- APNs

/// An APNs error answer `{"reason": ...}`.
pub fn apns_error(status: u16, reason: &str) -> Scripted {
    Scripted::json(status, json!({"reason": reason}))
}

/// 410 Unregistered with its `timestamp` (ms).
pub fn apns_unregistered(timestamp_ms: u64) -> Scripted {
    Scripted::json(
        410,
        json!({"reason": "Unregistered", "timestamp": timestamp_ms}),
    )
}

#[derive(Default)]
struct ApnsState {
    requests: Vec<Recorded>,
    script: VecDeque<Scripted>,
    jwts: Vec<String>,
    next_id: u64,
}

/// Scripted APNs: HTTP/2 over TLS on 127.0.0.1, with its own CA.
pub struct ApnsMock {
    pub addr: SocketAddr,
    ca_pem: String,
    key_pem: String,
    state: Arc<Mutex<ApnsState>>,
    task: JoinHandle<()>,
}

impl Drop for ApnsMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApnsMock {
    pub async fn start() -> ApnsMock {
        // The CA the client trusts (push.apns.ca_cert) and the server's certificate.
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchboard test APNs CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf_params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("leaf params");
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf cert");

        // The provider key (.p8, PKCS#8 EC P-256).
        let p8 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p8 key");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .expect("tls config");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind apns mock");
        let addr = listener.local_addr().expect("apns mock addr");
        let state = Arc::new(Mutex::new(ApnsState::default()));
        let shared = state.clone();
        let public_pem = p8.public_key_pem();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let state = shared.clone();
                let public_pem = public_pem.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        let public_pem = public_pem.clone();
                        async move { Ok::<_, Infallible>(apns_handle(&public_pem, state, req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        ApnsMock {
            addr,
            ca_pem: ca.pem(),
            key_pem: p8.serialize_pem(),
            state,
            task,
        }
    }

    /// What `push.apns.base_url` should be.
    pub fn base_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA certificate (PEM) the client must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApnsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an answer for the next request that passes the checks.
    pub fn push(&self, answer: Scripted) {
        self.lock().script.push_back(answer);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Distinct provider JWTs seen, in order.
    pub fn jwts(&self) -> Vec<String> {
        self.lock().jwts.clone()
    }

    /// Writes the CA certificate into `dir`.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("apns-ca.pem");
        std::fs::write(&path, &self.ca_pem).expect("write ca");
        path
    }

    /// Writes the `.p8` key into `dir`.
    pub fn write_key(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("AuthKey_{APNS_KEY_ID}.p8"));
        std::fs::write(&path, &self.key_pem).expect("write p8");
        path
    }

    /// An app using the test key (written into `dir`) and [`APNS_TOPIC`].
    pub fn app(&self, dir: &Path, name: &str) -> ApnsApp {
        ApnsApp {
            name: name.to_string(),
            key_file: self.write_key(dir).to_string_lossy().into_owned(),
            key_id: APNS_KEY_ID.into(),
            team_id: APNS_TEAM_ID.into(),
            topic: APNS_TOPIC.into(),
        }
    }

    /// `push.apns` pointing at this mock, trusting its CA (written into `dir`).
    pub fn config(&self, dir: &Path, apps: Vec<ApnsApp>) -> ApnsConfig {
        ApnsConfig {
            base_url: self.base_url(),
            ca_cert: self.write_ca(dir).to_string_lossy().into_owned(),
            apps,
        }
    }
}

fn apns_check_jwt(public_pem: &str, auth: Option<&str>) -> Result<String, &'static str> {
    let jwt = auth
        .and_then(|a| a.strip_prefix("bearer "))
        .ok_or("MissingProviderToken")?;
    let header = jsonwebtoken::decode_header(jwt).map_err(|_| "InvalidProviderToken")?;
    if header.alg != Algorithm::ES256 || header.kid.as_deref() != Some(APNS_KEY_ID) {
        return Err("InvalidProviderToken");
    }
    let key =
        DecodingKey::from_ec_pem(public_pem.as_bytes()).map_err(|_| "InvalidProviderToken")?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_exp = false;
    validation.set_required_spec_claims(&["iss"]);
    validation.set_issuer(&[APNS_TEAM_ID]);
    let data = jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .map_err(|_| "InvalidProviderToken")?;
    let iat = data.claims["iat"].as_u64().ok_or("InvalidProviderToken")?;
    if iat + 3600 < now_s() {
        return Err("ExpiredProviderToken");
    }
    Ok(jwt.to_string())
}

fn apns_check_request(rec: &Recorded) -> Result<(), (u16, &'static str)> {
    let token = rec
        .path
        .strip_prefix("/3/device/")
        .ok_or((404, "BadPath"))?;
    if token.is_empty() {
        return Err((400, "MissingDeviceToken"));
    }
    if !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err((400, "BadDeviceToken"));
    }
    if rec.method != "POST" {
        return Err((405, "MethodNotAllowed"));
    }
    let topic = rec.header("apns-topic").ok_or((400, "MissingTopic"))?;
    let voip_topic = format!("{APNS_TOPIC}.voip");
    if topic != APNS_TOPIC && topic != voip_topic {
        return Err((400, "TopicDisallowed"));
    }
    let push_type = rec.header("apns-push-type").unwrap_or("alert");
    match push_type {
        "alert" | "background" => {
            if topic != APNS_TOPIC {
                return Err((400, "DeviceTokenNotForTopic"));
            }
        }
        "voip" => {
            if topic != voip_topic {
                return Err((400, "DeviceTokenNotForTopic"));
            }
        }
        _ => return Err((400, "InvalidPushType")),
    }
    let priority = rec.header("apns-priority").unwrap_or("10");
    if !["1", "5", "10"].contains(&priority) || (push_type == "background" && priority != "5") {
        return Err((400, "BadPriority"));
    }
    if let Some(exp) = rec.header("apns-expiration") {
        if exp.parse::<u64>().is_err() {
            return Err((400, "BadExpirationDate"));
        }
    }
    if rec.header("apns-collapse-id").is_some_and(|c| c.len() > 64) {
        return Err((400, "BadCollapseId"));
    }
    if rec.body.is_empty() {
        return Err((400, "PayloadEmpty"));
    }
    let limit = if push_type == "voip" { 5120 } else { 4096 };
    if rec.body.len() > limit {
        return Err((413, "PayloadTooLarge"));
    }
    if rec.json.as_ref().and_then(|j| j.get("aps")).is_none() {
        return Err((400, "BadPayload"));
    }
    Ok(())
}

async fn apns_handle(
    public_pem: &str,
    state: Arc<Mutex<ApnsState>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let rec = record(req).await;
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    st.requests.push(rec.clone());
    match apns_check_jwt(public_pem, rec.header("authorization")) {
        Ok(jwt) => {
            if st.jwts.last() != Some(&jwt) && !st.jwts.contains(&jwt) {
                st.jwts.push(jwt);
            }
        }
        Err(reason) => return apns_error(403, reason).into_response(),
    }
    if let Err((status, reason)) = apns_check_request(&rec) {
        return apns_error(status, reason).into_response();
    }
    let answer = match st.script.pop_front() {
        Some(a) => a,
        None => Scripted::empty(200),
    };
    st.next_id += 1;
    let apns_id = format!("00000000-0000-4000-8000-{:012x}", st.next_id);
    answer.header("apns-id", &apns_id).into_response()
}
