//! Unit tests of `State::apply`: deterministic projections of hand-made records.

use super::*;
use crate::log::event::{ContactsEv, MessageEv, ReceiptEv, RoomCreatedEv, RoomMemberEv};
use serde_json::json;

fn rec(off: u64, event: Event) -> Record {
    Record {
        off,
        ts: off * 10,
        to: vec![],
        event,
    }
}

fn msg(off: u64, conv: &str, seq: u64, from: &str) -> Record {
    rec(
        off,
        Event::Message(MessageEv {
            conv: conv.into(),
            seq,
            from: from.into(),
            device: None,
            cid: None,
            body: json!(null),
        }),
    )
}

fn read(off: u64, conv: &str, user: &str, seq: u64) -> Record {
    rec(
        off,
        Event::Receipt(ReceiptEv {
            conv: conv.into(),
            user: user.into(),
            kind: ReceiptKind::Read,
            seq,
        }),
    )
}

#[test]
fn unread_counts_only_messages_from_others_above_the_read_receipt() {
    let mut s = State::new();
    s.apply(&msg(1, "dm:a:b", 1, "b"));
    s.apply(&msg(2, "dm:a:b", 2, "a"));
    s.apply(&msg(3, "dm:a:b", 3, "b"));
    assert_eq!(s.unread("a"), (2, vec![("dm:a:b".to_string(), 2)]));
    assert_eq!(s.unread("b"), (1, vec![("dm:a:b".to_string(), 1)]));
    s.apply(&read(4, "dm:a:b", "a", 1));
    assert_eq!(s.unread("a").0, 1);
    s.apply(&read(5, "dm:a:b", "a", 3));
    assert_eq!(s.unread("a").0, 0);
    s.apply(&read(6, "dm:a:b", "b", 2));
    assert_eq!(s.unread("b").0, 0, "seq 3 is b's own message");
}

#[test]
fn conversations_are_ordered_by_newest_activity() {
    let mut s = State::new();
    s.apply(&msg(1, "dm:a:b", 1, "b"));
    s.apply(&msg(2, "dm:a:c", 1, "c"));
    s.apply(&msg(3, "dm:a:b", 2, "a"));
    let order: Vec<&str> = s.users["a"].convs.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(order, vec!["dm:a:b", "dm:a:c"]);
}

#[test]
fn room_membership_follows_member_events() {
    let mut s = State::new();
    s.apply(&rec(
        1,
        Event::RoomCreated(RoomCreatedEv {
            room: "ops".into(),
            conv: "room:ops".into(),
            name: "Ops".into(),
            members: vec!["a".into()],
        }),
    ));
    let member = |off, user: &str, change| {
        rec(
            off,
            Event::RoomMember(RoomMemberEv {
                room: "ops".into(),
                conv: "room:ops".into(),
                user: user.into(),
                change,
            }),
        )
    };
    s.apply(&member(2, "a", MemberChange::Joined));
    s.apply(&member(3, "b", MemberChange::Joined));
    let room = ConvId::Room("ops".into());
    assert_eq!(s.check_member(&room, "b"), Ok(()));
    assert_eq!(s.check_member(&room, "c"), Err(true));
    assert_eq!(
        s.check_member(&ConvId::Room("nope".into()), "a"),
        Err(false)
    );
    s.apply(&member(4, "b", MemberChange::Left));
    assert_eq!(s.check_member(&room, "b"), Err(true));
    assert!(s.users["b"].convs.is_empty());
    assert_eq!(s.audience("a"), BTreeSet::new());
}

#[test]
fn contacts_are_symmetric_in_the_audience() {
    let mut s = State::new();
    s.apply(&rec(
        1,
        Event::Contacts(ContactsEv {
            user: "a".into(),
            contacts: vec!["b".into()],
        }),
    ));
    assert!(s.audience("a").contains("b"));
    assert!(s.audience("b").contains("a"));
    s.apply(&rec(
        2,
        Event::Contacts(ContactsEv {
            user: "a".into(),
            contacts: vec![],
        }),
    ));
    assert!(s.audience("b").is_empty());
}

#[test]
fn replaying_the_same_records_gives_the_same_state() {
    let records = vec![
        msg(1, "dm:a:b", 1, "b"),
        msg(2, "dm:a:b", 2, "a"),
        read(3, "dm:a:b", "a", 2),
    ];
    let mut x = State::new();
    let mut y = State::new();
    for r in &records {
        x.apply(r);
    }
    for r in &records {
        y.apply(r);
    }
    assert_eq!(x, y);
}
