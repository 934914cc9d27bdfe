//! Presence decisions: compare the devices connected now and the chosen status with the
//! views State last published, and emit `presence` events when they differ. The last
//! device leaving starts a grace timer instead; only its expiry (without a reconnect)
//! publishes `offline`. After a restart every user State shows online gets such a timer.

use serde_json::{json, Value};

use super::{now_ms, Sequencer, Timer};
use crate::log::event::{Event, PresenceEv, PresenceScope};
use crate::protocol::frames::ChosenStatus;
use crate::state::{presence_views, View};

impl Sequencer {
    /// Re-evaluates `user`'s presence after their devices changed.
    pub(super) fn presence_refresh(&mut self, user: &str) {
        let devices = self.registry.device_count(user);
        let ps = self
            .state
            .user(user)
            .map(|u| u.presence)
            .unwrap_or_default();
        if devices == 0 {
            if ps.own.devices > 0 || ps.public.devices > 0 {
                let gen = self.bump_gen();
                self.grace.insert(user.to_string(), gen);
                self.timers.insert(
                    Timer::PresenceGrace {
                        user: user.to_string(),
                        gen,
                    },
                    self.settings.grace,
                );
            }
            return;
        }
        // Back within the grace period: the pending timer (if any) is void.
        self.grace.remove(user);
        self.publish_presence(user, ps.chosen, devices);
    }

    /// The user chose a status.
    pub(super) fn presence_set(&mut self, user: &str, chosen: ChosenStatus) {
        let devices = self.registry.device_count(user);
        self.publish_presence(user, chosen, devices);
    }

    pub(super) fn presence_grace_expired(&mut self, user: &str, gen: u64) {
        if self.grace.get(user) != Some(&gen) {
            return;
        }
        self.grace.remove(user);
        if self.registry.device_count(user) > 0 {
            return;
        }
        let chosen = self.state.chosen(user);
        self.publish_presence(user, chosen, 0);
    }

    fn publish_presence(&mut self, user: &str, chosen: ChosenStatus, devices: u32) {
        let ps = self
            .state
            .user(user)
            .map(|u| u.presence)
            .unwrap_or_default();
        let last_seen = if devices > 0 {
            Some(now_ms())
        } else {
            self.last_disconnect.get(user).copied().or(ps.own.last_seen)
        };
        let (public, own) = presence_views(chosen, devices, last_seen);
        let pub_changed = public.differs(&ps.public);
        let own_changed = own.differs(&ps.own) || (chosen != ps.chosen && devices > 0);
        if !pub_changed && !own_changed {
            return;
        }
        let audience: Vec<String> = self.state.audience(user).into_iter().collect();
        let event = |view: View, scope| {
            Event::Presence(PresenceEv {
                user: user.to_string(),
                status: view.status,
                devices: view.devices,
                last_seen: view.last_seen,
                scope,
            })
        };
        if pub_changed && own_changed && !public.differs(&own) {
            let mut to = audience;
            to.push(user.to_string());
            self.emit(to, event(own, None));
            return;
        }
        if pub_changed {
            self.emit(audience, event(public, Some(PresenceScope::Public)));
        }
        if own_changed {
            self.emit(vec![user.to_string()], event(own, Some(PresenceScope::Own)));
        }
    }

    /// The scheduled sweep: sessions whose socket is gone (their queue is closed) or that
    /// have been silent past `stale_after` are ended; users State shows online with no
    /// device and no pending grace timer are published offline. Returns (sessions, users).
    pub(super) fn sweep(&mut self) -> (usize, usize) {
        let now = crate::clock::mono_ms();
        let stale_ms = self.settings.stale_after.as_millis() as u64;
        let stale: Vec<u64> = self
            .registry
            .all()
            .filter(|h| {
                h.ctl.outbox.is_closed()
                    || now.saturating_sub(
                        h.ctl
                            .last_heard_ms
                            .load(std::sync::atomic::Ordering::Relaxed),
                    ) > stale_ms
            })
            .map(|h| h.id)
            .collect();
        for id in &stale {
            if let Some(h) = self.registry.get(*id) {
                h.ctl.close_with(crate::protocol::CloseCode::GoingAway);
            }
            tracing::warn!(session = id, "sweep ended a leftover session");
            self.drop_session(*id);
        }
        let leftover: Vec<String> = self
            .state
            .users
            .iter()
            .filter(|(id, u)| {
                (u.presence.own.devices > 0 || u.presence.public.devices > 0)
                    && self.registry.device_count(id) == 0
                    && !self.grace.contains_key(*id)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for user in &leftover {
            tracing::warn!(user = %user, "sweep turned a leftover presence offline");
            let chosen = self.state.chosen(user);
            self.publish_presence(user, chosen, 0);
        }
        metrics::counter!(crate::telemetry::SWEEP_REMOVED, "kind" => "session")
            .increment(stale.len() as u64);
        metrics::counter!(crate::telemetry::SWEEP_REMOVED, "kind" => "presence")
            .increment(leftover.len() as u64);
        (stale.len(), leftover.len())
    }

    /// Users State shows with devices get a grace timer: offline unless they come back.
    pub(super) fn arm_presence_after_restart(&mut self) {
        let online: Vec<String> = self
            .state
            .users
            .iter()
            .filter(|(_, u)| u.presence.own.devices > 0 || u.presence.public.devices > 0)
            .map(|(id, _)| id.clone())
            .collect();
        for user in online {
            self.presence_refresh(&user);
        }
    }

    /// `presence.snapshot` entries: every user `user` can see, offline ones included.
    pub(super) fn snapshot(&self, user: &str) -> Vec<Value> {
        let now = now_ms();
        self.state
            .audience(user)
            .into_iter()
            .map(|other| {
                let v = self
                    .state
                    .user(&other)
                    .map(|u| u.presence.public)
                    .unwrap_or_default();
                // `last_seen` is now while the user is online (rule 13).
                let last_seen = if v.devices > 0 { Some(now) } else { v.last_seen };
                json!({"user": other, "status": v.status, "devices": v.devices, "last_seen": last_seen})
            })
            .collect()
    }
}
