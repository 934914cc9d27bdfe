//! Sequencer unit tests driven without sockets: the sweep's view of leftovers and the
//! heartbeat's decisions.

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
        device: format!("d{id}").into(),
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
    s.grace.clear();
    assert_eq!(s.sweep(), (0, 1));
    s.commit().await;
    let p = s.state.user("alice").unwrap().presence;
    assert_eq!((p.public.status, p.public.devices), (Status::Offline, 0));
    assert_eq!(s.sweep(), (0, 0), "nothing left over after the sweep");
}

#[tokio::test]
async fn heartbeat_closes_an_expired_session_and_pings_a_live_one_once_an_interval() {
    use crate::fanout::Next;
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let mut s = sequencer(dir.path());
    let slots = s.settings.heartbeat.slots;
    assert!(
        slots > 1,
        "the embedded interval spreads pings over several ticks"
    );
    let (expired, rx_expired) = handle(1, "alice");
    let (fresh, rx_fresh) = handle(3, "carol");
    expired.ctl.token_exp.store(now_ms() / 1000 - 1, Relaxed);
    fresh.ctl.token_exp.store(now_ms() / 1000 + 3_600, Relaxed);
    s.registry.insert(expired);
    s.registry.insert(fresh);
    let mut pings = 0;
    for _ in 0..slots {
        rx_fresh
            .last_heard_ms
            .store(crate::clock::mono_ms(), Relaxed);
        s.heartbeat_tick();
        while let Some(item) = rx_fresh.outbox.try_pop() {
            assert!(matches!(item, Outbound::Ping), "{item:?}");
            pings += 1;
        }
    }
    assert_eq!(pings, 1, "one ping per interval");
    assert_eq!(rx_fresh.close_code(), 0);
    assert!(matches!(rx_expired.next(true).await, Next::Close(4001)));
    assert!(
        rx_expired.outbox.is_empty(),
        "an expired session is not pinged"
    );
}
