//! The event log: the one source of truth. `event` defines every durable event and its
//! stored record; `store` keeps records and their indices in sled; `keys` encodes the keys;
//! `check` and `watermark` let start-up refuse a damaged or shortened log.

pub mod check;
pub mod event;
pub mod keys;
pub mod store;
pub mod watermark;

pub use event::{Event, Record};
pub use store::{LogError, Store};
