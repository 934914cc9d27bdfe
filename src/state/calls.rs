//! Calls: each call is a state machine (`ringing -> active -> ended`) with a state per
//! invitee (`ringing | busy | accepted(device) | rejected | left`). Only `apply` changes
//! them; the sequencer reads them to validate call operations and to arm timers.

use std::collections::{BTreeMap, HashMap};

use crate::log::event::{EndReason, Event, Media};

/// Where a call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    Ringing,
    /// Since the first accept, at `answered_at` (unix ms).
    Active {
        answered_at: u64,
    },
    Ended {
        reason: EndReason,
    },
}

/// One invitee's state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Invitee {
    Ringing,
    /// Already in another active call when invited; never rang.
    Busy,
    Accepted {
        device: String,
    },
    Rejected,
    Left,
}

/// The initiator is in the call until they leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Initiator {
    In,
    Left,
}

/// One participant's media flags (`call.media` carries all of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MediaFlags {
    pub audio: bool,
    pub video: bool,
    pub hold: bool,
    pub screen: bool,
}

impl MediaFlags {
    pub fn initial(media: Media) -> MediaFlags {
        MediaFlags {
            audio: true,
            video: media == Media::Video,
            hold: false,
            screen: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Call {
    pub id: String,
    pub initiator: String,
    /// The device that sent the invite (signals to the initiator go there once active).
    pub initiator_device: String,
    pub initiator_state: Initiator,
    pub media: Media,
    pub ring_ms: u64,
    pub time_limit_s: Option<u64>,
    /// Unix ms of the invite.
    pub invited_at: u64,
    pub invitees: BTreeMap<String, Invitee>,
    pub phase: Phase,
    pub flags: BTreeMap<String, MediaFlags>,
}

impl Call {
    /// The initiator and every invitee.
    pub fn participants(&self) -> Vec<String> {
        let mut v = Vec::with_capacity(1 + self.invitees.len());
        v.push(self.initiator.clone());
        v.extend(self.invitees.keys().cloned());
        v
    }

    /// Who receives the call's events: every participant but busy invitees (they were
    /// never rung, so they never hear of the call).
    pub fn audience(&self) -> Vec<String> {
        let mut v = Vec::with_capacity(1 + self.invitees.len());
        v.push(self.initiator.clone());
        v.extend(
            self.invitees
                .iter()
                .filter(|(_, s)| **s != Invitee::Busy)
                .map(|(u, _)| u.clone()),
        );
        v
    }

    pub fn is_participant(&self, user: &str) -> bool {
        user == self.initiator || self.invitees.contains_key(user)
    }

    /// Whether `user` is still in the call (ringing or accepted, or the initiator who has
    /// not left).
    pub fn is_in(&self, user: &str) -> bool {
        if user == self.initiator {
            return self.initiator_state == Initiator::In;
        }
        matches!(
            self.invitees.get(user),
            Some(Invitee::Ringing | Invitee::Accepted { .. })
        )
    }

    /// Participants still in the call.
    pub fn remaining(&self) -> usize {
        let mut n = usize::from(self.initiator_state == Initiator::In);
        n += self
            .invitees
            .values()
            .filter(|i| matches!(i, Invitee::Ringing | Invitee::Accepted { .. }))
            .count();
        n
    }

    /// Whether any invitee is still ringing or has accepted.
    pub fn anyone_answering(&self) -> bool {
        self.invitees
            .values()
            .any(|i| matches!(i, Invitee::Ringing | Invitee::Accepted { .. }))
    }

    pub fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended { .. })
    }

    /// The device that receives signals for `user` once the call is active.
    pub fn signal_device(&self, user: &str) -> Option<&str> {
        if !matches!(self.phase, Phase::Active { .. }) {
            return None;
        }
        if user == self.initiator {
            return Some(&self.initiator_device);
        }
        match self.invitees.get(user) {
            Some(Invitee::Accepted { device }) => Some(device),
            _ => None,
        }
    }

    /// Whether `user` is in this call and it is active (a busy signal for new invites).
    fn holds(&self, user: &str) -> bool {
        if !matches!(self.phase, Phase::Active { .. }) {
            return false;
        }
        if user == self.initiator {
            return self.initiator_state == Initiator::In;
        }
        matches!(self.invitees.get(user), Some(Invitee::Accepted { .. }))
    }
}

/// Every call, and who is in an active one.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Calls {
    pub by_id: HashMap<String, Call>,
    /// user -> the active call they are in.
    pub active: HashMap<String, String>,
    /// Calls not ended yet.
    pub live: std::collections::BTreeSet<String>,
}

impl Calls {
    pub fn get(&self, id: &str) -> Option<&Call> {
        self.by_id.get(id)
    }

    /// Live calls `user` is still in.
    pub fn live_calls_of(&self, user: &str) -> Vec<String> {
        self.live
            .iter()
            .filter(|id| self.by_id.get(*id).is_some_and(|c| c.is_in(user)))
            .cloned()
            .collect()
    }

    /// The active call `user` is in, if any.
    pub fn busy(&self, user: &str) -> Option<&str> {
        self.active.get(user).map(String::as_str)
    }

    /// Applies a call event (other events are ignored).
    pub fn apply(&mut self, ts: u64, event: &Event) {
        let id = match event {
            Event::CallInvite(e) => {
                let mut flags = BTreeMap::new();
                flags.insert(e.from.clone(), MediaFlags::initial(e.media));
                self.by_id.insert(
                    e.call.clone(),
                    Call {
                        id: e.call.clone(),
                        initiator: e.from.clone(),
                        initiator_device: e.device.clone(),
                        initiator_state: Initiator::In,
                        media: e.media,
                        ring_ms: e.ring_ms,
                        time_limit_s: e.time_limit_s,
                        invited_at: ts,
                        invitees: e.to.iter().map(|u| (u.clone(), Invitee::Ringing)).collect(),
                        phase: Phase::Ringing,
                        flags,
                    },
                );
                self.live.insert(e.call.clone());
                &e.call
            }
            Event::CallBusy(e) => {
                self.set_invitee(&e.call, &e.user, Invitee::Busy);
                &e.call
            }
            Event::CallAccepted(e) => {
                if let Some(c) = self.by_id.get_mut(&e.call) {
                    c.invitees.insert(
                        e.user.clone(),
                        Invitee::Accepted {
                            device: e.device.clone(),
                        },
                    );
                    c.flags.insert(e.user.clone(), MediaFlags::initial(c.media));
                    if c.phase == Phase::Ringing {
                        c.phase = Phase::Active { answered_at: ts };
                    }
                }
                &e.call
            }
            Event::CallRejected(e) => {
                self.set_invitee(&e.call, &e.user, Invitee::Rejected);
                &e.call
            }
            Event::CallLeft(e) => {
                if let Some(c) = self.by_id.get_mut(&e.call) {
                    if e.user == c.initiator {
                        c.initiator_state = Initiator::Left;
                    } else if c.invitees.contains_key(&e.user) {
                        c.invitees.insert(e.user.clone(), Invitee::Left);
                    }
                }
                &e.call
            }
            Event::CallMedia(e) => {
                if let Some(c) = self.by_id.get_mut(&e.call) {
                    c.flags.insert(
                        e.user.clone(),
                        MediaFlags {
                            audio: e.audio,
                            video: e.video,
                            hold: e.hold,
                            screen: e.screen,
                        },
                    );
                }
                &e.call
            }
            Event::CallEnded(e) => {
                if let Some(c) = self.by_id.get_mut(&e.call) {
                    c.phase = Phase::Ended { reason: e.reason };
                }
                self.live.remove(&e.call);
                &e.call
            }
            _ => return,
        };
        let id = id.clone();
        self.reindex(&id);
    }

    fn set_invitee(&mut self, call: &str, user: &str, state: Invitee) {
        if let Some(c) = self.by_id.get_mut(call) {
            if let Some(i) = c.invitees.get_mut(user) {
                *i = state;
            }
        }
    }

    /// Recomputes the `active` entries of one call's participants.
    fn reindex(&mut self, id: &str) {
        let Some(c) = self.by_id.get(id) else {
            return;
        };
        for user in c.participants() {
            if c.holds(&user) {
                self.active.insert(user, id.to_string());
            } else if self.active.get(&user).map(String::as_str) == Some(id) {
                self.active.remove(&user);
            }
        }
    }
}
