//! The scenario logic of the end-to-end load generator (`benches/load.rs`), kept apart from
//! its command line so that `tests/load_smoke.rs` can run every scenario against an
//! in-process broker (`#[path = "../benches/load/mod.rs"] mod load;`).
//!
//! - [`client`]: the public protocol over real sockets: tokens, upgrade, `hello`, frames.
//! - [`stats`]: HDR latency histograms and their percentile summaries.
//! - [`procfs`]: the broker's RSS and CPU time from `/proc`, and finding it by its port.
//! - [`report`]: the human table and the one-line JSON of a run.
//! - [`scenarios`]: `chat`, `fanout`, `resume`, `idle` and `max`.

#![allow(dead_code)]

pub mod client;
pub mod procfs;
pub mod report;
pub mod scenarios;
pub mod stats;
