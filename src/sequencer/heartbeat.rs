//! Liveness of live sessions, decided in one place for all of them: one timer here walks
//! the registry every tick, pings the sessions whose turn it is, and closes those that
//! have been silent too long (1001) or whose token expired (4001).
//!
//! Why here and not a timer per session: every idle session paid for its own timer entry
//! inside its task (a `Sleep` is 112 bytes, plus the deadlines beside it), and the
//! registry's owner already walks every session for the sweep. A tick is
//! `min(heartbeat.interval_ms, 1 s)`; sessions are spread over the ticks of one interval by
//! id, so 10,000 sessions at a 20 s interval get 500 pings a second, not 10,000 at once.
//! A session before its hello is not in the registry; it keeps its own hello deadline.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{now_ms, Sequencer, Timer};
use crate::clock::mono_ms;
use crate::fanout::{Outbound, SessionId};
use crate::protocol::CloseCode;

/// The longest tick.
const MAX_TICK: Duration = Duration::from_secs(1);

/// How the heartbeat ticks: derived from `heartbeat.interval_ms` and `timeout_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub tick: Duration,
    /// Ticks per interval: a session is pinged on one of them.
    pub slots: u64,
    /// A session silent for longer than this is closed.
    pub timeout_ms: u64,
}

impl Heartbeat {
    pub fn new(interval_ms: u64, timeout_ms: u64) -> Heartbeat {
        let interval = Duration::from_millis(interval_ms.max(1));
        let tick = interval.min(MAX_TICK);
        let slots = (interval.as_millis() / tick.as_millis()).max(1) as u64;
        Heartbeat {
            tick,
            slots,
            timeout_ms,
        }
    }
}

/// What one tick decided for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Expired,
    Silent,
    Ping,
    Wait,
}

/// One session at one tick: `exp` is its token's expiry (Unix s, 0: none), `heard` the
/// monotonic ms of its last frame, `now` (monotonic ms, Unix ms), `turn` whether this tick
/// is its ping slot.
fn judge(exp: u64, heard: u64, now: (u64, u64), timeout_ms: u64, turn: bool) -> Verdict {
    let (now_mono, now_wall) = now;
    if exp != 0 && exp.saturating_mul(1000) <= now_wall {
        Verdict::Expired
    } else if now_mono.saturating_sub(heard) > timeout_ms {
        Verdict::Silent
    } else if turn {
        Verdict::Ping
    } else {
        Verdict::Wait
    }
}

impl Sequencer {
    /// Arms the first tick (at start-up).
    pub(super) fn arm_heartbeat(&mut self) {
        self.timers
            .insert(Timer::Heartbeat, self.settings.heartbeat.tick);
    }

    /// One tick over every live session, then the next tick is armed.
    pub(super) fn heartbeat_tick(&mut self) {
        self.heartbeat_turn = self.heartbeat_turn.wrapping_add(1);
        let hb = self.settings.heartbeat;
        let (now_mono, now_wall) = (mono_ms(), now_ms());
        let mut ping: Vec<SessionId> = Vec::new();
        for h in self.registry.all() {
            let verdict = judge(
                h.ctl.token_exp.load(Ordering::Relaxed),
                h.ctl.last_heard_ms.load(Ordering::Relaxed),
                (now_mono, now_wall),
                hb.timeout_ms,
                h.id.wrapping_add(self.heartbeat_turn) % hb.slots == 0,
            );
            match verdict {
                // The session ends itself and says goodbye; presence follows from that.
                Verdict::Expired => h.ctl.close_with(CloseCode::Unauthorized),
                Verdict::Silent => h.ctl.close_with(CloseCode::GoingAway),
                Verdict::Ping => ping.push(h.id),
                Verdict::Wait => {}
            }
        }
        for id in ping {
            // A full queue closes the session as a slow consumer, as any frame would.
            if let Err(id) = self.registry.send_to(id, Outbound::Ping) {
                self.drop_session(id);
            }
        }
        self.timers.insert(Timer::Heartbeat, hb.tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_at_most_a_second_and_cover_the_interval() {
        let hb = Heartbeat::new(20_000, 45_000);
        assert_eq!((hb.tick, hb.slots), (Duration::from_secs(1), 20));
        let hb = Heartbeat::new(200, 600);
        assert_eq!((hb.tick, hb.slots), (Duration::from_millis(200), 1));
        let hb = Heartbeat::new(2_500, 6_000);
        assert_eq!((hb.tick, hb.slots), (Duration::from_secs(1), 2));
        let hb = Heartbeat::new(0, 1);
        assert_eq!((hb.tick, hb.slots), (Duration::from_millis(1), 1));
    }

    #[test]
    fn expiry_comes_first_then_silence_then_the_ping_turn() {
        let now = (100_000, 1_767_225_600_000);
        let exp_past = 1_767_225_600;
        let exp_future = exp_past + 60;
        assert_eq!(judge(exp_past, 0, now, 45_000, true), Verdict::Expired);
        assert_eq!(
            judge(exp_future, 50_000, now, 45_000, true),
            Verdict::Silent
        );
        assert_eq!(judge(0, 50_000, now, 45_000, true), Verdict::Silent);
        assert_eq!(judge(exp_future, 55_000, now, 45_000, true), Verdict::Ping);
        assert_eq!(judge(exp_future, 55_000, now, 45_000, false), Verdict::Wait);
        // exactly at the timeout is not yet silent; before hello (exp 0) never expires
        assert_eq!(judge(0, 55_000, now, 45_000, false), Verdict::Wait);
    }
}
