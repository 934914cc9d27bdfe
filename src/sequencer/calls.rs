//! Call signaling: validates call operations against each call's state machine in State
//! and emits the transitions. Ring timeouts, time limits and dropped participants are
//! timers of the sequencer; after a restart they are re-armed from State, so a call never
//! stays ringing (or over its limit) forever.

use std::time::Duration;

use serde_json::{json, Value};

use super::{now_ms, Sequencer, Timer};
use crate::log::event::{
    CallAcceptedEv, CallAnsweredElsewhereEv, CallEndedEv, CallInviteEv, CallMediaEv, CallNetworkEv,
    CallRejectedEv, CallSignalEv, CallTimeWarningEv, CallUserEv, EndReason, Event, PushRequestEv,
};
use crate::protocol::codec::json_len;
use crate::protocol::frames::{
    CallInviteOp, CallMediaOp, CallNetworkOp, CallRejectOp, CallSignalOp, Quality, DEFAULT_RING_MS,
    RING_MS,
};
use crate::protocol::{ClientOp, ErrorCode, ProtoError};
use crate::state::{Call, ConvId, Invitee, MediaFlags, Phase};

/// Largest `call.signal` payload (rule 28), bytes of JSON.
pub const MAX_SIGNAL_BYTES: usize = 32 * 1024;
/// When the time warning comes, seconds before the limit.
const WARNING_S: u64 = 60;

impl Sequencer {
    /// Dispatches one call operation of `user` on `device`.
    pub(super) fn call_op(
        &mut self,
        user: &str,
        device: &str,
        op: ClientOp,
    ) -> Result<Value, ProtoError> {
        match op {
            ClientOp::CallInvite(i) => self.call_invite(user, device, i),
            ClientOp::CallAccept(c) => self.call_accept(user, device, &c.call),
            ClientOp::CallReject(r) => self.call_reject(user, r),
            ClientOp::CallSignal(s) => self.call_signal(user, device, s),
            ClientOp::CallMedia(m) => self.call_media(user, m),
            ClientOp::CallNetwork(n) => self.call_network(user, n),
            ClientOp::CallLeave(c) => self.call_leave(user, &c.call),
            ClientOp::CallEnd(c) => self.call_end(user, &c.call),
            _ => Err(ProtoError::bad_request("not a call operation")),
        }
    }

    /// A live call `user` takes part in: `not_found`, `forbidden` or `conflict` otherwise.
    fn live_call(&self, id: &str, user: &str) -> Result<&Call, ProtoError> {
        let c = self
            .state
            .calls
            .get(id)
            .ok_or_else(|| ProtoError::not_found(format!("no call {id}")))?;
        if !c.is_participant(user) {
            return Err(ProtoError::forbidden(format!("{user} is not in call {id}")));
        }
        if c.is_ended() {
            return Err(ProtoError::conflict(format!("call {id} has ended")));
        }
        Ok(c)
    }

    fn call_invite(
        &mut self,
        user: &str,
        device: &str,
        op: CallInviteOp,
    ) -> Result<Value, ProtoError> {
        if let Some(other) = self.state.calls.busy(user) {
            return Err(ProtoError::new(
                ErrorCode::Busy,
                format!("{user} is already in active call {other}"),
            ));
        }
        let mut invitees: Vec<String> = match (op.to, op.conv) {
            (Some(to), _) => to,
            (None, Some(conv)) => {
                let conv = ConvId::parse(&conv)?;
                self.require_member(&conv, user)?;
                self.state.members_of(&conv)
            }
            (None, None) => {
                return Err(ProtoError::bad_request(
                    "`call.invite` needs `to` or `conv`",
                ))
            }
        };
        invitees.sort();
        invitees.dedup();
        invitees.retain(|u| u != user);
        if invitees.is_empty() {
            return Err(ProtoError::bad_request("no one to invite"));
        }
        if invitees.len() > self.settings.max_invitees {
            return Err(ProtoError::bad_request(format!(
                "a call invites at most {} users (calls.max_invitees)",
                self.settings.max_invitees
            )));
        }
        // Out-of-range ring times are clamped to 1-300 s (rule 18), not refused: the
        // event carries the ring time in force.
        let ring_ms = op
            .ring_ms
            .unwrap_or(DEFAULT_RING_MS)
            .clamp(*RING_MS.start(), *RING_MS.end());
        let call = format!("call-{}", self.next_off());
        let busy: Vec<String> = invitees
            .iter()
            .filter(|u| self.state.calls.busy(u).is_some())
            .cloned()
            .collect();
        let mut audience = vec![user.to_string()];
        audience.extend(invitees.iter().filter(|u| !busy.contains(u)).cloned());
        let (_, _, ts) = self.emit(
            audience,
            Event::CallInvite(CallInviteEv {
                call: call.clone(),
                from: user.to_string(),
                device: device.to_string(),
                to: invitees.clone(),
                media: op.media,
                ring_ms,
                time_limit_s: op.time_limit_s,
                meta: op.meta,
            }),
        );
        for b in &busy {
            self.emit(
                vec![user.to_string()],
                Event::CallBusy(CallUserEv {
                    call: call.clone(),
                    user: b.clone(),
                }),
            );
        }
        if busy.len() == invitees.len() {
            self.end_call(&call, EndReason::Busy, None);
            return Ok(json!({"call": call}));
        }
        for u in invitees.iter().filter(|u| !busy.contains(u)) {
            if self.registry.device_count(u) == 0 {
                self.emit(
                    vec![],
                    Event::PushRequest(PushRequestEv {
                        user: u.clone(),
                        kind: "call".into(),
                        call: call.clone(),
                        expires_at: ts + ring_ms,
                    }),
                );
            }
        }
        self.timers.insert(
            Timer::Ring { call: call.clone() },
            Duration::from_millis(ring_ms),
        );
        Ok(json!({"call": call}))
    }

    fn call_accept(&mut self, user: &str, device: &str, id: &str) -> Result<Value, ProtoError> {
        let c = self.live_call(id, user)?;
        match c.invitees.get(user) {
            Some(Invitee::Ringing) => {}
            Some(Invitee::Accepted { device: d }) => {
                return Err(ProtoError::conflict(format!(
                    "already accepted on device {d}"
                )))
            }
            Some(_) => {
                return Err(ProtoError::conflict(format!(
                    "{user} is no longer invited to {id}"
                )))
            }
            None => {
                return Err(ProtoError::conflict(
                    "the initiator does not accept their own call",
                ))
            }
        }
        if let Some(other) = self.state.calls.busy(user) {
            if other != id {
                return Err(ProtoError::new(
                    ErrorCode::Busy,
                    format!("{user} is already in active call {other}"),
                ));
            }
        }
        let first = c.phase == Phase::Ringing;
        let limit = c.time_limit_s;
        let to = c.audience();
        self.emit(
            to,
            Event::CallAccepted(CallAcceptedEv {
                call: id.to_string(),
                user: user.to_string(),
                device: device.to_string(),
            }),
        );
        self.emit(
            vec![user.to_string()],
            Event::CallAnsweredElsewhere(CallAnsweredElsewhereEv {
                call: id.to_string(),
                user: user.to_string(),
                device: device.to_string(),
            }),
        );
        if first {
            if let Some(limit) = limit {
                self.arm_time_limit(id, limit, limit * 1000);
            }
        }
        Ok(json!({"call": id}))
    }

    /// Arms the warning and the end of a time limit, `left_ms` before the end.
    fn arm_time_limit(&mut self, id: &str, limit_s: u64, left_ms: u64) {
        let call = id.to_string();
        if limit_s <= WARNING_S && left_ms == limit_s * 1000 {
            // A limit of a minute or less is warned about at once (rule 18).
            self.time_warning_now(id, limit_s);
        } else if left_ms > WARNING_S * 1000 {
            self.timers.insert(
                Timer::TimeWarning { call: call.clone() },
                Duration::from_millis(left_ms - WARNING_S * 1000),
            );
        }
        self.timers
            .insert(Timer::TimeLimit { call }, Duration::from_millis(left_ms));
    }

    fn call_reject(&mut self, user: &str, op: CallRejectOp) -> Result<Value, ProtoError> {
        let id = op.call.as_str();
        let c = self.live_call(id, user)?;
        match c.invitees.get(user) {
            Some(Invitee::Ringing) => {}
            Some(_) => {
                return Err(ProtoError::conflict(format!(
                    "{user} is not ringing in {id}"
                )))
            }
            None => {
                return Err(ProtoError::conflict(
                    "the initiator ends a call with call.end",
                ))
            }
        }
        let to = c.audience();
        self.emit(
            to,
            Event::CallRejected(CallRejectedEv {
                call: id.to_string(),
                user: user.to_string(),
                reason: op.reason,
            }),
        );
        self.end_if_unanswered(id);
        Ok(json!({"call": id}))
    }

    /// A ringing call nobody can answer any more ends as `rejected`.
    fn end_if_unanswered(&mut self, id: &str) {
        if let Some(c) = self.state.calls.get(id) {
            if c.phase == Phase::Ringing && !c.anyone_answering() {
                self.end_call(id, EndReason::Rejected, None);
            }
        }
    }

    fn call_signal(
        &mut self,
        user: &str,
        device: &str,
        op: CallSignalOp,
    ) -> Result<Value, ProtoError> {
        let c = self.live_call(&op.call, user)?;
        if !c.is_participant(&op.to) {
            return Err(ProtoError::not_found(format!(
                "{} is not in call {}",
                op.to, op.call
            )));
        }
        if json_len(&op.data) > MAX_SIGNAL_BYTES {
            return Err(ProtoError::too_large(format!(
                "`data` is over {MAX_SIGNAL_BYTES} bytes encoded"
            )));
        }
        let to_device = op
            .to_device
            .or_else(|| c.signal_device(&op.to).map(str::to_string));
        self.emit(
            vec![op.to],
            Event::CallSignal(CallSignalEv {
                call: op.call.clone(),
                from: user.to_string(),
                device: device.to_string(),
                to_device,
                kind: op.kind,
                data: op.data,
            }),
        );
        Ok(json!({"call": op.call}))
    }

    fn call_media(&mut self, user: &str, op: CallMediaOp) -> Result<Value, ProtoError> {
        let c = self.live_call(&op.call, user)?;
        let now = c
            .flags
            .get(user)
            .copied()
            .unwrap_or_else(|| MediaFlags::initial(c.media));
        let next = MediaFlags {
            audio: op.audio.unwrap_or(now.audio),
            video: op.video.unwrap_or(now.video),
            hold: op.hold.unwrap_or(now.hold),
            screen: op.screen.unwrap_or(now.screen),
        };
        let to = c.audience();
        self.emit(
            to,
            Event::CallMedia(CallMediaEv {
                call: op.call.clone(),
                user: user.to_string(),
                audio: next.audio,
                video: next.video,
                hold: next.hold,
                screen: next.screen,
            }),
        );
        Ok(
            json!({"call": op.call, "audio": next.audio, "video": next.video, "hold": next.hold, "screen": next.screen}),
        )
    }

    fn call_network(&mut self, user: &str, op: CallNetworkOp) -> Result<Value, ProtoError> {
        let c = self.live_call(&op.call, user)?;
        let to = c.audience();
        let quality = match op.quality {
            Quality::Poor => "poor",
            Quality::Ok => "ok",
        };
        self.emit(
            to,
            Event::CallNetwork(CallNetworkEv {
                call: op.call.clone(),
                user: user.to_string(),
                quality: quality.into(),
            }),
        );
        Ok(json!({"call": op.call}))
    }

    fn call_leave(&mut self, user: &str, id: &str) -> Result<Value, ProtoError> {
        let c = self.live_call(id, user)?;
        if !c.is_in(user) {
            return Err(ProtoError::conflict(format!(
                "{user} is not in call {id} any more"
            )));
        }
        self.leave(id, user);
        Ok(json!({"call": id}))
    }

    /// `user` leaves; fewer than two remaining ends the call (hangup by the last to leave).
    fn leave(&mut self, id: &str, user: &str) {
        let Some(c) = self.state.calls.get(id) else {
            return;
        };
        let to = c.audience();
        self.emit(
            to,
            Event::CallLeft(CallUserEv {
                call: id.to_string(),
                user: user.to_string(),
            }),
        );
        if let Some(c) = self.state.calls.get(id) {
            if c.remaining() < 2 {
                self.end_call(id, EndReason::Hangup, Some(user.to_string()));
            }
        }
    }

    fn call_end(&mut self, user: &str, id: &str) -> Result<Value, ProtoError> {
        if !self.live_call(id, user)?.is_in(user) {
            return Err(ProtoError::conflict(format!(
                "{user} is not in call {id} any more"
            )));
        }
        self.end_call(id, EndReason::Hangup, Some(user.to_string()));
        Ok(json!({"call": id}))
    }

    /// Emits `call.ended` with the duration since the first accept.
    fn end_call(&mut self, id: &str, reason: EndReason, by: Option<String>) {
        let Some(c) = self.state.calls.get(id) else {
            return;
        };
        if c.is_ended() {
            return;
        }
        let to = c.audience();
        let phase = c.phase;
        let ts = self.stamp();
        let duration_ms = match phase {
            Phase::Active { answered_at } => ts.saturating_sub(answered_at),
            _ => 0,
        };
        self.emit_at(
            to,
            Event::CallEnded(CallEndedEv {
                call: id.to_string(),
                reason,
                by,
                duration_ms,
            }),
            ts,
        );
    }

    // ----- timers ---------------------------------------------------------------------

    /// Ring time over: a call nobody answered ends `no_answer`; in an active call the
    /// invitees still ringing are marked rejected with reason `no_answer`.
    pub(super) fn ring_expired(&mut self, id: &str) {
        let Some(c) = self.state.calls.get(id) else {
            return;
        };
        match c.phase {
            Phase::Ringing => self.end_call(id, EndReason::NoAnswer, None),
            Phase::Active { .. } => {
                let ringing: Vec<String> = c
                    .invitees
                    .iter()
                    .filter(|(_, s)| **s == Invitee::Ringing)
                    .map(|(u, _)| u.clone())
                    .collect();
                let to = c.audience();
                for u in ringing {
                    self.emit(
                        to.clone(),
                        Event::CallRejected(CallRejectedEv {
                            call: id.to_string(),
                            user: u,
                            reason: Some("no_answer".into()),
                        }),
                    );
                }
            }
            Phase::Ended { .. } => {}
        }
    }

    pub(super) fn time_warning(&mut self, id: &str) {
        let active = self
            .state
            .calls
            .get(id)
            .is_some_and(|c| matches!(c.phase, Phase::Active { .. }));
        if active {
            self.time_warning_now(id, WARNING_S);
        }
    }

    fn time_warning_now(&mut self, id: &str, remaining_s: u64) {
        let Some(c) = self.state.calls.get(id) else {
            return;
        };
        let to = c.audience();
        self.emit(
            to,
            Event::CallTimeWarning(CallTimeWarningEv {
                call: id.to_string(),
                remaining_s,
            }),
        );
    }

    pub(super) fn time_limit(&mut self, id: &str) {
        let end_at = self
            .state
            .calls
            .get(id)
            .and_then(|c| match (c.phase, c.time_limit_s) {
                (Phase::Active { answered_at }, Some(limit)) => Some(answered_at + limit * 1000),
                _ => None,
            });
        let Some(end_at) = end_at else {
            return;
        };
        // Timers follow the monotonic clock, `answered_at` the wall clock: if they
        // disagree by more than a little, wait for the rest.
        let left = end_at.saturating_sub(now_ms());
        if left > 50 {
            self.timers.insert(
                Timer::TimeLimit {
                    call: id.to_string(),
                },
                Duration::from_millis(left),
            );
            return;
        }
        self.end_call(id, EndReason::TimeLimit, None);
    }

    /// The user's last device left: if they are in a live call, they leave it unless a
    /// device comes back within `calls.drop_after_ms`.
    pub(super) fn arm_call_drop(&mut self, user: &str) {
        if self.state.calls.live_calls_of(user).is_empty() {
            return;
        }
        let gen = self.bump_gen();
        self.call_drop_gen.insert(user.to_string(), gen);
        self.timers.insert(
            Timer::CallDrop {
                user: user.to_string(),
                gen,
            },
            self.settings.call_drop_after,
        );
    }

    pub(super) fn call_drop(&mut self, user: &str, gen: u64) {
        if self.call_drop_gen.get(user) != Some(&gen) {
            return;
        }
        self.call_drop_gen.remove(user);
        if self.registry.device_count(user) > 0 {
            return;
        }
        for id in self.state.calls.live_calls_of(user) {
            self.leave(&id, user);
        }
    }

    /// Re-arms the timers of every live call from State (after a restart).
    pub(super) fn arm_calls_after_restart(&mut self) {
        let now = now_ms();
        let live: Vec<Call> = self
            .state
            .calls
            .live
            .iter()
            .filter_map(|id| self.state.calls.get(id).cloned())
            .collect();
        let mut users = std::collections::BTreeSet::new();
        for c in live {
            let ring_left = (c.invited_at + c.ring_ms).saturating_sub(now);
            if c.phase == Phase::Ringing || c.invitees.values().any(|i| *i == Invitee::Ringing) {
                self.timers.insert(
                    Timer::Ring { call: c.id.clone() },
                    Duration::from_millis(ring_left),
                );
            }
            if let (Phase::Active { answered_at }, Some(limit)) = (c.phase, c.time_limit_s) {
                let left = (answered_at + limit * 1000).saturating_sub(now);
                let call = c.id.clone();
                if left > WARNING_S * 1000 {
                    self.timers.insert(
                        Timer::TimeWarning { call: call.clone() },
                        Duration::from_millis(left - WARNING_S * 1000),
                    );
                }
                self.timers
                    .insert(Timer::TimeLimit { call }, Duration::from_millis(left));
            }
            for u in c.participants() {
                if c.is_in(&u) {
                    users.insert(u);
                }
            }
        }
        for u in users {
            self.arm_call_drop(&u);
        }
    }
}
