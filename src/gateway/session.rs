//! One WebSocket session, in one task: client messages -> commands for the sequencer; the
//! outbound queue -> the socket; the hello timeout.
//!
//! Pings, silence and token expiry of a live session are decided by the sequencer's
//! heartbeat (`sequencer::heartbeat`), which reaches the session as a queued ping or a close
//! request; so is shutdown. An idle live session waits on two things only: its socket and
//! its queue.
//!
//! Invariants:
//! - one task owns the socket ([`Conn`]); its only blocking point is the `select!` over the
//!   socket (cancel-safe [`Conn::poll_io`]), the outbound queue with the close request, and
//!   (before hello) the hello deadline and shutdown, so a socket that will not take our
//!   bytes never stops us reading, and a client that does not read never stops the
//!   sequencer (its queue fills: 4008);
//! - at most [`HIGH_WATER`] bytes wait in the write buffer: above it the session takes
//!   nothing more from its queue, so a slow reader's backlog stays in the bounded queue;
//! - a whole message, fragments added up, is capped at `limits.max_frame_bytes` (1009);
//! - replies and events reach the socket only through the bounded queue, in the order the
//!   sequencer produced them; the replay is written between the hello reply and `sync`, in
//!   slices that respect the high-water mark, before anything queued after the hello;
//! - the offset of the newest event the socket has taken is recorded in
//!   [`SessionCtl::written_off`] when the session ends: what lies above it is owed a push.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio::time::{sleep, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::conn::{answer_code, Conn, Message, ReadError};
use super::rate::{RateLimiter, Verdict};
use super::wire::OpCode;
use super::Gateway;
use crate::clock::mono_ms;
use crate::fanout::{Next, Outbound, SessionCtl, SessionHandle, SessionId, SessionStart};
use crate::protocol::frames::{parse_frame, ClientOp};
use crate::protocol::{CloseCode, Codec, ErrorCode, ProtoError};
use crate::sequencer::{encode_reply, Command, HelloCmd};
use crate::telemetry as m;

pub type Io = TokioIo<Upgraded>;

/// Most bytes waiting in a session's write buffer before it stops taking from its queue.
pub const HIGH_WATER: usize = 64 * 1024;

/// Queue items taken per turn of the loop (then the socket gets one write).
const WRITE_BATCH: usize = 256;

/// Events read from the log per slice of a replay.
const REPLAY_SLICE: usize = 256;

/// How long a close we started waits for the client's close frame once ours is written.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Runs a session to its end.
///
/// The session is built before the future exists: a future keeps its arguments for its
/// whole life beside whatever they are moved into, and every idle session pays for the
/// task's size, so the only thing this future captures is the [`Session`] itself.
pub fn run(
    io: Io,
    gw: Arc<Gateway>,
    codec: Codec,
    bearer: Option<String>,
    id: SessionId,
) -> impl std::future::Future<Output = ()> + Send {
    let ctl = Arc::new(SessionCtl::new(gw.config.limits.outbound_queue));
    ctl.last_heard_ms.store(mono_ms(), Ordering::Relaxed);
    let lim = &gw.config.limits;
    let limiter = RateLimiter::new(
        lim.rate_per_s,
        lim.rate_burst,
        lim.rate_strikes,
        std::time::Instant::now(),
    );
    let pending = Pending {
        bearer,
        deadline: Box::pin(sleep(Duration::from_millis(lim.hello_timeout_ms))),
        shutdown: Box::pin(gw.shutdown.clone().cancelled_owned()),
    };
    let mut s = Session {
        conn: Conn::new(io, lim.max_frame_bytes),
        gw,
        codec,
        id,
        ctl,
        phase: Phase::Hello(Box::new(pending)),
        limiter,
        replay: None,
        queued_off: 0,
        written_off: 0,
    };
    // Not an `async fn live(self)`: an async fn keeps its by-value arguments twice (as
    // captured and as moved into its body), and that would be a second `Session`. The
    // block below uses the captured `s` in place.
    async move {
        s.run().await;
        s.ctl.outbox.close();
        if s.written_off > 0 {
            s.ctl
                .written_off
                .fetch_max(s.written_off, Ordering::Relaxed);
        }
        let (gw, id) = (s.gw.clone(), s.id);
        drop(s);
        // Boxed: a channel send holding a `Command` is 440 bytes, larger than the whole
        // live loop (264), and a task reserves room for its largest state all its life.
        let goodbye = Box::pin(async move {
            let _ = gw.commands.send(Command::Goodbye { session: id }).await;
        });
        goodbye.await;
    }
}

/// What a turn of the session loop woke for.
enum Wake {
    Read(Result<Message, ReadError>),
    Drained,
    Queue(Outbound),
    HelloTimeout,
    CloseRequested(u16),
    Shutdown,
}

/// Where the session is in its life.
enum Phase {
    /// Waiting for its hello: what only that needs, boxed, so a live session holds none
    /// of it.
    Hello(Box<Pending>),
    /// Past hello: whose session this is (the registry's allocation, shared).
    Live(Arc<str>),
}

/// What a session needs until its hello succeeds.
struct Pending {
    /// From the upgrade's `Authorization: Bearer`, for a hello without a token.
    bearer: Option<String>,
    /// `limits.hello_timeout_ms` after the upgrade.
    deadline: Pin<Box<Sleep>>,
    /// A live session learns of shutdown from the sequencer (it is in the registry); one
    /// before hello is not, so it watches the token itself.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Pending {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wake::Shutdown);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Wake::HelloTimeout);
        }
        Poll::Pending
    }
}

/// How the session ends.
enum End {
    /// Send a close frame with this code, then wait for the client's.
    Close(u16),
    /// The client sent its close: answer with this code.
    Answer(u16),
    /// The socket is gone.
    Gone,
}

/// A replay in progress: `(after, head]` of the user's inbox, then `sync` and the snapshot.
struct Replay {
    user: String,
    device: String,
    after: u64,
    head: u64,
    sync: Bytes,
    snapshot: Bytes,
}

struct Session {
    conn: Conn<Io>,
    gw: Arc<Gateway>,
    codec: Codec,
    id: SessionId,
    /// Its queue (`ctl.outbox`) carries replies made here too, behind what is queued.
    ctl: Arc<SessionCtl>,
    phase: Phase,
    limiter: RateLimiter,
    replay: Option<Box<Replay>>,
    /// The newest offset in the write buffer.
    queued_off: u64,
    /// The newest offset the socket has taken.
    written_off: u64,
}

impl Session {
    async fn run(&mut self) {
        let end = loop {
            // Checked here, not only in the select: a client that floods keeps the socket
            // branch ready, and a close request must still win.
            let code = self.ctl.close_code();
            if code != 0 {
                break End::Close(code);
            }
            if let Err(()) = self.fill_replay() {
                break End::Gone;
            }
            let room = self.replay.is_none() && self.conn.backlog() < HIGH_WATER;
            // Asleep on a full buffer: wake when the socket has taken it.
            let want_drain = !room && self.conn.backlog() > 0;
            let wake = tokio::select! {
                biased;
                w = poll_fn(|cx| match &mut self.phase {
                    Phase::Hello(p) => p.poll(cx),
                    Phase::Live(_) => Poll::Pending,
                }) => w,
                r = poll_fn(|cx| self.conn.poll_io(cx, want_drain)) => match r {
                    Ok(Some(msg)) => Wake::Read(Ok(msg)),
                    Ok(None) => Wake::Drained,
                    Err(e) => Wake::Read(Err(e)),
                },
                next = poll_fn(|cx| self.ctl.poll_next(cx, room)) => match next {
                    Next::Item(item) => Wake::Queue(item),
                    Next::Close(code) => Wake::CloseRequested(code),
                },
            };
            if self.conn.backlog() == 0 {
                self.written_off = self.queued_off;
            }
            match wake {
                Wake::CloseRequested(code) => break End::Close(code),
                Wake::Shutdown => break End::Close(CloseCode::ShuttingDown.code()),
                Wake::HelloTimeout => break End::Close(CloseCode::HelloTimeout.code()),
                Wake::Drained => {}
                Wake::Queue(item) => {
                    self.write_item(item);
                    for _ in 1..WRITE_BATCH {
                        if self.replay.is_some() || self.conn.backlog() >= HIGH_WATER {
                            break;
                        }
                        match self.ctl.outbox.try_pop() {
                            Some(item) => self.write_item(item),
                            None => break,
                        }
                    }
                }
                Wake::Read(Ok(msg)) => {
                    self.ctl.last_heard_ms.store(mono_ms(), Ordering::Relaxed);
                    match msg {
                        Message::Ping(p) => self.conn.queue(OpCode::Pong, &p),
                        Message::Pong => {}
                        Message::Close(code) => break End::Answer(answer_code(code)),
                        Message::Text(data) => {
                            if let Some(end) = Box::pin(self.data(false, data)).await {
                                break end;
                            }
                        }
                        Message::Binary(data) => {
                            if let Some(end) = Box::pin(self.data(true, data)).await {
                                break end;
                            }
                        }
                    }
                }
                Wake::Read(Err(ReadError::Violation { code, why })) => {
                    tracing::debug!(session = self.id, code, why, "websocket violation");
                    if code == 1007 {
                        metrics::counter!(m::FRAMES_IN, "result" => "undecodable").increment(1);
                    }
                    break End::Close(code);
                }
                Wake::Read(Err(e)) => {
                    tracing::debug!(session = self.id, error = %e, "read ended");
                    break End::Gone;
                }
            }
        };
        // Boxed, like `data`: a task is as large as its largest state, and an idle session
        // should not reserve the room of a hello or a close it is not in.
        Box::pin(self.close(end)).await;
    }

    /// Puts one queued item into the write buffer.
    fn write_item(&mut self, item: Outbound) {
        match item {
            Outbound::Frame(b) => self.queue_data(&b),
            Outbound::Event { off, bytes } => {
                self.queue_data(&bytes);
                self.queued_off = self.queued_off.max(off);
            }
            Outbound::Pong(b) => self.conn.queue(OpCode::Pong, &b),
            Outbound::Ping => self.conn.queue(OpCode::Ping, b"hb"),
            Outbound::Start(start) => self.start(*start),
        }
    }

    /// One data frame: text for JSON sessions, binary for MessagePack ones.
    fn queue_data(&mut self, b: &[u8]) {
        let op = if self.codec.is_binary() {
            OpCode::Binary
        } else {
            OpCode::Text
        };
        self.conn.queue(op, b);
    }

    /// The hello reply, then the replay (in slices), `sync` and the presence snapshot.
    fn start(&mut self, start: SessionStart) {
        self.queue_data(&start.reply);
        self.queued_off = self.queued_off.max(start.head);
        match start.replay {
            Some((since, head)) => {
                self.replay = Some(Box::new(Replay {
                    user: start.user,
                    device: start.device,
                    after: since,
                    head,
                    sync: start.sync,
                    snapshot: start.snapshot,
                }));
            }
            None => {
                self.queue_data(&start.sync);
                self.queue_data(&start.snapshot);
            }
        }
    }

    /// Writes the next slices of a replay while the write buffer has room. `Err`: the log
    /// cannot be read (the session must end; the device resumes later).
    fn fill_replay(&mut self) -> Result<(), ()> {
        while self.conn.backlog() < HIGH_WATER {
            let Some(r) = self.replay.as_mut() else {
                return Ok(());
            };
            let (user, device, head) = (&r.user, &r.device, r.head);
            let mut after = r.after;
            let mut taken = 0usize;
            let mut frames = Vec::new();
            for off in self.gw.store.inbox(user, after, head) {
                let off = off.map_err(|e| {
                    tracing::error!(error = %e, user = %user, "replay read failed");
                })?;
                after = off;
                taken += 1;
                match self.gw.store.get(off) {
                    Ok(Some(rec)) if rec.event.devices().includes(device) => {
                        match self.codec.encode(&rec.wire()) {
                            Ok(b) => frames.push(b),
                            Err(e) => tracing::error!(error = %e, off, "replay encode failed"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, user = %user, off, "replay read failed");
                        return Err(());
                    }
                }
                if taken >= REPLAY_SLICE {
                    break;
                }
            }
            let done = taken < REPLAY_SLICE;
            r.after = after;
            for b in &frames {
                self.queue_data(b);
            }
            if done {
                if let Some(r) = self.replay.take() {
                    self.queue_data(&r.sync);
                    self.queue_data(&r.snapshot);
                }
            }
        }
        Ok(())
    }

    /// Handles one data message. `Some`: the session must end.
    async fn data(&mut self, binary: bool, data: Vec<u8>) -> Option<End> {
        if binary != self.codec.is_binary() {
            return Some(End::Close(CloseCode::UnsupportedData.code()));
        }
        let value = match self.codec.decode(&data) {
            Ok(v) => v,
            Err(_) => {
                metrics::counter!(m::FRAMES_IN, "result" => "undecodable").increment(1);
                return Some(End::Close(CloseCode::InvalidPayload.code()));
            }
        };
        drop(data);
        let parsed = parse_frame(value);
        if let Phase::Hello(_) = self.phase {
            // Before hello: only a well-formed hello is accepted.
            return match parsed {
                Ok(f) => match f.op {
                    ClientOp::Hello(h) => match self.hello(f.id, h).await {
                        Ok(u) => {
                            self.phase = Phase::Live(u);
                            None
                        }
                        Err(code) => Some(End::Close(code)),
                    },
                    _ => {
                        self.reply_now(
                            f.id,
                            ProtoError::unauthorized("the first frame must be hello"),
                        );
                        Some(End::Close(CloseCode::Unauthorized.code()))
                    }
                },
                Err(e) => {
                    self.reply_now(e.id, e.error);
                    Some(End::Close(CloseCode::Unauthorized.code()))
                }
            };
        }
        let verdict = self.limiter.check(std::time::Instant::now());
        if verdict != Verdict::Pass {
            // Answered here, not by the sequencer: a flood costs the sequencer nothing.
            metrics::counter!(m::FRAMES_IN, "result" => "rate_limited").increment(1);
            let re = match &parsed {
                Ok(f) => f.id,
                Err(e) => e.id,
            };
            let lim = &self.gw.config.limits;
            let error = ProtoError::new(
                ErrorCode::RateLimited,
                format!(
                    "over limits.rate_per_s ({}/s, burst {}); nothing was applied",
                    lim.rate_per_s, lim.rate_burst
                ),
            );
            self.reply_now(re, error);
            if verdict == Verdict::Close {
                tracing::info!(
                    session = self.id,
                    user = self.user(),
                    strikes = lim.rate_strikes,
                    "session closed: rate limited"
                );
                return Some(End::Close(CloseCode::RateLimited.code()));
            }
            return None;
        }
        metrics::counter!(m::FRAMES_IN, "result" => if parsed.is_ok() { "ok" } else { "bad_request" }).increment(1);
        let session = self.id;
        let max_body = self.gw.config.limits.max_body_bytes;
        let cmd = match parsed {
            Err(e) => Command::Reject {
                session,
                id: e.id,
                error: e.error,
            },
            Ok(f) => match f.op {
                ClientOp::Refresh(r) => match self.gw.verifier.verify(&r.token) {
                    Ok(c) if c.sub == self.user() => Command::Refresh {
                        session,
                        id: f.id,
                        exp: c.exp,
                        iat: c.iat,
                    },
                    Ok(_) => Command::Reject {
                        session,
                        id: f.id,
                        error: ProtoError::unauthorized("the new token is for another user"),
                    },
                    Err(e) => Command::Reject {
                        session,
                        id: f.id,
                        error: ProtoError::unauthorized(e.to_string()),
                    },
                },
                ClientOp::Send(s) if crate::protocol::codec::json_len(&s.body) > max_body => {
                    Command::Reject {
                        session,
                        id: f.id,
                        error: ProtoError::too_large(format!(
                            "`body` is over {max_body} bytes encoded"
                        )),
                    }
                }
                op => Command::Op {
                    session,
                    id: f.id,
                    op,
                },
            },
        };
        if self.gw.commands.send(cmd).await.is_err() {
            return Some(End::Close(CloseCode::ShuttingDown.code()));
        }
        None
    }

    /// Authenticates a hello and registers the session with the sequencer. `Err`: the
    /// close code (the error reply is queued).
    async fn hello(
        &mut self,
        reply_id: Option<u32>,
        h: crate::protocol::frames::HelloOp,
    ) -> Result<Arc<str>, u16> {
        let bearer = match &self.phase {
            Phase::Hello(p) => p.bearer.as_deref(),
            Phase::Live(_) => None,
        };
        let Some(token) = h.token.as_deref().or(bearer) else {
            self.reply_now(reply_id, ProtoError::unauthorized("hello needs a token"));
            return Err(CloseCode::Unauthorized.code());
        };
        let claims = match self.gw.verifier.verify(token) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(session = self.id, error = %e, "hello refused");
                self.reply_now(reply_id, ProtoError::unauthorized(e.to_string()));
                return Err(CloseCode::Unauthorized.code());
            }
        };
        let contacts = claims.contacts.clone().map(|list| {
            list.into_iter()
                .filter(|c| crate::protocol::frames::check_user("contacts", c).is_ok())
                .collect::<Vec<_>>()
        });
        self.ctl.token_exp.store(claims.exp, Ordering::Relaxed);
        let user: Arc<str> = Arc::from(claims.sub);
        let handle = SessionHandle {
            id: self.id,
            user: user.clone(),
            device: h.device.into(),
            platform: h.platform.unwrap_or_default(),
            codec: self.codec,
            ctl: self.ctl.clone(),
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
        if self.gw.commands.send(cmd).await.is_err() {
            return Err(CloseCode::ShuttingDown.code());
        }
        match done_rx.await {
            Ok(Ok(())) => Ok(user),
            Ok(Err(e)) => {
                let code = match e.code {
                    // Refused because the broker is draining: the close says so.
                    ErrorCode::Unavailable if self.gw.shutdown.is_cancelled() => {
                        CloseCode::ShuttingDown.code()
                    }
                    ErrorCode::Unavailable => 1013,
                    // limits.max_devices_per_user: a policy, not a bad token.
                    ErrorCode::Busy => 1008,
                    _ => CloseCode::Unauthorized.code(),
                };
                self.reply_now(reply_id, e);
                Err(code)
            }
            Err(_) => Err(CloseCode::ShuttingDown.code()),
        }
    }

    /// The session's user ("" before hello).
    fn user(&self) -> &str {
        match &self.phase {
            Phase::Live(u) => u,
            Phase::Hello(_) => "",
        }
    }

    /// Queues an error reply made by the session itself, behind what is queued already.
    fn reply_now(&self, re: Option<u32>, e: ProtoError) {
        if let Some(b) = encode_reply(self.codec, re, &Err(e)) {
            let _ = self.ctl.outbox.push(Outbound::Frame(b));
        }
    }

    /// Ends the session: what was queued before the close goes out first (not for a slow
    /// consumer, whose queue is abandoned: it resumes from its last `off`), then the close
    /// frame; a close we started waits (bounded) for the client's answer.
    async fn close(&mut self, end: End) {
        let code = match end {
            End::Gone => return,
            End::Close(code) | End::Answer(code) => code,
        };
        if code != CloseCode::SlowConsumer.code() {
            while let Some(item) = self.ctl.outbox.try_pop() {
                if self.conn.backlog() >= HIGH_WATER {
                    break;
                }
                if let Outbound::Start(_) = item {
                    // A session closing before its start was written does not start.
                    continue;
                }
                self.write_item(item);
            }
        }
        metrics::counter!(m::CLOSES, "code" => code.to_string()).increment(1);
        // The close frame waits behind what the socket has not taken yet (a slow consumer
        // must still learn it was cut, to resume): as long as a silent client is given.
        let write_for =
            Duration::from_millis(self.gw.config.heartbeat.timeout_ms).max(CLOSE_LINGER);
        let started = matches!(end, End::Close(_));
        if self
            .conn
            .close(code, close_reason(code), write_for, CLOSE_LINGER, started)
            .await
        {
            self.written_off = self.queued_off;
        }
    }
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

#[cfg(test)]
mod size_tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn size_of_return<A, R>(_: &impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every idle session pays for its task's largest state all its life (issue 8's
    /// memory budget), so growth here must be a decision, not an accident. Measured on
    /// 2026-12-07: 448 bytes (720 before the heartbeat moved to the sequencer, the queue's
    /// wait became a waker slot and the goodbye send was boxed).
    #[test]
    fn the_session_future_stays_small() {
        let f =
            |a: (Io, Arc<Gateway>, Codec, Option<String>, SessionId)| run(a.0, a.1, a.2, a.3, a.4);
        let size = size_of_return(&f);
        assert!(size <= 512, "the session future is {size} bytes");
        let live = |s: &'static mut Session| s.run();
        assert!(size_of_return(&live) <= 256, "the live loop grew");
    }
}
