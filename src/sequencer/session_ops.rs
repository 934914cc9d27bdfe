//! Session commands: hello (register and decide the replay), goodbye, and every client
//! operation past hello (messaging, receipts, typing, reads, presence).

use serde_json::{json, Value};

use super::{now_ms, AnswerTo, HelloCmd, Sequencer, Timer};
use crate::fanout::{Outbound, SessionId, SessionStart};
use crate::log::event::{ContactsEv, Event, MessageEv, ReceiptEv};
use crate::protocol::frames::{
    ConversationsOp, HistoryOp, ReceiptKind, ReceiptOp, SendOp, TypingOp,
};
use crate::protocol::{ClientOp, CloseCode, ProtoError};
use crate::state::{ConvId, ConvKind};
use crate::telemetry as m;

impl Sequencer {
    pub(super) async fn hello(&mut self, cmd: HelloCmd) {
        self.commit().await;
        let HelloCmd {
            handle,
            reply_id,
            since,
            contacts,
            iat,
            done,
        } = cmd;
        if self.draining {
            let _ = done.send(Err(ProtoError::unavailable("the broker is shutting down")));
            return;
        }
        if self.registry.len() >= self.settings.max_connections {
            let _ = done.send(Err(ProtoError::unavailable(
                "the broker is at limits.max_connections; retry later",
            )));
            return;
        }
        if let Err(e) = self.hello_admissible(&handle.user, &handle.device, iat) {
            let _ = done.send(Err(e));
            return;
        }
        let head = self.committed_head;
        let user = handle.user.to_string();
        // Replay decision (protocol section 3).
        let (resumed, reset, reason, replay) = match since {
            None => (false, false, None, None),
            Some(s) if s > head => (false, true, Some("unknown_offset"), None),
            // Events after `since` were compacted away (the floor is the oldest kept).
            Some(s) if s.saturating_add(1) < self.floor => (false, true, Some("expired"), None),
            Some(s) => {
                let cap = self.settings.max_replay_events;
                match self
                    .store
                    .count_inbox(&user, s, head, cap.saturating_add(1))
                {
                    Ok(n) if n > cap => (false, true, Some("over_limit"), None),
                    Ok(_) => (true, false, None, Some((s, head))),
                    Err(e) => {
                        let _ = done.send(Err(super::unavailable(&e)));
                        return;
                    }
                }
            }
        };
        // The same device connecting again replaces its old socket.
        let stale: Vec<SessionId> = self
            .registry
            .of_user(&user)
            .filter(|h| h.device == handle.device)
            .map(|h| h.id)
            .collect();
        for id in stale {
            if let Some(old) = self.registry.remove(id) {
                old.ctl.close_with(CloseCode::ShuttingDown);
            }
        }
        // Contacts from the token claim.
        if let Some(mut list) = contacts {
            list.sort();
            list.dedup();
            list.retain(|c| c != &user);
            let current: Vec<String> = self
                .state
                .user(&user)
                .map(|u| u.contacts.iter().cloned().collect())
                .unwrap_or_default();
            if current != list {
                self.emit(
                    vec![],
                    Event::Contacts(ContactsEv {
                        user: user.clone(),
                        contacts: list,
                    }),
                );
            }
        }
        let mut reply = json!({
            "user": user,
            "device": handle.device,
            "session": format!("{:016x}", handle.id),
            "head": head,
            "resumed": resumed,
            "reset": reset,
        });
        if let (Some(reason), Value::Object(map)) = (reason, &mut reply) {
            map.insert("reason".into(), Value::from(reason));
        }
        let codec = handle.codec;
        let snapshot = json!({"ev": "presence.snapshot", "users": self.snapshot(&user)});
        let start = (|| {
            Some(SessionStart {
                reply: super::encode_reply(codec, reply_id, &Ok(reply))?,
                replay,
                user: user.clone(),
                device: handle.device.to_string(),
                head,
                sync: codec.encode(&json!({"ev": "sync", "head": head})).ok()?,
                snapshot: codec.encode(&snapshot).ok()?,
            })
        })();
        let Some(start) = start else {
            let _ = done.send(Err(ProtoError::new(
                crate::protocol::ErrorCode::Internal,
                "could not encode the session start",
            )));
            return;
        };
        // Until the writer says otherwise, the device has what the replay gives it.
        handle
            .ctl
            .written_off
            .store(head, std::sync::atomic::Ordering::Relaxed);
        if handle
            .ctl
            .outbox
            .push(Outbound::Start(Box::new(start)))
            .is_err()
        {
            let _ = done.send(Err(ProtoError::unavailable("session queue unavailable")));
            return;
        }
        tracing::debug!(session = handle.id, user = %user, device = %handle.device, resumed, "session started");
        // The device is here: what it was owed it now gets itself.
        self.cancel_jobs(&user, &handle.device, None);
        self.registry.insert(handle);
        self.connections_changed();
        let _ = done.send(Ok(()));
        self.presence_refresh(&user);
    }

    /// Per-user admission at hello: a token issued before a backend disconnect is refused
    /// (`unauthorized`), and so is a further device past `limits.max_devices_per_user`
    /// (`busy`; the same device reconnecting replaces its old socket and is not counted).
    fn hello_admissible(
        &self,
        user: &str,
        device: &str,
        iat: Option<u64>,
    ) -> Result<(), ProtoError> {
        self.token_admissible(user, iat)?;
        let mut others: Vec<&str> = self
            .registry
            .of_user(user)
            .map(|h| &*h.device)
            .filter(|d| *d != device)
            .collect();
        others.sort_unstable();
        others.dedup();
        if others.len() >= self.settings.max_devices_per_user {
            return Err(ProtoError::new(
                crate::protocol::ErrorCode::Busy,
                format!(
                    "{user} has {} devices online, the most limits.max_devices_per_user allows",
                    others.len()
                ),
            ));
        }
        Ok(())
    }

    /// A token issued before a backend disconnect of `user` is refused.
    fn token_admissible(&self, user: &str, iat: Option<u64>) -> Result<(), ProtoError> {
        if let Some(revoked_ms) = self.state.user(user).and_then(|u| u.tokens_revoked_ms) {
            // `iat` has whole seconds: a token of the disconnect's own second still passes.
            if iat.is_none_or(|iat| iat < revoked_ms / 1000) {
                return Err(ProtoError::unauthorized(
                    "the token was issued before the backend disconnected this user",
                ));
            }
        }
        Ok(())
    }

    /// A `refresh` with a verified token for the session's user: the session's expiry
    /// moves to the new token's, unless that token is revoked.
    pub(super) fn refresh(
        &mut self,
        session: SessionId,
        id: Option<u32>,
        exp: u64,
        iat: Option<u64>,
    ) {
        let Some(h) = self.registry.get(session) else {
            return;
        };
        let result = self.token_admissible(&h.user, iat).map(|()| {
            h.ctl
                .token_exp
                .store(exp, std::sync::atomic::Ordering::Relaxed);
            json!({ "exp": exp })
        });
        self.answer(
            AnswerTo::Session {
                id: session,
                re: id,
            },
            result,
            None,
        );
    }

    /// Removes a session (socket gone, kicked or too slow) and updates presence.
    pub(super) fn drop_session(&mut self, id: SessionId) {
        let Some(h) = self.registry.remove(id) else {
            return;
        };
        tracing::debug!(session = id, user = %h.user, device = %h.device, "session ended");
        self.connections_changed();
        self.last_disconnect.insert(h.user.to_string(), now_ms());
        let written = h.ctl.written_off.load(std::sync::atomic::Ordering::Relaxed);
        self.owe_unwritten(&h.user, &h.device, written);
        if !self.draining {
            self.presence_refresh(&h.user);
            if self.registry.device_count(&h.user) == 0 {
                self.arm_call_drop(&h.user);
            }
        }
    }

    fn connections_changed(&self) {
        let n = self.registry.len();
        self.shared
            .connections
            .store(n, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!(m::CONNECTIONS).set(n as f64);
    }

    pub(super) async fn op(&mut self, session: SessionId, id: Option<u32>, op: ClientOp) {
        let Some(h) = self.registry.get(session) else {
            return;
        };
        let (user, device) = (h.user.clone(), h.device.clone());
        if matches!(op, ClientOp::History(_)) {
            // History reads the store: everything before it must be there.
            self.commit().await;
        }
        let to = AnswerTo::Session {
            id: session,
            re: id,
        };
        let result = match op {
            ClientOp::Send(s) => self.op_send(&user, &device, s),
            ClientOp::Receipt(r) => self.op_receipt(&user, r),
            ClientOp::Typing(t) => self.op_typing(&user, t),
            ClientOp::History(hq) => self.op_history(&user, hq),
            ClientOp::Conversations(c) => self.op_conversations(&user, c),
            ClientOp::Unread {} => Ok(self.unread(&user)),
            ClientOp::Presence(p) => {
                self.presence_set(&user, p.status);
                Ok(json!({"status": p.status}))
            }
            op @ (ClientOp::CallInvite(_)
            | ClientOp::CallAccept(_)
            | ClientOp::CallReject(_)
            | ClientOp::CallSignal(_)
            | ClientOp::CallMedia(_)
            | ClientOp::CallNetwork(_)
            | ClientOp::CallLeave(_)
            | ClientOp::CallEnd(_)) => self.call_op(&user, &device, op),
            ClientOp::PushRegister(p) => self.push_register(&user, &device, p),
            ClientOp::PushUnregister(p) => self.push_unregister(&user, &device, p),
            ClientOp::Hello(_) => Err(ProtoError::conflict("this session already said hello")),
            ClientOp::Refresh(_) => {
                Err(ProtoError::bad_request("refresh is handled by the session"))
            }
        };
        self.answer(to, result, None);
    }

    /// Membership as an error: `not_found` for a missing room, `forbidden` otherwise.
    pub(super) fn require_member(&self, conv: &ConvId, user: &str) -> Result<(), ProtoError> {
        self.state.check_member(conv, user).map_err(|exists| {
            if exists {
                ProtoError::forbidden(format!("{user} is not a member of {conv}"))
            } else {
                ProtoError::not_found(format!("no such conversation {conv}"))
            }
        })
    }

    fn op_send(&mut self, user: &str, device: &str, s: SendOp) -> Result<Value, ProtoError> {
        let conv = match (&s.to, &s.conv) {
            (Some(to), _) => ConvId::dm(user, to),
            (None, Some(c)) => ConvId::parse(c)?,
            (None, None) => return Err(ProtoError::bad_request("`send` needs `to` or `conv`")),
        };
        self.require_member(&conv, user)?;
        self.publish(&conv, user, Some(device), Some(s.cid), s.body)
    }

    /// Appends a message (or finds its duplicate) and returns the `send` reply.
    pub(super) fn publish(
        &mut self,
        conv: &ConvId,
        from: &str,
        device: Option<&str>,
        cid: Option<String>,
        body: Value,
    ) -> Result<Value, ProtoError> {
        if let Some(cid) = &cid {
            let known = match self.pending_dedupe.get(&(from.to_string(), cid.clone())) {
                Some(off) => Some(*off),
                None => self
                    .store
                    .dedupe(from, cid)
                    .map_err(|e| super::unavailable(&e))?,
            };
            if let Some(off) = known {
                if let Some(r) = self.record(off).map_err(|e| super::unavailable(&e))? {
                    if let Event::Message(m) = &r.event {
                        metrics::counter!(m::DUPLICATES).increment(1);
                        return Ok(
                            json!({"off": r.off, "conv": m.conv, "seq": m.seq, "ts": r.ts, "dup": true}),
                        );
                    }
                }
            }
        }
        let conv_s = conv.to_string();
        let seq = self
            .state
            .convs
            .get(&conv_s)
            .map(|c| c.last_seq)
            .unwrap_or(0)
            + 1;
        let to = self.state.members_of(conv);
        let (_, off, ts) = self.emit(
            to,
            Event::Message(MessageEv {
                conv: conv_s.clone(),
                seq,
                from: from.to_string(),
                device: device.map(str::to_string),
                cid: cid.clone(),
                body,
            }),
        );
        if let Some(cid) = cid {
            self.pending_dedupe.insert((from.to_string(), cid), off);
        }
        Ok(json!({"off": off, "conv": conv_s, "seq": seq, "ts": ts, "dup": false}))
    }

    fn op_receipt(&mut self, user: &str, r: ReceiptOp) -> Result<Value, ProtoError> {
        let conv = ConvId::parse(&r.conv)?;
        self.require_member(&conv, user)?;
        let conv_s = conv.to_string();
        let (last, recorded) = match self.state.convs.get(&conv_s) {
            Some(c) => {
                let marks = c.marks.get(user);
                let recorded = match r.kind {
                    ReceiptKind::Read => marks.map(|m| m.read),
                    ReceiptKind::Delivered => marks.map(|m| m.delivered),
                };
                (c.last_seq, recorded.unwrap_or(0))
            }
            None => (0, 0),
        };
        let seq = r.seq.min(last);
        if seq <= recorded {
            return Ok(json!({"conv": conv_s, "kind": r.kind, "seq": recorded}));
        }
        let to = self.state.members_of(&conv);
        self.emit(
            to,
            Event::Receipt(ReceiptEv {
                conv: conv_s.clone(),
                user: user.to_string(),
                kind: r.kind,
                seq,
            }),
        );
        Ok(json!({"conv": conv_s, "kind": r.kind, "seq": seq}))
    }

    fn op_typing(&mut self, user: &str, t: TypingOp) -> Result<Value, ProtoError> {
        let conv = ConvId::parse(&t.conv)?;
        self.require_member(&conv, user)?;
        let conv_s = conv.to_string();
        let key = (conv_s.clone(), user.to_string());
        if t.on {
            let gen = self.bump_gen();
            self.typing.insert(key, gen);
            self.timers.insert(
                Timer::TypingExpire {
                    conv: conv_s.clone(),
                    user: user.to_string(),
                    gen,
                },
                self.settings.typing_expire,
            );
        } else {
            self.typing.remove(&key);
        }
        self.typing_frame(&conv, user, t.on);
        Ok(json!({}))
    }

    fn typing_frame(&mut self, conv: &ConvId, user: &str, on: bool) {
        let others: Vec<String> = self
            .state
            .members_of(conv)
            .into_iter()
            .filter(|m| m != user)
            .collect();
        self.ephemeral(
            others,
            json!({"ev": "typing", "conv": conv.to_string(), "user": user, "on": on}),
        );
    }

    pub(super) fn typing_expired(&mut self, conv: String, user: String, gen: u64) {
        let key = (conv, user);
        if self.typing.get(&key) != Some(&gen) {
            return;
        }
        self.typing.remove(&key);
        if let Ok(c) = ConvId::parse(&key.0) {
            self.typing_frame(&c, &key.1, false);
        }
    }

    /// Messages of a conversation, oldest first (shared by `history` and the HTTP API).
    pub(super) fn history_page(
        &self,
        conv: &ConvId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Value, ProtoError> {
        let (records, more) = self
            .store
            .history(&conv.to_string(), before, limit)
            .map_err(|e| super::unavailable(&e))?;
        let messages: Vec<Value> = records
            .iter()
            .filter_map(|r| serde_json::to_value(r.wire()).ok())
            .collect();
        Ok(json!({"messages": messages, "more": more}))
    }

    fn op_history(&mut self, user: &str, h: HistoryOp) -> Result<Value, ProtoError> {
        let conv = ConvId::parse(&h.conv)?;
        self.require_member(&conv, user)?;
        self.history_page(&conv, h.before, h.limit.unwrap_or(50) as usize)
    }

    fn op_conversations(&mut self, user: &str, c: ConversationsOp) -> Result<Value, ProtoError> {
        let limit = c.limit.unwrap_or(50) as usize;
        let after: Option<u64> = match &c.cursor {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| ProtoError::bad_request("`cursor` is not one this broker gave"))?,
            ),
        };
        let Some(us) = self.state.user(user) else {
            return Ok(json!({"items": [], "cursor": null}));
        };
        let mut items = Vec::new();
        let mut cursor = Value::Null;
        let mut rows = us
            .convs
            .iter()
            .filter(|(act, _)| after.is_none_or(|a| act.0 < a))
            .peekable();
        while let Some((act, id)) = rows.next() {
            let Some(conv) = self.state.convs.get(id) else {
                continue;
            };
            let last = match conv.last_msg {
                Some(off) => self
                    .record(off)
                    .map_err(|e| super::unavailable(&e))?
                    .and_then(|r| serde_json::to_value(r.wire()).ok())
                    .unwrap_or(Value::Null),
                None => Value::Null,
            };
            let marks = conv.marks.get(user);
            let mut item = json!({
                "conv": id,
                "last": last,
                "unread": marks.map(|m| m.unread).unwrap_or(0),
                "read_seq": marks.map(|m| m.read).unwrap_or(0),
            });
            if let Value::Object(map) = &mut item {
                match &conv.kind {
                    ConvKind::Dm { a, b } => {
                        map.insert("kind".into(), "dm".into());
                        let peer = if a == user { b } else { a };
                        map.insert("peer".into(), peer.clone().into());
                    }
                    ConvKind::Room { id, name, .. } => {
                        map.insert("kind".into(), "room".into());
                        map.insert("name".into(), name.clone().into());
                        map.insert("room".into(), id.clone().into());
                    }
                }
            }
            items.push(item);
            if items.len() == limit {
                if rows.peek().is_some() {
                    cursor = Value::from(act.0.to_string());
                }
                break;
            }
        }
        Ok(json!({"items": items, "cursor": cursor}))
    }

    fn unread(&self, user: &str) -> Value {
        let (total, convs) = self.state.unread(user);
        let map: serde_json::Map<String, Value> = convs
            .into_iter()
            .map(|(c, n)| (c, Value::from(n)))
            .collect();
        json!({"total": total, "convs": map})
    }
}
