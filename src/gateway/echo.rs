//! The echo endpoint, `/echo`: every message the client sends comes back as it came. It is
//! there only with `debug.echo_endpoint = true` (off by default), so that a WebSocket test
//! suite (Autobahn, through `kosoku` in `.ci/autobahn.sh`) can exercise the broker's frame
//! reader, limits and writer ([`Conn`]) without speaking the Switchboard protocol.
//!
//! Invariants: the same [`Conn`] and `limits.max_frame_bytes` as `/ws`; at most
//! [`HIGH_WATER`] bytes wait to be written (above it nothing more is read until the socket
//! takes them, so a client that sends and never reads cannot grow our memory); a shutdown
//! closes it with 4000 like a session.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use super::conn::{answer_code, Conn, Message, ReadError};
use super::session::{Io, HIGH_WATER};
use super::wire::OpCode;
use super::Gateway;
use crate::protocol::CloseCode;

/// How long a close waits for the socket, and then for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Echoes messages until the client closes, breaks the protocol or the broker stops.
pub async fn run(io: Io, gw: Arc<Gateway>) {
    let mut conn = Conn::new(io, gw.config.limits.max_frame_bytes);
    let (code, started) = loop {
        let next = tokio::select! {
            biased;
            _ = gw.shutdown.cancelled() => break (CloseCode::ShuttingDown.code(), true),
            r = poll_fn(|cx| {
                if conn.backlog() >= HIGH_WATER {
                    // Full: nothing more is read until the socket takes what waits.
                    conn.poll_write_out(cx).map(|r| r.map(|()| None).map_err(ReadError::Io))
                } else {
                    conn.poll_io(cx, false)
                }
            }) => r,
        };
        match next {
            Ok(Some(Message::Text(data))) => conn.queue(OpCode::Text, &data),
            Ok(Some(Message::Binary(data))) => conn.queue(OpCode::Binary, &data),
            Ok(Some(Message::Ping(payload))) => conn.queue(OpCode::Pong, &payload),
            Ok(Some(Message::Pong)) | Ok(None) => {}
            Ok(Some(Message::Close(code))) => break (answer_code(code), false),
            Err(ReadError::Violation { code, why }) => {
                tracing::debug!(code, why, "echo: websocket violation");
                break (code, true);
            }
            Err(e) => {
                tracing::debug!(error = %e, "echo: read ended");
                return;
            }
        }
    };
    conn.close(code, "", CLOSE_WAIT, CLOSE_WAIT, started).await;
}
