//! A session's outbound queue: the sequencer pushes pre-encoded frames without waiting, the
//! session takes them in order.
//!
//! Why not `tokio::sync::mpsc`: its bounded channel allocates its first block of 32 slots
//! (about 1.6 KiB for [`Outbound`]) when it is created and keeps it for the channel's life,
//! which was the largest single cost of an idle session. Here the items live in a
//! `VecDeque` that holds no memory while empty: it grows with a burst and is freed once the
//! session has taken everything.
//!
//! Invariants:
//! - at most `capacity` items wait; a push beyond it fails with [`PushError::Full`] and is
//!   not queued (the sequencer then closes the session as a slow consumer, 4008);
//! - once [`Outbox::close`] is called (the session ended), pushes fail with
//!   [`PushError::Closed`] and what waited is dropped;
//! - items come out in the order they went in; a wake-up is never lost: the one consumer
//!   registers its waker, then looks again (see [`Outbox::register`]), and every push or
//!   [`Outbox::wake`] wakes the waker registered last.
//!
//! Why an `AtomicWaker` and not a `Notify`: a waiter on a `Notify` is a future of ~70 bytes
//! that lives inside the waiting task, and an idle session waits all its life. A waker
//! slot costs the task nothing; the session polls its queue in a `poll_fn`.

use std::collections::VecDeque;
use std::sync::Mutex;

use atomic_waker::AtomicWaker;

use crate::fanout::Outbound;

/// Capacity kept after the queue drains; above it the buffer is freed.
const KEEP_CAPACITY: usize = 0;

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("the session's queue is full")]
    Full,
    #[error("the session has ended")]
    Closed,
}

#[derive(Debug, Default)]
struct Inner {
    items: VecDeque<Outbound>,
    closed: bool,
}

#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    capacity: usize,
    ready: AtomicWaker,
}

impl Outbox {
    pub fn new(capacity: usize) -> Outbox {
        Outbox {
            inner: Mutex::new(Inner::default()),
            capacity,
            ready: AtomicWaker::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // No code path panics while holding the lock; a poisoned one still holds valid data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` without waiting.
    pub fn push(&self, item: Outbound) -> Result<(), PushError> {
        {
            let mut g = self.lock();
            if g.closed {
                return Err(PushError::Closed);
            }
            if g.items.len() >= self.capacity {
                return Err(PushError::Full);
            }
            g.items.push_back(item);
        }
        self.ready.wake();
        Ok(())
    }

    /// The next item, if one waits.
    pub fn try_pop(&self) -> Option<Outbound> {
        let mut g = self.lock();
        let item = g.items.pop_front();
        if g.items.is_empty() && g.items.capacity() > KEEP_CAPACITY {
            g.items = VecDeque::new();
        }
        item
    }

    /// Wakes the consumer without an item.
    pub fn wake(&self) {
        self.ready.wake();
    }

    /// Registers the consumer's waker for the next push or [`Outbox::wake`]. The consumer
    /// must look at its conditions again after this before it returns `Pending`: what
    /// happened before the registration woke an older waker, or none.
    pub fn register(&self, cx: &std::task::Context<'_>) {
        self.ready.register(cx.waker());
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends the queue: later pushes fail, what waited is dropped.
    pub fn close(&self) {
        let mut g = self.lock();
        g.closed = true;
        g.items = VecDeque::new();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn frame(n: u8) -> Outbound {
        Outbound::Frame(Bytes::from(vec![n]))
    }

    fn byte(o: Outbound) -> u8 {
        match o {
            Outbound::Frame(b) => b[0],
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn order_capacity_and_close() {
        let q = Outbox::new(2);
        assert_eq!(q.push(frame(1)), Ok(()));
        assert_eq!(q.push(frame(2)), Ok(()));
        assert_eq!(q.push(frame(3)), Err(PushError::Full));
        assert_eq!(q.len(), 2);
        assert_eq!(q.try_pop().map(byte), Some(1));
        assert_eq!(q.push(frame(4)), Ok(()));
        assert_eq!(q.try_pop().map(byte), Some(2));
        assert_eq!(q.try_pop().map(byte), Some(4));
        assert!(q.try_pop().is_none());
        q.push(frame(5)).expect("room");
        q.close();
        assert!(q.is_closed());
        assert!(q.try_pop().is_none(), "close drops what waited");
        assert_eq!(q.push(frame(6)), Err(PushError::Closed));
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let q = Outbox::new(100);
        for i in 0..50 {
            q.push(frame(i)).expect("room");
        }
        assert!(q.lock().items.capacity() >= 50);
        while q.try_pop().is_some() {}
        assert_eq!(q.lock().items.capacity(), 0);
    }
}
