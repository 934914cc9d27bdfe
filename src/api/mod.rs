//! The backend HTTP API (protocol section 8) and the unauthenticated `/health` and
//! `/metrics`. Requests are parsed here (size-limited bodies, typed JSON) and turned into
//! sequencer commands; `/v1/events` reads the durable log directly, bounded by the head
//! the sequencer has published.

mod events;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::gateway::{error_response, sequencer_gone, Body, Gateway};
use crate::protocol::frames::{check_id, check_user, MAX_CID_LEN, MAX_ID_LEN};
use crate::protocol::ProtoError;
use crate::sequencer::{ApiCmd, Command};
use crate::telemetry as m;

/// A JSON response with a status.
pub fn json_response(status: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    r
}

/// Handles every non-WebSocket request.
pub async fn handle(req: Request<Incoming>, gw: Arc<Gateway>) -> Response<Body> {
    let resp = match dispatch(req, &gw).await {
        Ok(r) => r,
        Err(e) => error_response(&e),
    };
    metrics::counter!(m::HTTP_REQUESTS, "status" => resp.status().as_u16().to_string())
        .increment(1);
    resp
}

async fn dispatch(req: Request<Incoming>, gw: &Arc<Gateway>) -> Result<Response<Body>, ProtoError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    match (method.clone(), path.as_str()) {
        (Method::GET, "/health") => return Ok(health(gw)),
        (Method::GET, "/metrics") => return Ok(metrics_text(gw)),
        _ => {}
    }
    if !path.starts_with("/v1/") {
        return match path.as_str() {
            "/health" | "/metrics" => Ok(method_not_allowed("GET")),
            _ => Err(ProtoError::not_found(format!("no route {path}"))),
        };
    }
    authorize(&req, gw)?;
    let segs: Vec<String> = path["/v1/".len()..]
        .split('/')
        .map(percent_decode)
        .collect::<Result<_, _>>()?;
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let max_body = BodyLimit {
        bytes: gw.config.server.max_body_bytes,
        timeout: std::time::Duration::from_millis(gw.config.server.body_timeout_ms),
    };
    match (method, segs.as_slice()) {
        (Method::POST, ["users", user, "notices"]) => {
            check_user("user", user)?;
            let b: NoticeBody = read_json(req, max_body).await?;
            check_id("type", &b.kind, MAX_ID_LEN)?;
            check_body(gw, &b.data)?;
            call(
                gw,
                ApiCmd::Notice {
                    user: user.to_string(),
                    kind: b.kind,
                    data: b.data,
                },
            )
            .await
        }
        (Method::GET, ["users", user, "presence"]) => {
            check_user("user", user)?;
            call(
                gw,
                ApiCmd::Presence {
                    user: user.to_string(),
                },
            )
            .await
        }
        (Method::PUT, ["users", user, "contacts"]) => {
            check_user("user", user)?;
            let b: ContactsBody = read_json(req, max_body).await?;
            for c in &b.contacts {
                check_user("contacts", c)?;
            }
            call(
                gw,
                ApiCmd::SetContacts {
                    user: user.to_string(),
                    contacts: b.contacts,
                },
            )
            .await
        }
        (Method::POST, ["users", user, "disconnect"]) => {
            check_user("user", user)?;
            let b: Option<DisconnectBody> = read_optional_json(req, max_body).await?;
            let reason = b.and_then(|b| b.reason);
            if reason.as_ref().is_some_and(|r| r.chars().count() > 256) {
                return Err(ProtoError::bad_request(
                    "`reason` is at most 256 characters",
                ));
            }
            call(
                gw,
                ApiCmd::Disconnect {
                    user: user.to_string(),
                    reason,
                },
            )
            .await
        }
        (Method::POST, ["rooms"]) => {
            let b: RoomBody = read_json(req, max_body).await?;
            check_id("id", &b.id, MAX_ID_LEN)?;
            for u in &b.members {
                check_user("members", u)?;
            }
            if b.name.chars().count() > 256 {
                return Err(ProtoError::bad_request("`name` is at most 256 characters"));
            }
            call(
                gw,
                ApiCmd::CreateRoom {
                    id: b.id,
                    name: b.name,
                    members: b.members,
                },
            )
            .await
        }
        (Method::GET, ["rooms", room]) => {
            check_id("room", room, MAX_ID_LEN)?;
            call(
                gw,
                ApiCmd::Room {
                    room: room.to_string(),
                },
            )
            .await
        }
        (Method::PUT, ["rooms", room, "members", user])
        | (Method::DELETE, ["rooms", room, "members", user]) => {
            check_id("room", room, MAX_ID_LEN)?;
            check_user("user", user)?;
            let cmd = if req.method() == Method::PUT {
                ApiCmd::AddMember {
                    room: room.to_string(),
                    user: user.to_string(),
                }
            } else {
                ApiCmd::RemoveMember {
                    room: room.to_string(),
                    user: user.to_string(),
                }
            };
            call(gw, cmd).await
        }
        (Method::POST, ["rooms", room, "messages"]) => {
            check_id("room", room, MAX_ID_LEN)?;
            let b: PublishBody = read_json(req, max_body).await?;
            check_user("from", &b.from)?;
            if let Some(cid) = &b.cid {
                check_id("cid", cid, MAX_CID_LEN)?;
            }
            check_body(gw, &b.body)?;
            call(
                gw,
                ApiCmd::Publish {
                    room: room.to_string(),
                    from: b.from,
                    body: b.body,
                    cid: b.cid,
                },
            )
            .await
        }
        (Method::GET, ["conversations", conv, "messages"]) => {
            let before = query_u64(&query, "before")?;
            let limit = query_u64(&query, "limit")?.unwrap_or(50);
            if !(1..=200).contains(&limit) {
                return Err(ProtoError::bad_request("`limit` must be 1-200"));
            }
            call(
                gw,
                ApiCmd::History {
                    conv: conv.to_string(),
                    before,
                    limit: limit as usize,
                },
            )
            .await
        }
        (Method::GET, ["events"]) => events::handle(&req, gw, &query).await,
        (Method::GET, ["connections"]) => call(gw, ApiCmd::Connections).await,
        (Method::GET, ["push", "dead"]) => {
            let limit = query_u64(&query, "limit")?.unwrap_or(100);
            if !(1..=1000).contains(&limit) {
                return Err(ProtoError::bad_request("`limit` must be 1-1000"));
            }
            let items: Vec<Value> = crate::push::worker::dead_letters(&gw.store, limit as usize)
                .into_iter()
                .map(|d| {
                    serde_json::json!({
                        "id": d.job.id, "user": d.job.user, "device": d.job.device,
                        "provider": d.job.provider, "token": crate::push::provider::redact(&d.job.token),
                        "off": d.job.off, "kind": d.job.kind, "attempts": d.job.attempts,
                        "reason": d.reason, "at": d.at_ms,
                    })
                })
                .collect();
            Ok(json_response(200, &serde_json::json!({"items": items})))
        }
        (Method::GET, ["stats"]) => call(gw, ApiCmd::Stats).await,
        (Method::POST, ["admin", "backup"]) => {
            let b: crate::logtool::BackupRequest = read_json(req, max_body).await?;
            let head = *gw.shared.head.borrow();
            let data_dir = gw.config.storage.dir.clone();
            let report =
                crate::logtool::backup_online(gw.store.clone(), data_dir, head, b.dir).await?;
            Ok(json_response(200, &report))
        }
        (_, route) => match allowed_methods(route) {
            Some(allow) => Ok(method_not_allowed(allow)),
            None => Err(ProtoError::not_found(format!("no route {path}"))),
        },
    }
}

/// The methods a known route answers (for 405), `None` for an unknown route.
fn allowed_methods(route: &[&str]) -> Option<&'static str> {
    match route {
        ["users", _, "notices"]
        | ["users", _, "disconnect"]
        | ["rooms"]
        | ["rooms", _, "messages"]
        | ["admin", "backup"] => Some("POST"),
        ["users", _, "presence"]
        | ["rooms", _]
        | ["conversations", _, "messages"]
        | ["events"]
        | ["connections"]
        | ["push", "dead"]
        | ["stats"] => Some("GET"),
        ["users", _, "contacts"] => Some("PUT"),
        ["rooms", _, "members", _] => Some("PUT, DELETE"),
        _ => None,
    }
}

/// 405 with the `Allow` header.
fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = json_response(
        405,
        &serde_json::json!({"error": {"code": "bad_request", "message": format!("method not allowed; use {allow}")}}),
    );
    r.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(allow),
    );
    r
}

fn health(gw: &Gateway) -> Response<Body> {
    json_response(
        200,
        &serde_json::json!({
            "status": "ok",
            "uptime_s": gw.shared.started.elapsed().as_secs(),
            "connections": gw.shared.connections(),
            "head": *gw.shared.head.borrow(),
            "version": env!("CARGO_PKG_VERSION"),
        }),
    )
}

fn metrics_text(gw: &Gateway) -> Response<Body> {
    let text = match (&gw.prometheus, gw.config.metrics.enabled) {
        (Some(h), true) => h.render(),
        _ => String::new(),
    };
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        CONTENT_TYPE,
        "text/plain; version=0.0.4".parse().expect("static header"),
    );
    r
}

/// `Authorization: Bearer <auth.api_key>`, compared in constant time.
fn authorize(req: &Request<Incoming>, gw: &Gateway) -> Result<(), ProtoError> {
    let key = gw.config.auth.api_key.as_bytes();
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if key.is_empty() || !bool::from(given.as_bytes().ct_eq(key)) {
        return Err(ProtoError::unauthorized("missing or wrong API key"));
    }
    Ok(())
}

/// Sends a command to the sequencer and turns its answer into a response.
async fn call(gw: &Gateway, cmd: ApiCmd) -> Result<Response<Body>, ProtoError> {
    let (tx, rx) = oneshot::channel();
    gw.commands
        .send(Command::Api(cmd, tx))
        .await
        .map_err(|_| sequencer_gone())?;
    let reply = rx.await.map_err(|_| sequencer_gone())??;
    Ok(json_response(reply.status, &reply.body))
}

fn check_body(gw: &Gateway, body: &Value) -> Result<(), ProtoError> {
    if crate::protocol::codec::json_len(body) > gw.config.limits.max_body_bytes {
        return Err(ProtoError::too_large(format!(
            "body is over {} bytes encoded",
            gw.config.limits.max_body_bytes
        )));
    }
    Ok(())
}

/// The bounds of a request body: size (`server.max_body_bytes`) and the time to receive
/// it (`server.body_timeout_ms`, the slowloris guard on the body).
#[derive(Debug, Clone, Copy)]
struct BodyLimit {
    bytes: usize,
    timeout: std::time::Duration,
}

async fn read_bytes(req: Request<Incoming>, limit: BodyLimit) -> Result<Bytes, ProtoError> {
    let max = limit.bytes;
    let collected =
        match tokio::time::timeout(limit.timeout, Limited::new(req.into_body(), max).collect())
            .await
        {
            Ok(r) => r,
            Err(_) => {
                tracing::debug!(
                    timeout_ms = limit.timeout.as_millis() as u64,
                    "request body timed out"
                );
                return Err(ProtoError::new(
                    crate::protocol::ErrorCode::Timeout,
                    format!(
                        "the request body did not arrive within {} ms",
                        limit.timeout.as_millis()
                    ),
                ));
            }
        };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ProtoError::too_large(
            format!("request body is over {max} bytes"),
        )),
        Err(e) => Err(ProtoError::bad_request(format!(
            "cannot read the body: {e}"
        ))),
    }
}

async fn read_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    max: BodyLimit,
) -> Result<T, ProtoError> {
    let bytes = read_bytes(req, max).await?;
    parse_object(&bytes)
}

async fn read_optional_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    max: BodyLimit,
) -> Result<Option<T>, ProtoError> {
    let bytes = read_bytes(req, max).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    parse_object(&bytes).map(Some)
}

/// A request body: a JSON object of the expected shape (serde would also read an array
/// into a struct field by field; bodies are objects).
fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtoError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ProtoError::bad_request(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ProtoError::bad_request("the body must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| ProtoError::bad_request(format!("invalid body: {e}")))
}

#[derive(Deserialize)]
struct NoticeBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
struct ContactsBody {
    contacts: Vec<String>,
}

#[derive(Deserialize)]
struct DisconnectBody {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
struct RoomBody {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Deserialize)]
struct PublishBody {
    from: String,
    #[serde(default)]
    body: Value,
    #[serde(default)]
    cid: Option<String>,
}

/// `a=1&b=x` into a map (last value wins), percent-decoded.
pub(crate) fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let v = v.replace('+', " ");
            Some((percent_decode(k).ok()?, percent_decode(&v).ok()?))
        })
        .collect()
}

pub(crate) fn query_u64(q: &HashMap<String, String>, key: &str) -> Result<Option<u64>, ProtoError> {
    match q.get(key).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ProtoError::bad_request(format!("`{key}` must be a non-negative integer"))
        }),
    }
}

fn percent_decode(s: &str) -> Result<String, ProtoError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ProtoError::bad_request("bad percent-encoding in the path"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ProtoError::bad_request("path is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_paths_are_decoded() {
        let q = parse_query("after=5&types=message%2Creceipt&x");
        assert_eq!(q["after"], "5");
        assert_eq!(q["types"], "message,receipt");
        assert_eq!(query_u64(&q, "after").unwrap(), Some(5));
        assert!(query_u64(&q, "types").is_err());
        assert_eq!(percent_decode("room%3Aops").unwrap(), "room:ops");
        assert!(percent_decode("%zz").is_err());
    }
}
