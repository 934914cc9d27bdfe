//! Push tokens: each device's token per provider, and who owns each token (a token that
//! shows up under another user or device moves there: the phone changed hands).

use std::collections::{BTreeMap, HashMap};

use crate::log::event::{PushTokenEv, PushTokenRemovedEv};
use crate::push::provider::ProviderKind;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenEntry {
    pub token: String,
    pub app: Option<String>,
    /// Unix ms of the registration (APNs 410 `timestamp` is compared with it).
    pub registered_at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PushTokens {
    /// user -> (device, provider) -> token.
    by_user: HashMap<String, BTreeMap<(String, ProviderKind), TokenEntry>>,
    /// (provider, token) -> (user, device).
    owners: HashMap<(ProviderKind, String), (String, String)>,
}

impl PushTokens {
    /// Tokens of `user`'s devices.
    pub fn of_user(
        &self,
        user: &str,
    ) -> impl Iterator<Item = (&(String, ProviderKind), &TokenEntry)> {
        self.by_user.get(user).into_iter().flatten()
    }

    /// The token `device` of `user` has for `provider`.
    pub fn get(&self, user: &str, device: &str, provider: ProviderKind) -> Option<&TokenEntry> {
        self.by_user
            .get(user)
            .and_then(|m| m.get(&(device.to_string(), provider)))
    }

    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    pub fn register(&mut self, ts: u64, e: &PushTokenEv) {
        let key = (e.provider, e.token.clone());
        if let Some((u, d)) = self.owners.remove(&key) {
            self.drop_entry(&u, &d, e.provider);
        }
        self.drop_entry(&e.user, &e.device, e.provider);
        self.by_user.entry(e.user.clone()).or_default().insert(
            (e.device.clone(), e.provider),
            TokenEntry {
                token: e.token.clone(),
                app: e.app.clone(),
                registered_at: ts,
            },
        );
        self.owners.insert(key, (e.user.clone(), e.device.clone()));
    }

    pub fn remove(&mut self, e: &PushTokenRemovedEv) {
        if self
            .get(&e.user, &e.device, e.provider)
            .is_some_and(|t| t.token == e.token)
        {
            self.drop_entry(&e.user, &e.device, e.provider);
        }
    }

    fn drop_entry(&mut self, user: &str, device: &str, provider: ProviderKind) {
        let Some(m) = self.by_user.get_mut(user) else {
            return;
        };
        if let Some(old) = m.remove(&(device.to_string(), provider)) {
            self.owners.remove(&(provider, old.token));
        }
        if m.is_empty() {
            self.by_user.remove(user);
        }
    }
}
