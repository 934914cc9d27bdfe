//! Push tokens and owed pushes, seen from the sequencer: registering and unregistering
//! tokens (durable events), pruning tokens the providers refuse, creating outbox jobs for
//! offline devices as events are appended, and cancelling them when a device says hello.

use serde_json::{json, Value};

use super::Sequencer;
use crate::log::event::{Event, PushTokenEv, PushTokenRemovedEv, Record};
use crate::log::keys;
use crate::protocol::frames::{PushRegisterOp, PushUnregisterOp};
use crate::protocol::ProtoError;
use crate::push::job::{jobs_for, Job};
use crate::push::provider::{redact, ProviderKind};

impl Sequencer {
    pub(super) fn push_register(
        &mut self,
        user: &str,
        device: &str,
        op: PushRegisterOp,
    ) -> Result<Value, ProtoError> {
        if let Some(app) = &op.app {
            if !self
                .settings
                .push_apps
                .contains(&(op.provider, app.clone()))
            {
                return Err(ProtoError::bad_request(format!(
                    "no {} app named `{app}` is configured",
                    op.provider.as_str()
                )));
            }
        }
        let current = self.state.push.get(user, device, op.provider);
        let same = current.is_some_and(|t| t.token == op.token && t.app == op.app);
        if !same {
            self.emit(
                vec![],
                Event::PushToken(PushTokenEv {
                    user: user.to_string(),
                    device: device.to_string(),
                    provider: op.provider,
                    token: op.token,
                    app: op.app.clone(),
                }),
            );
        }
        Ok(json!({"provider": op.provider, "app": op.app}))
    }

    pub(super) fn push_unregister(
        &mut self,
        user: &str,
        device: &str,
        op: PushUnregisterOp,
    ) -> Result<Value, ProtoError> {
        let Some(entry) = self.state.push.get(user, device, op.provider) else {
            return Ok(json!({"provider": op.provider, "removed": false}));
        };
        if op.token.as_ref().is_some_and(|t| *t != entry.token) {
            return Ok(json!({"provider": op.provider, "removed": false}));
        }
        let token = entry.token.clone();
        self.remove_token(user, device, op.provider, token, "unregistered");
        Ok(json!({"provider": op.provider, "removed": true}))
    }

    /// The worker found a token dead. Pruned unless the device registered it again after
    /// `newer_than` (APNs 410 `timestamp`).
    pub(super) fn push_token_dead(
        &mut self,
        user: &str,
        device: &str,
        provider: ProviderKind,
        token: String,
        reason: String,
        newer_than: Option<u64>,
    ) {
        let Some(entry) = self.state.push.get(user, device, provider) else {
            return;
        };
        if entry.token != token || newer_than.is_some_and(|t| entry.registered_at > t) {
            return;
        }
        tracing::info!(user, device, provider = provider.as_str(), token = %redact(&token), reason = %reason, "pruning a dead push token");
        self.remove_token(user, device, provider, token, &reason);
    }

    fn remove_token(
        &mut self,
        user: &str,
        device: &str,
        provider: ProviderKind,
        token: String,
        reason: &str,
    ) {
        self.cancel_jobs(user, device, Some((provider, token.as_str())));
        self.emit(
            vec![],
            Event::PushTokenRemoved(PushTokenRemovedEv {
                user: user.to_string(),
                device: device.to_string(),
                provider,
                token,
                reason: reason.to_string(),
            }),
        );
    }

    /// Removes a device's owed pushes (those to one token, or all).
    pub(super) fn cancel_jobs(
        &mut self,
        user: &str,
        device: &str,
        only: Option<(ProviderKind, &str)>,
    ) {
        let prefix = keys::outbox_device(user, device);
        let result = match only {
            None => self.store.remove_prefix(&prefix).map(|_| ()),
            Some((provider, token)) => {
                let doomed: Vec<Vec<u8>> = self
                    .store
                    .scan_prefix(&prefix)
                    .filter_map(Result::ok)
                    .filter(|(_, v)| {
                        Job::decode(v).is_some_and(|j| j.provider == provider && j.token == token)
                    })
                    .map(|(k, _)| k)
                    .collect();
                doomed
                    .iter()
                    .try_for_each(|k| self.store.remove_raw(k, None))
            }
        };
        if let Err(e) = result {
            tracing::warn!(user, device, error = %e, "could not cancel owed pushes");
        }
    }

    /// A session ended before its queue reached the socket: the events after `written`
    /// addressed to it (messages, notices, invites) are owed to that device as pushes.
    pub(super) fn owe_unwritten(&mut self, user: &str, device: &str, written: u64) {
        if !self.settings.push_jobs.enabled || written >= self.committed_head {
            return;
        }
        if self.state.push.of_user(user).all(|((d, _), _)| d != device) {
            return;
        }
        let mut jobs = Vec::new();
        for off in self.store.inbox(user, written, self.committed_head) {
            let Ok(Some(r)) = off.and_then(|o| self.store.get(o)) else {
                continue;
            };
            let mut owed = jobs_for(
                &r,
                &self.state.push,
                |u, d| !(u == user && d == device),
                &self.settings.push_jobs,
            );
            for j in &mut owed {
                // Distinct from the jobs made at append time (low 15 bits).
                j.id = (j.off << 16) | 0x8000 | (rand::random::<u16>() as u64 & 0x7fff);
            }
            jobs.extend(owed);
        }
        for j in jobs {
            if let Err(e) = self.store.put_raw(&j.key(), &j.encode()) {
                tracing::warn!(user, device, error = %e, "owed push could not be recorded");
                continue;
            }
            if let Some(tx) = &self.push_tx {
                let _ = tx.try_send((j.key(), j.due_ms));
            }
        }
    }

    /// Outbox jobs owed by a record just emitted (offline devices with tokens).
    pub(super) fn owe_pushes(&mut self, record: &Record) {
        if !matches!(
            record.event,
            Event::Message(_) | Event::Notice(_) | Event::CallInvite(_)
        ) {
            return;
        }
        let registry = &self.registry;
        let jobs = jobs_for(
            record,
            &self.state.push,
            |u, d| registry.of_user(u).any(|h| &*h.device == d),
            &self.settings.push_jobs,
        );
        self.pending_jobs.extend(jobs);
    }
}
