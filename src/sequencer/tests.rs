//! Sequencer unit tests driven without sockets: the sweep's view of leftovers.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::*;
use crate::fanout::{SessionCtl, SessionHandle};
use crate::log::event::{PresenceEv, Status};
use crate::protocol::frames::Platform;

fn sequencer(dir: &std::path::Path) -> Sequencer {
    let store = Store::open(dir, Durability::Flush, 5).unwrap();
    let (_tx, rx) = mpsc::channel(8);
    Sequencer::new(
        Settings::from_config(&Config::embedded()),
        store,
        State::new(),
        rx,
        Arc::new(Shared::new(0)),
    )
}

fn handle(id: u64, user: &str) -> (SessionHandle, Arc<SessionCtl>) {
    let ctl = Arc::new(SessionCtl::new(8));
    let h = SessionHandle {
        id,
        user: user.into(),
        device: format!("d{id}"),
        platform: Platform::Web,
        codec: Codec::Json,
        ctl: ctl.clone(),
    };
    h.ctl.last_heard_ms.store(
        crate::clock::mono_ms(),
        std::sync::atomic::Ordering::Relaxed,
    );
    (h, ctl)
}

#[tokio::test]
async fn sweep_ends_a_session_whose_socket_is_gone_and_keeps_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sequencer(dir.path());
    let (gone, rx_gone) = handle(1, "alice");
    let (live, _rx_live) = handle(2, "bob");
    s.registry.insert(gone);
    s.registry.insert(live);
    rx_gone.outbox.close();
    assert_eq!(s.sweep(), (1, 0));
    assert!(s.registry.get(1).is_none());
    assert!(s.registry.get(2).is_some());
}

#[tokio::test]
async fn sweep_ends_a_silent_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sequencer(dir.path());
    let (h, _rx) = handle(1, "alice");
    h.ctl
        .last_heard_ms
        .store(0, std::sync::atomic::Ordering::Relaxed);
    // Silent for longer than stale_after on the monotonic clock.
    s.settings.stale_after = std::time::Duration::from_millis(1);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let ctl = h.ctl.clone();
    s.registry.insert(h);
    assert_eq!(s.sweep(), (1, 0));
    assert_eq!(
        ctl.close_code(),
        crate::protocol::CloseCode::GoingAway.code()
    );
}

#[tokio::test]
async fn sweep_turns_offline_a_user_left_online_without_device_or_timer() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = sequencer(dir.path());
    s.emit(
        vec!["alice".into()],
        Event::Presence(PresenceEv {
            user: "alice".into(),
            status: Status::Online,
            devices: 1,
            last_seen: Some(1),
            scope: None,
        }),
    );
    s.commit().await;
    // With its grace timer pending the entry is not a leftover...
    s.presence_refresh("alice");
    assert_eq!(s.sweep(), (0, 0));
    // ...once the timer is lost, it is.
    s.presence_gen.clear();
    assert_eq!(s.sweep(), (0, 1));
    s.commit().await;
    let p = s.state.user("alice").unwrap().presence;
    assert_eq!((p.public.status, p.public.devices), (Status::Offline, 0));
    assert_eq!(s.sweep(), (0, 0), "nothing left over after the sweep");
}
