//! One WebSocket session: a reader task (frames -> commands) and a writer task (outbound
//! queue -> socket), sharing a [`SessionCtl`].
//!
//! Invariants:
//! - `read_frame` is never raced in `select!` (it is not cancel-safe): the reader only
//!   reads, and is dropped as a whole when the session ends;
//! - a whole message, fragments added up, is capped at `limits.max_frame_bytes` (1009);
//! - the writer buffers frames and flushes when its queue is drained, so a burst costs one
//!   syscall, not one per frame; the buffer is freed once flushed ([`LazyBuf`]), so an idle
//!   session holds none;
//! - replies and events reach the writer only through the bounded queue, in the order the
//!   sequencer produced them; the replay is written between the hello reply and `sync`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{
    Frame, OpCode, Payload, WebSocket, WebSocketError, WebSocketRead, WebSocketWrite,
};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use super::lazybuf::LazyBuf;
use super::rate::{RateLimiter, Verdict};
use super::Gateway;
use crate::fanout::{Outbound, SessionCtl, SessionHandle, SessionId, SessionStart};
use crate::protocol::frames::{parse_frame, ClientOp};
use crate::protocol::{CloseCode, Codec, ErrorCode, ProtoError};
use crate::sequencer::{encode_reply, now_ms, Command, HelloCmd};
use crate::telemetry as m;

type Io = TokioIo<Upgraded>;
type Reader = WebSocketRead<ReadHalf<Io>>;
type Writer = WebSocketWrite<LazyBuf<WriteHalf<Io>>>;

/// Frames the writer sends before flushing, at most.
const WRITE_BATCH: usize = 256;

/// Runs a session to its end.
pub async fn run(
    ws: WebSocket<Io>,
    gw: Arc<Gateway>,
    codec: Codec,
    bearer: Option<String>,
    id: SessionId,
) {
    let mut ws = ws;
    ws.set_auto_close(false);
    ws.set_auto_pong(false);
    ws.set_max_message_size(gw.config.limits.max_frame_bytes);
    let (reader, writer) = ws.split(|io| {
        let (r, w) = tokio::io::split(io);
        (r, LazyBuf::new(w, 16 * 1024))
    });
    let (tx, rx) = mpsc::channel(gw.config.limits.outbound_queue);
    let ctl = Arc::new(SessionCtl::default());
    ctl.last_heard_ms.store(now_ms(), Ordering::Relaxed);

    let writer_task = tokio::spawn(write_loop(writer, rx, ctl.clone(), gw.clone(), codec));
    let mut reader_task = tokio::spawn(read_loop(
        reader,
        tx,
        ctl.clone(),
        gw.clone(),
        codec,
        bearer,
        id,
    ));

    // The reader ends first when the client goes away; the writer ends first when the
    // server closes. Either way the other gets a bounded time to finish.
    let mut writer_task = writer_task;
    tokio::select! {
        _ = &mut reader_task => {
            ctl.close(1000);
            if tokio::time::timeout(Duration::from_secs(2), &mut writer_task).await.is_err() {
                writer_task.abort();
            }
        }
        _ = &mut writer_task => {
            if tokio::time::timeout(Duration::from_secs(2), &mut reader_task).await.is_err() {
                reader_task.abort();
            }
        }
    }
    let _ = gw.commands.send(Command::Goodbye { session: id }).await;
}

/// Reads frames, turns them into commands. Returns when the socket ends or must close.
async fn read_loop(
    mut reader: Reader,
    tx: mpsc::Sender<Outbound>,
    ctl: Arc<SessionCtl>,
    gw: Arc<Gateway>,
    codec: Codec,
    bearer: Option<String>,
    id: SessionId,
) {
    let max = gw.config.limits.max_frame_bytes;
    let hello_deadline = Instant::now() + Duration::from_millis(gw.config.limits.hello_timeout_ms);
    let mut session: Option<(String, String)> = None; // (user, device) once hello succeeded
    let mut partial: Option<(OpCode, Vec<u8>)> = None;
    let mut send_nothing = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
    let lim = &gw.config.limits;
    let mut limiter = RateLimiter::new(
        lim.rate_per_s,
        lim.rate_burst,
        lim.rate_strikes,
        std::time::Instant::now(),
    );
    loop {
        let next = if session.is_none() {
            // Before hello the read is bounded by the hello timeout; on timeout the
            // session ends, so dropping the half-read frame is harmless.
            match tokio::time::timeout_at(hello_deadline, reader.read_frame(&mut send_nothing))
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    ctl.close_with(CloseCode::HelloTimeout);
                    return;
                }
            }
        } else {
            reader.read_frame(&mut send_nothing).await
        };
        let frame = match next {
            Ok(f) => f,
            Err(WebSocketError::FrameTooLarge) => {
                ctl.close_with(CloseCode::TooBig);
                return;
            }
            Err(WebSocketError::InvalidUTF8) => {
                ctl.close_with(CloseCode::InvalidPayload);
                return;
            }
            Err(e) => {
                tracing::debug!(session = id, error = %e, "read ended");
                return;
            }
        };
        ctl.last_heard_ms.store(now_ms(), Ordering::Relaxed);
        let (opcode, data) = match frame.opcode {
            OpCode::Close => {
                let code = match frame.payload.len() {
                    0 => 1000,
                    1 => 1002,
                    _ => u16::from_be_bytes([frame.payload[0], frame.payload[1]]),
                };
                ctl.close(echo_code(code));
                return;
            }
            OpCode::Ping => {
                let _ = tx.try_send(Outbound::Pong(Bytes::copy_from_slice(&frame.payload)));
                continue;
            }
            OpCode::Pong => continue,
            OpCode::Text | OpCode::Binary if frame.fin => {
                if partial.is_some() {
                    ctl.close(1002);
                    return;
                }
                (frame.opcode, frame.payload.to_vec())
            }
            OpCode::Text | OpCode::Binary => {
                if partial.is_some() {
                    ctl.close(1002);
                    return;
                }
                partial = Some((frame.opcode, frame.payload.to_vec()));
                continue;
            }
            OpCode::Continuation => {
                let Some((op, mut buf)) = partial.take() else {
                    ctl.close(1002);
                    return;
                };
                if buf.len() + frame.payload.len() > max {
                    ctl.close_with(CloseCode::TooBig);
                    return;
                }
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    partial = Some((op, buf));
                    continue;
                }
                (op, buf)
            }
        };
        if (opcode == OpCode::Binary) != codec.is_binary() {
            ctl.close_with(CloseCode::UnsupportedData);
            return;
        }
        let value = match codec.decode(&data) {
            Ok(v) => v,
            Err(_) => {
                metrics::counter!(m::FRAMES_IN, "result" => "undecodable").increment(1);
                ctl.close_with(CloseCode::InvalidPayload);
                return;
            }
        };
        let parsed = parse_frame(value);
        let Some((user, _device)) = &session else {
            // Before hello: only a well-formed hello is accepted.
            match parsed {
                Ok(f) => match f.op {
                    ClientOp::Hello(h) => {
                        match hello(&gw, &tx, &ctl, codec, id, f.id, h, bearer.as_deref()).await {
                            Ok(s) => session = Some(s),
                            Err(()) => return,
                        }
                    }
                    _ => {
                        reply_now(
                            &tx,
                            codec,
                            f.id,
                            ProtoError::unauthorized("the first frame must be hello"),
                        );
                        ctl.close_with(CloseCode::Unauthorized);
                        return;
                    }
                },
                Err(e) => {
                    reply_now(&tx, codec, e.id, e.error);
                    ctl.close_with(CloseCode::Unauthorized);
                    return;
                }
            }
            continue;
        };
        let verdict = limiter.check(std::time::Instant::now());
        if verdict != Verdict::Pass {
            // Answered here, not by the sequencer: a flood costs the sequencer nothing.
            metrics::counter!(m::FRAMES_IN, "result" => "rate_limited").increment(1);
            let re = match &parsed {
                Ok(f) => f.id,
                Err(e) => e.id,
            };
            let error = ProtoError::new(
                ErrorCode::RateLimited,
                format!(
                    "over limits.rate_per_s ({}/s, burst {}); nothing was applied",
                    lim.rate_per_s, lim.rate_burst
                ),
            );
            reply_now(&tx, codec, re, error);
            if verdict == Verdict::Close {
                tracing::info!(session = id, user = %user, strikes = lim.rate_strikes, "session closed: rate limited");
                ctl.close_with(CloseCode::RateLimited);
                return;
            }
            continue;
        }
        metrics::counter!(m::FRAMES_IN, "result" => if parsed.is_ok() { "ok" } else { "bad_request" }).increment(1);
        let cmd = match parsed {
            Err(e) => Command::Reject {
                session: id,
                id: e.id,
                error: e.error,
            },
            Ok(f) => match f.op {
                ClientOp::Refresh(r) => {
                    let result = match gw.verifier.verify(&r.token) {
                        Ok(c) if &c.sub == user => {
                            ctl.token_exp.store(c.exp, Ordering::Relaxed);
                            Ok(serde_json::json!({"exp": c.exp}))
                        }
                        Ok(_) => Err(ProtoError::unauthorized(
                            "the new token is for another user",
                        )),
                        Err(e) => Err(ProtoError::unauthorized(e.to_string())),
                    };
                    Command::Reject {
                        session: id,
                        id: f.id,
                        error: match result {
                            Ok(body) => {
                                // A success answered in order: through the queue directly.
                                if let Some(b) = encode_reply(codec, f.id, &Ok(body)) {
                                    if f.id.is_some() {
                                        let _ = tx.try_send(Outbound::Frame(b));
                                    }
                                }
                                continue;
                            }
                            Err(e) => e,
                        },
                    }
                }
                ClientOp::Send(s)
                    if crate::protocol::codec::json_len(&s.body)
                        > gw.config.limits.max_body_bytes =>
                {
                    Command::Reject {
                        session: id,
                        id: f.id,
                        error: ProtoError::too_large(format!(
                            "`body` is over {} bytes encoded",
                            gw.config.limits.max_body_bytes
                        )),
                    }
                }
                op => Command::Op {
                    session: id,
                    id: f.id,
                    op,
                },
            },
        };
        if gw.commands.send(cmd).await.is_err() {
            return;
        }
    }
}

/// Authenticates a hello and registers the session with the sequencer.
#[allow(clippy::too_many_arguments)]
async fn hello(
    gw: &Arc<Gateway>,
    tx: &mpsc::Sender<Outbound>,
    ctl: &Arc<SessionCtl>,
    codec: Codec,
    id: SessionId,
    reply_id: Option<u32>,
    h: crate::protocol::frames::HelloOp,
    bearer: Option<&str>,
) -> Result<(String, String), ()> {
    let Some(token) = h.token.as_deref().or(bearer) else {
        reply_now(
            tx,
            codec,
            reply_id,
            ProtoError::unauthorized("hello needs a token"),
        );
        ctl.close_with(CloseCode::Unauthorized);
        return Err(());
    };
    let claims = match gw.verifier.verify(token) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(session = id, error = %e, "hello refused");
            reply_now(tx, codec, reply_id, ProtoError::unauthorized(e.to_string()));
            ctl.close_with(CloseCode::Unauthorized);
            return Err(());
        }
    };
    let contacts = claims.contacts.clone().map(|list| {
        list.into_iter()
            .filter(|c| crate::protocol::frames::check_user("contacts", c).is_ok())
            .collect::<Vec<_>>()
    });
    ctl.token_exp.store(claims.exp, Ordering::Relaxed);
    let handle = SessionHandle {
        id,
        user: claims.sub.clone(),
        device: h.device.clone(),
        platform: h.platform.unwrap_or_default(),
        codec,
        tx: tx.clone(),
        ctl: ctl.clone(),
    };
    let (done_tx, done_rx) = oneshot::channel();
    let cmd = Command::Hello(Box::new(HelloCmd {
        handle,
        reply_id,
        since: h.since,
        contacts,
        iat: claims.iat,
        done: done_tx,
    }));
    if gw.commands.send(cmd).await.is_err() {
        return Err(());
    }
    match done_rx.await {
        Ok(Ok(())) => Ok((claims.sub, h.device)),
        Ok(Err(e)) => {
            let code = e.code;
            reply_now(tx, codec, reply_id, e);
            ctl.close(match code {
                ErrorCode::Unavailable => 1013,
                // limits.max_devices_per_user: a policy, not a bad token.
                ErrorCode::Busy => 1008,
                _ => CloseCode::Unauthorized.code(),
            });
            Err(())
        }
        Err(_) => Err(()),
    }
}

/// Queues an error reply straight from the session (before it is registered).
fn reply_now(tx: &mpsc::Sender<Outbound>, codec: Codec, re: Option<u32>, e: ProtoError) {
    if let Some(b) = encode_reply(codec, re, &Err(e)) {
        let _ = tx.try_send(Outbound::Frame(b));
    }
}

/// The close code to answer a client's close with.
fn echo_code(code: u16) -> u16 {
    match code {
        1000..=1003 | 1007..=1011 | 3000..=4999 => code,
        _ => 1000,
    }
}

/// Writes queued frames; pings; closes on request, shutdown, silence or token expiry.
async fn write_loop(
    mut w: Writer,
    mut rx: mpsc::Receiver<Outbound>,
    ctl: Arc<SessionCtl>,
    gw: Arc<Gateway>,
    codec: Codec,
) {
    let hb = &gw.config.heartbeat;
    let mut ping = tokio::time::interval(Duration::from_millis(hb.interval_ms));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    let expiry = sleep_until(far);
    tokio::pin!(expiry);
    let mut armed_exp = 0u64;
    let close_code = loop {
        let exp = ctl.token_exp.load(Ordering::Relaxed);
        if exp != armed_exp {
            armed_exp = exp;
            let left_ms = (exp * 1000).saturating_sub(now_ms());
            expiry
                .as_mut()
                .reset(Instant::now() + Duration::from_millis(left_ms));
        }
        tokio::select! {
            biased;
            _ = ctl.closed() => break ctl.close_code(),
            _ = gw.shutdown.cancelled() => break CloseCode::ShuttingDown.code(),
            item = rx.recv() => {
                let Some(item) = item else { break 1000 };
                let mut written = written_mark(&item);
                if write_item(&mut w, item, &gw, codec).await.is_err() {
                    return;
                }
                let mut n = 1;
                while n < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(item) => {
                            written = written.max(written_mark(&item));
                            if write_item(&mut w, item, &gw, codec).await.is_err() {
                                return;
                            }
                            n += 1;
                        }
                        Err(_) => break,
                    }
                }
                if w.flush().await.is_err() {
                    return;
                }
                if written > 0 {
                    ctl.written_off.fetch_max(written, Ordering::Relaxed);
                }
            }
            _ = ping.tick() => {
                let heard = ctl.last_heard_ms.load(Ordering::Relaxed);
                if now_ms().saturating_sub(heard) > hb.timeout_ms {
                    break CloseCode::GoingAway.code();
                }
                if w.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"hb"))).await.is_err()
                    || w.flush().await.is_err()
                {
                    return;
                }
            }
            _ = &mut expiry, if armed_exp != 0 => {
                if ctl.token_exp.load(Ordering::Relaxed) == armed_exp {
                    break CloseCode::Unauthorized.code();
                }
            }
        }
    };
    // Frames queued before the close (an error reply before 4001, say) go out first; a
    // slow consumer's queue is abandoned: it resumes from its last `off`.
    if close_code != CloseCode::SlowConsumer.code() {
        while let Ok(item) = rx.try_recv() {
            if write_item(&mut w, item, &gw, codec).await.is_err() {
                return;
            }
        }
    }
    let reason = close_reason(close_code);
    metrics::counter!(m::CLOSES, "code" => close_code.to_string()).increment(1);
    let _ = w
        .write_frame(Frame::close(close_code, reason.as_bytes()))
        .await;
    let _ = w.flush().await;
}

fn close_reason(code: u16) -> &'static str {
    [
        CloseCode::GoingAway,
        CloseCode::UnsupportedData,
        CloseCode::InvalidPayload,
        CloseCode::TooBig,
        CloseCode::ShuttingDown,
        CloseCode::Unauthorized,
        CloseCode::Kicked,
        CloseCode::SlowConsumer,
        CloseCode::RateLimited,
        CloseCode::HelloTimeout,
    ]
    .iter()
    .find(|c| c.code() == code)
    .map(|c| c.reason())
    .unwrap_or("")
}

/// The offset an item carries to the device once written (0: none).
fn written_mark(item: &Outbound) -> u64 {
    match item {
        Outbound::Event { off, .. } => *off,
        Outbound::Start(s) => s.head,
        Outbound::Frame(_) | Outbound::Pong(_) => 0,
    }
}

async fn write_item(
    w: &mut Writer,
    item: Outbound,
    gw: &Gateway,
    codec: Codec,
) -> Result<(), WebSocketError> {
    match item {
        Outbound::Frame(b) => write_data(w, &b, codec).await,
        Outbound::Event { bytes, .. } => write_data(w, &bytes, codec).await,
        Outbound::Pong(b) => w.write_frame(Frame::pong(Payload::Borrowed(&b))).await,
        Outbound::Start(start) => write_start(w, *start, gw, codec).await,
    }
}

/// One data frame: text for JSON sessions, binary for MessagePack ones.
async fn write_data(w: &mut Writer, b: &Bytes, codec: Codec) -> Result<(), WebSocketError> {
    let op = if codec.is_binary() {
        OpCode::Binary
    } else {
        OpCode::Text
    };
    w.write_frame(Frame::new(true, op, None, Payload::Borrowed(b)))
        .await
}

/// The hello reply, the replay of `(since, head]`, `sync` and the presence snapshot.
async fn write_start(
    w: &mut Writer,
    start: SessionStart,
    gw: &Gateway,
    codec: Codec,
) -> Result<(), WebSocketError> {
    write_data(w, &start.reply, codec).await?;
    if let Some((since, head)) = start.replay {
        let mut sent = 0usize;
        for off in gw.store.inbox(&start.user, since, head) {
            let record = match off.and_then(|off| gw.store.get(off)) {
                Ok(Some(r)) if r.event.devices().includes(&start.device) => r,
                Ok(_) => continue,
                Err(e) => {
                    tracing::error!(error = %e, user = %start.user, "replay read failed");
                    return Err(WebSocketError::ConnectionClosed);
                }
            };
            match codec.encode(&record.wire()) {
                Ok(b) => write_data(w, &b, codec).await?,
                Err(e) => tracing::error!(error = %e, off = record.off, "replay encode failed"),
            }
            sent += 1;
            if sent % WRITE_BATCH == 0 {
                w.flush().await?;
            }
        }
    }
    write_data(w, &start.sync, codec).await?;
    write_data(w, &start.snapshot, codec).await
}
