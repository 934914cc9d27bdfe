//! Offline push: what devices are owed (`job`), the durable outbox and the worker that
//! sends it (`worker`), and the providers behind the `provider` seam.

pub mod apns;
pub mod fcm;
pub mod job;
pub mod provider;
pub mod providers;
pub mod worker;
