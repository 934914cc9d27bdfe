//! `GET /v1/events`: the durable log as NDJSON (or a stream of MessagePack maps), with
//! `after`, `limit`, `types` and a `wait_ms` long-poll that wakes on the head the
//! sequencer publishes (and only returns early for events matching `types`).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Request, Response};
use tokio::time::Instant;

use super::query_u64;
use crate::gateway::{Body, Gateway};
use crate::protocol::{Codec, ProtoError};

/// Most events one request returns.
pub const MAX_LIMIT: u64 = 1000;
/// Longest long-poll, ms.
pub const MAX_WAIT_MS: u64 = 60_000;
/// Records scanned per wake-up when filtering by type (bounds the work of one request).
const SCAN_MAX: usize = 100_000;

pub async fn handle(
    req: &Request<Incoming>,
    gw: &Gateway,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ProtoError> {
    let mut after = query_u64(q, "after")?.unwrap_or(0);
    let limit = query_u64(q, "limit")?.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ProtoError::bad_request(format!(
            "`limit` must be 1-{MAX_LIMIT}"
        )));
    }
    let wait_ms = query_u64(q, "wait_ms")?.unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(ProtoError::bad_request(format!(
            "`wait_ms` must be 0-{MAX_WAIT_MS}"
        )));
    }
    let types: Option<Vec<String>> = q
        .get("types")
        .filter(|t| !t.is_empty())
        .map(|t| t.split(',').map(|s| s.trim().to_string()).collect());
    let codec = match req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()) {
        Some(a) if a.contains("application/msgpack") || a.contains("application/x-msgpack") => {
            Codec::Msgpack
        }
        _ => Codec::Json,
    };
    let floor = gw.shared.floor();
    if after.saturating_add(1) < floor {
        return Err(ProtoError::new(
            crate::protocol::ErrorCode::Expired,
            format!(
                "events after {after} are partly gone: retention keeps offsets from {floor}; read from `after={}`",
                floor - 1
            ),
        ));
    }
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    let mut head_rx = gw.shared.head.subscribe();
    let mut out: Vec<u8> = Vec::new();
    let mut count = 0u64;
    loop {
        let head = *head_rx.borrow_and_update();
        let mut scanned = 0usize;
        for r in gw.store.records(after) {
            let r = r.map_err(|e| ProtoError::unavailable(e.to_string()))?;
            if r.off > head {
                break;
            }
            after = r.off;
            scanned += 1;
            if types
                .as_ref()
                .is_none_or(|t| t.iter().any(|x| x == r.event.name()))
            {
                let bytes = codec.encode(&r.wire_with_audience()).map_err(|e| {
                    ProtoError::new(crate::protocol::ErrorCode::Internal, e.to_string())
                })?;
                out.extend_from_slice(&bytes);
                if codec == Codec::Json {
                    out.push(b'\n');
                }
                count += 1;
                if count >= limit {
                    break;
                }
            }
            if scanned >= SCAN_MAX {
                break;
            }
        }
        if count > 0 || wait_ms == 0 || Instant::now() >= deadline {
            break;
        }
        if scanned >= SCAN_MAX {
            continue;
        }
        match tokio::time::timeout_at(deadline, head_rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => break,
        }
    }
    let mut resp = Response::new(Full::new(Bytes::from(out)));
    let ctype = match codec {
        Codec::Json => "application/x-ndjson",
        Codec::Msgpack => "application/msgpack",
    };
    resp.headers_mut()
        .insert(CONTENT_TYPE, ctype.parse().expect("static header"));
    Ok(resp)
}
