//! Owed pushes. When the sequencer appends a message, notice or call invite, every
//! recipient device with a push token and no live session is owed a [`Job`]; the jobs go
//! into the outbox in the same sled batch as the event, so a restart loses none.
//!
//! Outbox layout: `keys::outbox(user, device, job id)` -> msgpack(Job); the job id is
//! `off << 16 | n`, unique and ordered like the events. A device that says hello has its
//! outbox prefix removed: it is getting the events itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::provider::{ProviderKind, PushMessage};
use crate::log::event::{Event, Record};
use crate::log::keys;
use crate::state::PushTokens;

/// What the push is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Message,
    Notice,
    Call,
}

/// One push owed to one device token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub user: String,
    pub device: String,
    pub provider: ProviderKind,
    pub token: String,
    pub app: Option<String>,
    pub off: u64,
    pub kind: JobKind,
    pub title: Option<String>,
    pub body: Option<String>,
    pub data: BTreeMap<String, String>,
    pub urgent: bool,
    pub expires_at_ms: Option<u64>,
    /// When to try next (unix ms).
    pub due_ms: u64,
    /// Give up after this (unix ms).
    pub deadline_ms: u64,
    pub attempts: u32,
}

/// A push given up on, kept for operators (`GET /v1/push/dead`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadJob {
    pub job: Job,
    pub reason: String,
    pub at_ms: u64,
}

/// How jobs are made (from `[push]`).
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub enabled: bool,
    pub delay_ms: u64,
    pub deadline_ms: u64,
    pub preview: bool,
    pub preview_max_chars: usize,
}

impl Job {
    pub fn key(&self) -> Vec<u8> {
        keys::outbox(&self.user, &self.device, self.id)
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Job> {
        rmp_serde::from_slice(bytes).ok()
    }

    /// The push to send.
    pub fn message(&self) -> PushMessage {
        PushMessage {
            provider: self.provider,
            app: self.app.clone(),
            token: self.token.clone(),
            title: self.title.clone(),
            body: self.body.clone(),
            data: self.data.clone(),
            collapse_id: format!("sb-{}", self.off),
            urgent: self.urgent,
            expires_at_ms: self.expires_at_ms,
        }
    }
}

impl DeadJob {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }
    pub fn decode(bytes: &[u8]) -> Option<DeadJob> {
        rmp_serde::from_slice(bytes).ok()
    }
}

/// Cuts `s` to at most `max` characters, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The text of a message body, if it has one (`"text"` or a string body).
fn text_of(body: &Value) -> Option<&str> {
    match body {
        Value::String(s) => Some(s),
        Value::Object(m) => m.get("text").and_then(Value::as_str),
        _ => None,
    }
}

/// What a record's pushes look like, before they are split per device.
struct Shape<'a> {
    kind: JobKind,
    /// The author, who is never pushed their own event.
    skip_user: Option<&'a str>,
    title: Option<String>,
    body: Option<String>,
    data: BTreeMap<String, String>,
    urgent: bool,
    expires: Option<u64>,
    recipients: Vec<&'a String>,
}

fn shape_of<'a>(r: &'a Record, s: &JobSettings) -> Option<Shape<'a>> {
    Some(match &r.event {
        Event::Message(m) => {
            let (title, body) = if s.preview {
                (
                    Some(truncate(&m.from, s.preview_max_chars)),
                    Some(truncate(
                        text_of(&m.body).unwrap_or("New message"),
                        s.preview_max_chars,
                    )),
                )
            } else {
                (Some("New message".into()), None)
            };
            Shape {
                kind: JobKind::Message,
                skip_user: Some(m.from.as_str()),
                title,
                body,
                data: BTreeMap::from([
                    ("type".to_string(), "message".to_string()),
                    ("conv".to_string(), m.conv.clone()),
                    ("seq".to_string(), m.seq.to_string()),
                ]),
                urgent: false,
                expires: None,
                recipients: r.to.iter().collect(),
            }
        }
        Event::Notice(n) => Shape {
            kind: JobKind::Notice,
            skip_user: None,
            title: Some("Notice".into()),
            body: s.preview.then(|| truncate(&n.kind, s.preview_max_chars)),
            data: BTreeMap::from([
                ("type".to_string(), "notice".to_string()),
                ("notice".to_string(), n.kind.clone()),
            ]),
            urgent: false,
            expires: None,
            recipients: r.to.iter().collect(),
        },
        Event::CallInvite(c) => {
            let media = match c.media {
                crate::log::event::Media::Audio => "audio",
                crate::log::event::Media::Video => "video",
            };
            Shape {
                kind: JobKind::Call,
                skip_user: Some(c.from.as_str()),
                title: None,
                body: None,
                data: BTreeMap::from([
                    ("type".to_string(), "call".to_string()),
                    ("call".to_string(), c.call.clone()),
                    ("from".to_string(), c.from.clone()),
                    ("media".to_string(), media.to_string()),
                ]),
                urgent: true,
                expires: Some(r.ts + c.ring_ms),
                recipients: r.to.iter().filter(|u| **u != c.from).collect(),
            }
        }
        _ => return None,
    })
}

/// The jobs a record owes: for each recipient device with a token and no live session.
/// `live(user, device)` tells whether a device has a session now.
pub fn jobs_for(
    r: &Record,
    tokens: &PushTokens,
    live: impl Fn(&str, &str) -> bool,
    s: &JobSettings,
) -> Vec<Job> {
    if !s.enabled {
        return Vec::new();
    }
    let Some(shape) = shape_of(r, s) else {
        return Vec::new();
    };
    let Shape {
        kind,
        skip_user,
        title,
        body,
        mut data,
        urgent,
        expires,
        recipients,
    } = shape;
    data.insert("off".into(), r.off.to_string());
    let (due_ms, deadline_ms) = match kind {
        // A ring does not wait: the push goes now and expires with the ring.
        JobKind::Call => (r.ts, expires.unwrap_or(r.ts)),
        _ => (r.ts + s.delay_ms, r.ts + s.deadline_ms),
    };
    let mut jobs = Vec::new();
    for user in recipients {
        if Some(user.as_str()) == skip_user {
            continue;
        }
        // One push per device: calls prefer VoIP, then FCM, then an APNs alert.
        let mut per_device: BTreeMap<&str, (ProviderKind, &crate::state::TokenEntry)> =
            BTreeMap::new();
        for ((device, provider), entry) in tokens.of_user(user) {
            let rank = |p: ProviderKind| match (kind, p) {
                (JobKind::Call, ProviderKind::ApnsVoip) => 0,
                (JobKind::Call, ProviderKind::Fcm) => 1,
                (JobKind::Call, ProviderKind::Apns) => 2,
                (_, ProviderKind::ApnsVoip) => 9,
                (_, ProviderKind::Fcm) => 0,
                (_, ProviderKind::Apns) => 1,
            };
            if rank(*provider) == 9 {
                continue;
            }
            match per_device.get(device.as_str()) {
                Some((p, _)) if rank(*p) <= rank(*provider) => {}
                _ => {
                    per_device.insert(device.as_str(), (*provider, entry));
                }
            }
        }
        for (device, (provider, entry)) in per_device {
            if live(user, device) {
                continue;
            }
            let n = jobs.len() as u64;
            jobs.push(Job {
                id: (r.off << 16) | (n & 0xffff),
                user: user.clone(),
                device: device.to_string(),
                provider,
                token: entry.token.clone(),
                app: entry.app.clone(),
                off: r.off,
                kind,
                title: title.clone(),
                body: body.clone(),
                data: data.clone(),
                urgent,
                expires_at_ms: expires,
                due_ms,
                deadline_ms,
                attempts: 0,
            });
        }
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::event::{MessageEv, PushTokenEv};
    use serde_json::json;

    fn settings() -> JobSettings {
        JobSettings {
            enabled: true,
            delay_ms: 5000,
            deadline_ms: 86_400_000,
            preview: true,
            preview_max_chars: 10,
        }
    }

    fn tokens() -> PushTokens {
        let mut t = PushTokens::default();
        for (user, device, provider, token) in [
            ("bob", "phone", ProviderKind::Fcm, "tok-bob-fcm"),
            ("bob", "tablet", ProviderKind::Apns, "tok-bob-apns"),
            ("alice", "phone", ProviderKind::Fcm, "tok-alice"),
        ] {
            t.register(
                1,
                &PushTokenEv {
                    user: user.into(),
                    device: device.into(),
                    provider,
                    token: token.into(),
                    app: None,
                },
            );
        }
        t
    }

    fn message() -> Record {
        Record {
            off: 7,
            ts: 1000,
            to: vec!["alice".into(), "bob".into()],
            event: Event::Message(MessageEv {
                conv: "dm:alice:bob".into(),
                seq: 3,
                from: "alice".into(),
                device: Some("laptop".into()),
                cid: None,
                body: json!({"text": "a rather long message"}),
            }),
        }
    }

    #[test]
    fn offline_devices_of_recipients_are_owed_but_not_the_senders() {
        let jobs = jobs_for(&message(), &tokens(), |_, d| d == "tablet", &settings());
        assert_eq!(jobs.len(), 1);
        let j = &jobs[0];
        assert_eq!(
            (j.user.as_str(), j.device.as_str(), j.provider),
            ("bob", "phone", ProviderKind::Fcm)
        );
        assert_eq!(j.due_ms, 6000);
        assert_eq!(j.body.as_deref(), Some("a rather …"));
        assert_eq!(j.data["conv"], "dm:alice:bob");
        assert_eq!(j.data["off"], "7");
        assert_eq!(j.message().collapse_id, "sb-7");
    }

    #[test]
    fn no_preview_hides_the_text() {
        let s = JobSettings {
            preview: false,
            ..settings()
        };
        let jobs = jobs_for(&message(), &tokens(), |_, _| false, &s);
        assert!(jobs
            .iter()
            .all(|j| j.body.is_none() && j.title.as_deref() == Some("New message")));
        assert_eq!(jobs.len(), 2);
    }

    #[test]
    fn a_job_round_trips() {
        let j = jobs_for(&message(), &tokens(), |_, _| false, &settings()).remove(0);
        assert_eq!(Job::decode(&j.encode()), Some(j));
    }
}
