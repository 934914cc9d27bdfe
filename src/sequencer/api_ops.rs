//! Backend API commands: rooms, publishing as a user, notices, contacts, disconnects and
//! the read-only queries that need State or the session registry.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::{ApiCmd, ApiReply, ApiResult, Sequencer};
use crate::log::event::{
    ContactsEv, Event, MemberChange, NoticeEv, RoomCreatedEv, RoomMemberEv, TokensRevokedEv,
};
use crate::protocol::frames::Platform;
use crate::protocol::{CloseCode, ProtoError};
use crate::state::{ConvId, ConvKind};

fn ok(body: Value) -> ApiResult {
    Ok(ApiReply { status: 200, body })
}

impl Sequencer {
    pub(super) async fn api(&mut self, cmd: ApiCmd, tx: oneshot::Sender<ApiResult>) {
        if matches!(cmd, ApiCmd::History { .. }) {
            self.commit().await;
        }
        let mut live_of = None;
        let result = match cmd {
            ApiCmd::CreateRoom { id, name, members } => self.create_room(id, name, members),
            ApiCmd::AddMember { room, user } => self.member(room, user, MemberChange::Joined),
            ApiCmd::RemoveMember { room, user } => self.member(room, user, MemberChange::Left),
            ApiCmd::Publish {
                room,
                from,
                body,
                cid,
            } => {
                let conv = ConvId::Room(room);
                match self.state.check_member(&conv, &from) {
                    Err(false) => Err(ProtoError::not_found(format!("no such room {conv}"))),
                    Err(true) => Err(ProtoError::forbidden(format!(
                        "{from} is not a member of {conv}"
                    ))),
                    Ok(()) => self
                        .publish(&conv, &from, None, cid, body)
                        .map(|body| ApiReply { status: 200, body }),
                }
            }
            ApiCmd::Notice { user, kind, data } => {
                let (idx, off, ts) = self.emit(vec![user], Event::Notice(NoticeEv { kind, data }));
                live_of = Some(idx);
                ok(json!({"off": off, "ts": ts}))
            }
            ApiCmd::SetContacts { user, mut contacts } => {
                contacts.sort();
                contacts.dedup();
                contacts.retain(|c| c != &user);
                self.emit(
                    vec![],
                    Event::Contacts(ContactsEv {
                        user: user.clone(),
                        contacts: contacts.clone(),
                    }),
                );
                ok(json!({"user": user, "contacts": contacts}))
            }
            ApiCmd::Disconnect { user, reason } => {
                // Durable first: the tokens issued so far stay refused after a restart.
                self.emit(
                    vec![],
                    Event::TokensRevoked(TokensRevokedEv {
                        user: user.clone(),
                        reason,
                    }),
                );
                let ids: Vec<u64> = self.registry.of_user(&user).map(|h| h.id).collect();
                for id in &ids {
                    if let Some(h) = self.registry.get(*id) {
                        h.ctl.close_with(CloseCode::Kicked);
                    }
                    self.drop_session(*id);
                }
                ok(json!({"user": user, "closed": ids.len()}))
            }
            ApiCmd::Presence { user } => ok(self.presence_of(&user)),
            ApiCmd::Room { room } => self.room_info(room),
            ApiCmd::Connections => {
                let mut by_platform: BTreeMap<&str, usize> =
                    Platform::ALL.iter().map(|p| (p.as_str(), 0)).collect();
                for h in self.registry.all() {
                    *by_platform.entry(h.platform.as_str()).or_default() += 1;
                }
                ok(json!({
                    "total": self.registry.len(),
                    "users": self.registry.users(),
                    "by_platform": by_platform,
                }))
            }
            ApiCmd::History {
                conv,
                before,
                limit,
            } => match ConvId::parse(&conv) {
                Err(e) => Err(e),
                Ok(c) => {
                    if let (ConvId::Room(_), Err(false)) = (&c, self.state.check_member(&c, "")) {
                        Err(ProtoError::not_found(format!("no such room {c}")))
                    } else {
                        self.history_page(&c, before, limit)
                            .map(|body| ApiReply { status: 200, body })
                    }
                }
            },
            ApiCmd::Stats => ok(json!({
                "head": self.committed_head,
                "floor": self.floor,
                "events": (self.committed_head + 1).saturating_sub(self.floor),
                "log_bytes": self.store.size_on_disk(),
                "connections": self.registry.len(),
                "users_online": self.registry.users(),
                "conversations": self.state.convs.len(),
                "users_known": self.state.users.len(),
                "sequencer_queue": self.rx.len(),
                "timers": self.timers.len(),
                "push_tokens": self.state.push.len(),
                "push_queue": self.shared.push_queue.load(std::sync::atomic::Ordering::Relaxed),
                "push_dead": self.shared.push_dead.load(std::sync::atomic::Ordering::Relaxed),
                "sync": self.shared.sync_status.to_json(self.committed_head),
            })),
        };
        self.answer_api(tx, result, live_of);
    }

    fn create_room(&mut self, id: String, name: String, members: Vec<String>) -> ApiResult {
        let conv = ConvId::Room(id.clone());
        let conv_s = conv.to_string();
        if self.state.convs.contains_key(&conv_s) {
            return Err(ProtoError::conflict(format!("room {id} exists")));
        }
        let mut members = members;
        members.sort();
        members.dedup();
        if members.len() > self.settings.max_room_members {
            return Err(ProtoError::bad_request(format!(
                "{} members; limits.max_room_members is {}",
                members.len(),
                self.settings.max_room_members
            )));
        }
        let (_, off, _) = self.emit(
            vec![],
            Event::RoomCreated(RoomCreatedEv {
                room: id.clone(),
                conv: conv_s.clone(),
                name: name.clone(),
                members: members.clone(),
            }),
        );
        // Each initial member gets their own `joined` (protocol rule 22), not everyone's:
        // addressing all M of them to all M members made creation O(M^2) in index entries
        // (a million for a room of 1,000). The roster is in `room.created` and `GET /v1/rooms/{id}`.
        for user in &members {
            self.emit(
                vec![user.clone()],
                Event::RoomMember(RoomMemberEv {
                    room: id.clone(),
                    conv: conv_s.clone(),
                    user: user.clone(),
                    change: MemberChange::Joined,
                }),
            );
        }
        Ok(ApiReply {
            status: 201,
            body: json!({"id": id, "conv": conv_s, "name": name, "members": members, "off": off}),
        })
    }

    fn room_info(&self, room: String) -> ApiResult {
        let conv = ConvId::Room(room.clone()).to_string();
        match self.state.convs.get(&conv).map(|c| &c.kind) {
            Some(ConvKind::Room { name, members, .. }) => ok(json!({
                "id": room,
                "conv": conv,
                "name": name,
                "members": members,
            })),
            _ => Err(ProtoError::not_found(format!("no such room {conv}"))),
        }
    }

    fn member(&mut self, room: String, user: String, change: MemberChange) -> ApiResult {
        let conv = ConvId::Room(room.clone());
        let is_member = match self.state.check_member(&conv, &user) {
            Err(false) => return Err(ProtoError::not_found(format!("no such room {conv}"))),
            Err(true) => false,
            Ok(()) => true,
        };
        let changed = match change {
            MemberChange::Joined => !is_member,
            MemberChange::Left => is_member,
        };
        if !changed {
            return ok(json!({"room": room, "user": user, "changed": false}));
        }
        let mut to = self.state.members_of(&conv);
        if change == MemberChange::Joined && to.len() >= self.settings.max_room_members {
            return Err(ProtoError::conflict(format!(
                "{conv} is full: limits.max_room_members is {}",
                self.settings.max_room_members
            )));
        }
        if change == MemberChange::Joined {
            to.push(user.clone());
        }
        let (_, off, _) = self.emit(
            to,
            Event::RoomMember(RoomMemberEv {
                room: room.clone(),
                conv: conv.to_string(),
                user: user.clone(),
                change,
            }),
        );
        ok(json!({"room": room, "user": user, "changed": true, "off": off}))
    }

    /// The trusted view of a user's presence (true status, devices with platforms).
    fn presence_of(&self, user: &str) -> Value {
        let own = self
            .state
            .user(user)
            .map(|u| u.presence.own)
            .unwrap_or_default();
        let devices: Vec<Value> = self
            .registry
            .of_user(user)
            .map(|h| json!({"device": h.device, "platform": h.platform}))
            .collect();
        let status = if devices.is_empty() && own.devices == 0 {
            crate::log::event::Status::Offline
        } else {
            own.status
        };
        let last_seen = if devices.is_empty() {
            self.last_disconnect.get(user).copied().or(own.last_seen)
        } else {
            Some(super::now_ms())
        };
        json!({"user": user, "status": status, "devices": devices, "last_seen": last_seen})
    }
}
