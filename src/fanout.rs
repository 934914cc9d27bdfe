//! The session registry and fan-out: who is connected, and pushing pre-encoded frames into
//! their bounded outbound queues.
//!
//! Owned by the sequencer (one writer). Each event is encoded at most once per codec and
//! the bytes are shared (`Bytes` is reference counted). A queue that is full marks its
//! session slow: it is closed with 4008 and dropped from the registry; the device resumes
//! from its last `off`, so nothing is lost.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;

use crate::log::event::Devices;
use crate::outbox::{Outbox, PushError};
use crate::protocol::frames::Platform;
use crate::protocol::{CloseCode, Codec};

/// Process-unique session id.
pub type SessionId = u64;

/// What a session's writer sends.
#[derive(Debug)]
pub enum Outbound {
    /// One encoded frame (text for JSON sessions, binary for MessagePack ones).
    Frame(Bytes),
    /// A durable event's frame; the writer records `off` once it is on the socket.
    Event { off: u64, bytes: Bytes },
    /// The successful start of a session: the reply, the replay range, `sync`, snapshot.
    Start(Box<SessionStart>),
    /// A pong answering a client ping.
    Pong(Bytes),
    /// A heartbeat ping (from the sequencer's heartbeat).
    Ping,
}

/// Everything the writer sends right after a successful hello, in order.
#[derive(Debug)]
pub struct SessionStart {
    pub reply: Bytes,
    /// Replay the inbox in `(since, head]`.
    pub replay: Option<(u64, u64)>,
    pub user: String,
    pub device: String,
    /// The head the replay ends at.
    pub head: u64,
    pub sync: Bytes,
    pub snapshot: Bytes,
}

/// Shared control block of a session: its outbound queue, how to close it and when it was
/// last heard from.
#[derive(Debug)]
pub struct SessionCtl {
    /// What the session writes to its socket, in order.
    pub outbox: Outbox,
    /// The requested close code (0: none). Requests wake the session through the outbox's
    /// waker, so an idle session waits on one thing for both.
    close: AtomicU16,
    /// [`crate::clock::mono_ms`] of the last frame received (monotonic: a wall clock step
    /// must not make every session look silent).
    pub last_heard_ms: AtomicU64,
    /// Unix seconds when the token expires (0: not authenticated yet).
    pub token_exp: AtomicU64,
    /// The newest offset written to the socket (replay or live): what the device has
    /// received. Events above it when the session ends are owed as pushes.
    pub written_off: AtomicU64,
}

impl SessionCtl {
    /// A control block whose queue holds at most `queue_capacity` items.
    pub fn new(queue_capacity: usize) -> SessionCtl {
        SessionCtl {
            outbox: Outbox::new(queue_capacity),
            close: AtomicU16::new(0),
            last_heard_ms: AtomicU64::new(0),
            token_exp: AtomicU64::new(0),
            written_off: AtomicU64::new(0),
        }
    }

    /// Asks the writer to close the socket with `code` (the first request wins).
    pub fn close(&self, code: u16) {
        if self
            .close
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.outbox.wake();
        }
    }

    pub fn close_with(&self, code: CloseCode) {
        self.close(code.code());
    }

    /// The requested close code (0: none).
    pub fn close_code(&self) -> u16 {
        self.close.load(Ordering::Acquire)
    }

    /// A close request or, when `take` is set, the next queued item; a close request
    /// comes first. Cancel-safe: an item is only taken when it is returned.
    pub fn poll_next(&self, cx: &mut std::task::Context<'_>, take: bool) -> Poll<Next> {
        if let Some(next) = self.ready(take) {
            return Poll::Ready(next);
        }
        self.outbox.register(cx);
        // Again: a push or close between the first look and the registration woke no one.
        match self.ready(take) {
            Some(next) => Poll::Ready(next),
            None => Poll::Pending,
        }
    }

    /// [`SessionCtl::poll_next`] as a future.
    pub async fn next(&self, take: bool) -> Next {
        std::future::poll_fn(|cx| self.poll_next(cx, take)).await
    }

    fn ready(&self, take: bool) -> Option<Next> {
        let code = self.close_code();
        if code != 0 {
            return Some(Next::Close(code));
        }
        if take {
            return self.outbox.try_pop().map(Next::Item);
        }
        None
    }
}

/// What [`SessionCtl::next`] woke for.
#[derive(Debug)]
pub enum Next {
    Close(u16),
    Item(Outbound),
}

/// A registered session as the sequencer sees it.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub id: SessionId,
    /// One allocation per user, shared by the registry's key, every handle of the user and
    /// the session itself.
    pub user: Arc<str>,
    pub device: Box<str>,
    pub platform: Platform,
    pub codec: Codec,
    pub ctl: Arc<SessionCtl>,
}

/// Encodes a value once per codec, on first use.
pub struct Encoded<'a, T: serde::Serialize> {
    value: &'a T,
    json: Option<Bytes>,
    msgpack: Option<Bytes>,
}

impl<'a, T: serde::Serialize> Encoded<'a, T> {
    pub fn new(value: &'a T) -> Self {
        Encoded {
            value,
            json: None,
            msgpack: None,
        }
    }

    pub fn get(&mut self, codec: Codec) -> Option<Bytes> {
        let slot = match codec {
            Codec::Json => &mut self.json,
            Codec::Msgpack => &mut self.msgpack,
        };
        if slot.is_none() {
            match codec.encode(self.value) {
                Ok(b) => *slot = Some(b),
                Err(e) => {
                    tracing::error!(error = %e, "event could not be encoded; not delivered");
                    return None;
                }
            }
        }
        slot.clone()
    }
}

/// Why a push to a session failed.
enum PushFail {
    Full,
    Gone,
}

/// All live sessions (past hello), by user: fan-out goes user by user, so a user's
/// handles sit together and one lookup finds them all.
#[derive(Default)]
pub struct Registry {
    /// Each user's sessions, usually one (the first is stored in a `Vec` of exactly one).
    by_user: HashMap<Arc<str>, Vec<SessionHandle>>,
    /// Whose each session is.
    owner: HashMap<SessionId, Arc<str>>,
}

impl Registry {
    pub fn insert(&mut self, mut h: SessionHandle) {
        let id = h.id;
        let user = match self.by_user.entry(h.user.clone()) {
            Entry::Occupied(mut e) => {
                // The user's one allocation, not the new handle's copy.
                h.user = e.key().clone();
                e.get_mut().push(h);
                e.key().clone()
            }
            Entry::Vacant(e) => {
                let user = e.key().clone();
                // `vec![h]` holds exactly one; a first `push` would reserve four.
                e.insert(vec![h]);
                user
            }
        };
        self.owner.insert(id, user);
    }

    pub fn remove(&mut self, id: SessionId) -> Option<SessionHandle> {
        let user = self.owner.remove(&id)?;
        let handles = self.by_user.get_mut(&user)?;
        let at = handles.iter().position(|h| h.id == id)?;
        let h = handles.remove(at);
        if handles.is_empty() {
            self.by_user.remove(&user);
        }
        Some(h)
    }

    pub fn get(&self, id: SessionId) -> Option<&SessionHandle> {
        let user = self.owner.get(&id)?;
        self.by_user.get(user)?.iter().find(|h| h.id == id)
    }

    pub fn of_user(&self, user: &str) -> impl Iterator<Item = &SessionHandle> {
        self.by_user.get(user).into_iter().flatten()
    }

    pub fn device_count(&self, user: &str) -> u32 {
        self.by_user.get(user).map(|v| v.len() as u32).unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.owner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }

    pub fn users(&self) -> usize {
        self.by_user.len()
    }

    pub fn all(&self) -> impl Iterator<Item = &SessionHandle> {
        self.by_user.values().flatten()
    }

    /// Pushes `value` to the sessions of every user in `users` whose device `devices`
    /// includes.
    /// Returns how many sessions it reached and the sessions that must be dropped (slow
    /// ones are already asked to close with 4008).
    pub fn deliver<'u, T: serde::Serialize>(
        &self,
        users: impl IntoIterator<Item = &'u String>,
        devices: Devices<'_>,
        off: Option<u64>,
        enc: &mut Encoded<'_, T>,
    ) -> (usize, Vec<SessionId>) {
        let mut reached = 0;
        let mut dead = Vec::new();
        for user in users {
            for h in self.of_user(user) {
                if !devices.includes(&h.device) {
                    continue;
                }
                let Some(bytes) = enc.get(h.codec) else {
                    continue;
                };
                let item = match off {
                    Some(off) => Outbound::Event { off, bytes },
                    None => Outbound::Frame(bytes),
                };
                match push(h, item) {
                    Ok(()) => reached += 1,
                    Err(PushFail::Full) => {
                        metrics::counter!(crate::telemetry::QUEUE_DROPS).increment(1);
                        tracing::warn!(session = h.id, user = %h.user, "outbound queue full; closing slow consumer");
                        h.ctl.close_with(CloseCode::SlowConsumer);
                        dead.push(h.id);
                    }
                    Err(PushFail::Gone) => dead.push(h.id),
                }
            }
        }
        (reached, dead)
    }

    /// Sends one frame to one session; a full queue closes it (4008).
    pub fn send_to(&self, id: SessionId, frame: Outbound) -> Result<(), SessionId> {
        let Some(h) = self.get(id) else {
            return Ok(());
        };
        match push(h, frame) {
            Ok(()) => Ok(()),
            Err(PushFail::Full) => {
                metrics::counter!(crate::telemetry::QUEUE_DROPS).increment(1);
                h.ctl.close_with(CloseCode::SlowConsumer);
                Err(id)
            }
            Err(PushFail::Gone) => Err(id),
        }
    }
}

fn push(h: &SessionHandle, item: Outbound) -> Result<(), PushFail> {
    h.ctl.outbox.push(item).map_err(|e| match e {
        PushError::Full => PushFail::Full,
        PushError::Closed => PushFail::Gone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(b: u8) -> Outbound {
        Outbound::Frame(Bytes::from(vec![b]))
    }

    #[tokio::test]
    async fn a_close_request_comes_before_queued_items() {
        let ctl = SessionCtl::new(8);
        ctl.outbox.push(frame(1)).unwrap();
        ctl.close(4008);
        assert!(matches!(ctl.next(true).await, Next::Close(4008)));
        // The first request wins.
        ctl.close(4000);
        assert_eq!(ctl.close_code(), 4008);
    }

    #[tokio::test]
    async fn a_session_not_taking_items_still_wakes_for_a_close() {
        let ctl = Arc::new(SessionCtl::new(8));
        let c2 = ctl.clone();
        let waiter = tokio::spawn(async move { c2.next(false).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // An item does not end a wait that does not take items...
        ctl.outbox.push(frame(1)).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        // ...a close request does.
        ctl.close(4008);
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(got, Ok(Ok(Next::Close(4008)))));
        assert_eq!(ctl.outbox.len(), 1);
    }

    #[tokio::test]
    async fn a_push_wakes_a_waiting_next_and_a_cancelled_next_loses_nothing() {
        let ctl = Arc::new(SessionCtl::new(8));
        // A wait raced against a timer and dropped: nothing is taken.
        tokio::select! {
            _ = ctl.next(true) => panic!("nothing was queued"),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        let c2 = ctl.clone();
        let waiter = tokio::spawn(async move { c2.next(true).await });
        tokio::task::yield_now().await;
        ctl.outbox.push(frame(9)).unwrap();
        let got = waiter.await.unwrap();
        assert!(
            matches!(got, Next::Item(Outbound::Frame(ref b)) if b[0] == 9),
            "{got:?}"
        );
        // A push before the wait starts is found by its first look: no lost wake-up.
        ctl.outbox.push(frame(7)).unwrap();
        let got = ctl.next(true).await;
        assert!(
            matches!(got, Next::Item(Outbound::Frame(ref b)) if b[0] == 7),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn items_come_in_order_when_taken() {
        let ctl = SessionCtl::new(8);
        ctl.outbox.push(frame(1)).unwrap();
        ctl.outbox.push(frame(2)).unwrap();
        for want in [1u8, 2] {
            match ctl.next(true).await {
                Next::Item(Outbound::Frame(b)) => assert_eq!(b[0], want),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn handle(id: SessionId, user: &str, device: &str) -> SessionHandle {
        SessionHandle {
            id,
            user: Arc::from(user),
            device: device.into(),
            platform: Platform::Web,
            codec: Codec::Json,
            ctl: Arc::new(SessionCtl::new(8)),
        }
    }

    #[test]
    fn the_registry_finds_sessions_by_id_and_by_user_and_shares_the_user_id() {
        let mut r = Registry::default();
        r.insert(handle(1, "alice", "a1"));
        r.insert(handle(2, "alice", "a2"));
        r.insert(handle(3, "bob", "b1"));
        assert_eq!((r.len(), r.users()), (3, 2));
        assert_eq!(r.device_count("alice"), 2);
        let mut ids: Vec<_> = r.all().map(|h| h.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 3]);
        let alice: Vec<_> = r.of_user("alice").collect();
        assert!(
            Arc::ptr_eq(&alice[0].user, &alice[1].user),
            "one allocation per user"
        );
        assert_eq!(r.get(2).map(|h| &*h.device), Some("a2"));

        assert_eq!(r.remove(1).map(|h| h.id), Some(1));
        assert!(r.get(1).is_none());
        assert!(r.remove(1).is_none(), "removed once");
        assert_eq!(r.of_user("alice").map(|h| h.id).collect::<Vec<_>>(), [2]);
        r.remove(2);
        assert_eq!((r.len(), r.users(), r.device_count("alice")), (1, 1, 0));
        assert_eq!(r.get(3).map(|h| &*h.user), Some("bob"));
    }
}
