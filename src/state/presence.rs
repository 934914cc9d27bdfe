//! Presence as State knows it: the status the user chose and the two views last published
//! (what the audience sees, and what the user's own devices see; they differ only while
//! the user is invisible). Which devices are connected right now is runtime knowledge of
//! the fan-out; the sequencer compares it with these views to decide on new events.

use crate::log::event::Status;
use crate::protocol::frames::ChosenStatus;

/// One published view of a user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct View {
    pub status: Status,
    pub devices: u32,
    pub last_seen: Option<u64>,
}

impl Default for View {
    fn default() -> Self {
        View {
            status: Status::Offline,
            devices: 0,
            last_seen: None,
        }
    }
}

impl View {
    /// Whether two views differ in what triggers an event (status or device count).
    pub fn differs(&self, other: &View) -> bool {
        self.status != other.status || self.devices != other.devices
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct PresenceState {
    pub chosen: ChosenStatus,
    pub public: View,
    pub own: View,
}

/// The chosen status a published status implies (`offline` implies none).
pub fn chosen_of(status: Status) -> Option<ChosenStatus> {
    match status {
        Status::Online => Some(ChosenStatus::Online),
        Status::Away => Some(ChosenStatus::Away),
        Status::Busy => Some(ChosenStatus::Busy),
        Status::Invisible => Some(ChosenStatus::Invisible),
        Status::Offline => None,
    }
}

/// The views that `chosen` and `devices` connected devices produce.
pub fn views(chosen: ChosenStatus, devices: u32, last_seen: Option<u64>) -> (View, View) {
    let own_status = if devices == 0 {
        Status::Offline
    } else {
        match chosen {
            ChosenStatus::Online => Status::Online,
            ChosenStatus::Away => Status::Away,
            ChosenStatus::Busy => Status::Busy,
            ChosenStatus::Invisible => Status::Invisible,
        }
    };
    let own = View {
        status: own_status,
        devices,
        last_seen,
    };
    let public = if chosen == ChosenStatus::Invisible {
        View {
            status: Status::Offline,
            devices: 0,
            last_seen,
        }
    } else {
        own
    };
    (public, own)
}
