//! Conversations: members, the gapless `seq`, and each member's receipts and unread count.

use std::collections::{BTreeSet, HashMap};

/// A member's marks in one conversation.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Marks {
    pub read: u64,
    pub delivered: u64,
    /// Messages from others with `seq > read`.
    pub unread: u64,
    /// Seqs of the member's own messages above `read` (they never count as unread).
    pub own_above_read: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ConvKind {
    Dm {
        a: String,
        b: String,
    },
    Room {
        id: String,
        name: String,
        members: BTreeSet<String>,
    },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Conversation {
    pub kind: ConvKind,
    /// Seq of the newest message (0: none yet).
    pub last_seq: u64,
    /// Offset of the newest message.
    pub last_msg: Option<u64>,
    /// Offset that orders conversations by activity (newest message or creation).
    pub activity: u64,
    pub marks: HashMap<String, Marks>,
}

impl Conversation {
    pub fn new_dm(a: String, b: String) -> Conversation {
        Conversation {
            kind: ConvKind::Dm { a, b },
            last_seq: 0,
            last_msg: None,
            activity: 0,
            marks: HashMap::new(),
        }
    }

    pub fn new_room(id: String, name: String, created_off: u64) -> Conversation {
        Conversation {
            kind: ConvKind::Room {
                id,
                name,
                members: BTreeSet::new(),
            },
            last_seq: 0,
            last_msg: None,
            activity: created_off,
            marks: HashMap::new(),
        }
    }

    pub fn members(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match &self.kind {
            ConvKind::Dm { a, b } if a == b => Box::new(std::iter::once(a.as_str())),
            ConvKind::Dm { a, b } => Box::new([a.as_str(), b.as_str()].into_iter()),
            ConvKind::Room { members, .. } => Box::new(members.iter().map(String::as_str)),
        }
    }

    pub fn is_member(&self, user: &str) -> bool {
        match &self.kind {
            ConvKind::Dm { a, b } => a == user || b == user,
            ConvKind::Room { members, .. } => members.contains(user),
        }
    }

    pub fn marks_mut(&mut self, user: &str) -> &mut Marks {
        self.marks.entry(user.to_string()).or_default()
    }

    /// A message `seq` from `from` at offset `off`.
    pub fn on_message(&mut self, seq: u64, from: &str, off: u64) {
        self.last_seq = seq;
        self.last_msg = Some(off);
        self.activity = off;
        let members: Vec<String> = self.members().map(str::to_string).collect();
        for m in members {
            let marks = self.marks_mut(&m);
            if m == from {
                marks.own_above_read.push(seq);
            } else {
                marks.unread += 1;
            }
        }
    }

    /// `user` has read up to `seq` (monotonic; callers clamp to `last_seq`).
    pub fn mark_read(&mut self, user: &str, seq: u64) {
        let last = self.last_seq;
        let marks = self.marks_mut(user);
        if seq <= marks.read {
            return;
        }
        marks.read = seq;
        marks.own_above_read.retain(|s| *s > seq);
        marks.unread = last
            .saturating_sub(seq)
            .saturating_sub(marks.own_above_read.len() as u64);
    }
}
