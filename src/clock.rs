//! The broker's monotonic clock, for liveness.
//!
//! Two kinds of time are kept apart. Wall time ([`crate::sequencer::now_ms`]) stamps
//! events and judges what is stated in wall time by others or by the log: token `exp`/`nbf`,
//! `last_seen`, retention age, durable deadlines (pushes, call limits). Liveness (when a
//! session was last heard from, what the sweep calls silent) is measured here, on the
//! monotonic clock, so a step of the wall clock (NTP, a VM resumed, an operator) neither
//! closes every session at once (+1 h) nor keeps dead ones for an hour (-1 h).

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds on a monotonic clock whose zero is the first call in this process.
pub fn mono_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_back() {
        let a = mono_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = mono_ms();
        assert!(b >= a + 5, "{a} {b}");
    }
}
