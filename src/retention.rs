//! Retention: compaction of the oldest events, on the `retention.cron` schedule.
//!
//! A run decides a new floor (the oldest offset the log keeps) from `retention.max_age_s`
//! and `retention.max_bytes`, holds it back so that nothing is deleted that is still needed,
//! asks the sequencer to move the floor (it alone decides, and makes the floor durable
//! before answering), and only then deletes the events below it with their index entries,
//! in batches of `retention.batch` on a blocking thread.
//!
//! The floor never passes:
//! - `checkpoint + 1` of any enabled SQL sink (a sink whose checkpoint is not known yet holds
//!   the floor where it is);
//! - `off + 1` of the oldest kept snapshot, so every kept snapshot can still rebuild State
//!   (with no snapshot at all, the run asks for one first and waits up to
//!   `retention.snapshot_wait_ms`);
//! - the committed head + 1 (the sequencer clamps).
//!
//! A crash between moving the floor and deleting leaves events below the floor on disk;
//! they are never served (hello and `/v1/events` check the floor) and the next run deletes
//! them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::config::RetentionConfig;
use crate::log::{LogError, Store};
use crate::sequencer::{Command, Shared};
use crate::telemetry as m;

/// Events sampled to estimate the bytes one retained event costs.
const SAMPLES: u64 = 64;

/// Why a run could not finish.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the sequencer is gone")]
    SequencerGone,
    #[error("the deletion thread failed: {0}")]
    Join(String),
}

/// What stopped the floor short of what the limits asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// An enabled SQL sink has not checkpointed past it (or its checkpoint is unknown).
    Sink(&'static str),
    /// The oldest kept snapshot needs the events after it.
    Snapshot,
    /// There is no snapshot yet (one was asked for).
    NoSnapshot,
}

/// The outcome of one run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// The floor the limits asked for (`None`: within limits).
    pub wanted: Option<u64>,
    /// The floor in force after the run.
    pub floor: u64,
    /// What held the floor back, if anything.
    pub held: Option<Hold>,
    /// Events deleted by this run.
    pub deleted: u64,
    /// Encoded bytes of the deleted events' values.
    pub deleted_bytes: u64,
}

/// Everything a run needs; cheap to clone.
#[derive(Clone)]
pub struct Retention {
    pub config: RetentionConfig,
    pub store: Store,
    pub shared: Arc<Shared>,
    pub commands: mpsc::Sender<Command>,
    pub snapshot_dir: PathBuf,
    /// Names of the enabled SQL sinks.
    pub sinks: Vec<&'static str>,
}

impl Retention {
    /// One compaction: decide, clamp, move the floor, delete below it.
    pub async fn run(&self) -> Result<Report, RetentionError> {
        let t0 = Instant::now();
        let result = self.run_inner().await;
        metrics::histogram!(m::RETENTION_SECONDS).record(t0.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(r) if r.held.is_some() => "held",
            Ok(r) if r.deleted > 0 || r.wanted.is_some() => "moved",
            Ok(_) => "idle",
            Err(_) => "error",
        };
        metrics::counter!(m::RETENTION_RUNS, "outcome" => outcome).increment(1);
        match &result {
            Ok(r) => tracing::info!(
                floor = r.floor,
                wanted = ?r.wanted,
                held = ?r.held,
                deleted = r.deleted,
                ms = t0.elapsed().as_millis() as u64,
                "retention run"
            ),
            Err(e) => tracing::error!(error = %e, "retention run failed"),
        }
        result
    }

    async fn run_inner(&self) -> Result<Report, RetentionError> {
        let head = *self.shared.head.borrow();
        let floor = self.shared.floor();
        let wanted = self.wanted(floor, head).await?;
        let mut held = None;
        let mut new_floor = floor;
        if let Some(want) = wanted {
            let (limit, why) = self.limit().await?;
            new_floor = want.min(limit);
            if new_floor < want {
                held = why;
            }
            new_floor = self.set_floor(new_floor).await?;
        }
        // Delete whatever lies below the floor in force (this run's, or one a crash left).
        let (deleted, deleted_bytes) = self.delete_below(new_floor).await?;
        Ok(Report {
            wanted,
            floor: new_floor,
            held,
            deleted,
            deleted_bytes,
        })
    }

    /// The floor the limits ask for, if above the current one.
    async fn wanted(&self, floor: u64, head: u64) -> Result<Option<u64>, RetentionError> {
        if head < floor {
            return Ok(None);
        }
        let store = self.store.clone();
        let cfg = self.config.clone();
        let now = crate::sequencer::now_ms();
        let want = tokio::task::spawn_blocking(move || -> Result<u64, LogError> {
            let mut want = floor;
            if cfg.max_age_s > 0 {
                let cutoff = now.saturating_sub(cfg.max_age_s.saturating_mul(1000));
                want = want.max(first_at_or_after(&store, floor, head, cutoff)?);
            }
            if cfg.max_bytes > 0 {
                let per_event = bytes_per_event(&store, floor, head)?;
                if let Some(keep) = cfg.max_bytes.checked_div(per_event) {
                    let count = head + 1 - floor;
                    if count > keep {
                        want = want.max(head + 1 - keep);
                    }
                }
            }
            Ok(want)
        })
        .await
        .map_err(|e| RetentionError::Join(e.to_string()))??;
        Ok((want > floor).then_some(want))
    }

    /// The highest floor allowed now, and what sets it (`None` when only the head does).
    async fn limit(&self) -> Result<(u64, Option<Hold>), RetentionError> {
        let mut limit = u64::MAX;
        let mut why = None;
        for sink in &self.sinks {
            let cp = self.shared.sync_status.get(sink).and_then(|s| s.checkpoint);
            let allowed = cp.map_or(self.shared.floor(), |c| c + 1);
            if allowed < limit {
                limit = allowed;
                why = Some(Hold::Sink(sink));
            }
        }
        let oldest = match self.oldest_snapshot() {
            Some(off) => Some(off),
            None => self.await_snapshot().await,
        };
        match oldest {
            Some(off) if off + 1 < limit => {
                limit = off + 1;
                why = Some(Hold::Snapshot);
            }
            Some(_) => {}
            None => {
                limit = self.shared.floor();
                why = Some(Hold::NoSnapshot);
            }
        }
        Ok((limit, why))
    }

    /// The offset of the oldest snapshot file (by name; start-up falls back to any newer one).
    fn oldest_snapshot(&self) -> Option<u64> {
        crate::snapshot::list(&self.snapshot_dir)
            .first()
            .and_then(|p| crate::snapshot::off_of(p))
    }

    /// Asks for a snapshot and waits for its file.
    async fn await_snapshot(&self) -> Option<u64> {
        if self.commands.send(Command::Snapshot).await.is_err() {
            return None;
        }
        let deadline = Instant::now() + Duration::from_millis(self.config.snapshot_wait_ms);
        loop {
            if let Some(off) = self.oldest_snapshot() {
                return Some(off);
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    wait_ms = self.config.snapshot_wait_ms,
                    "retention: no snapshot appeared; the floor stays"
                );
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn set_floor(&self, floor: u64) -> Result<u64, RetentionError> {
        let (done, rx) = oneshot::channel();
        self.commands
            .send(Command::SetFloor { floor, done })
            .await
            .map_err(|_| RetentionError::SequencerGone)?;
        Ok(rx.await.map_err(|_| RetentionError::SequencerGone)??)
    }

    /// Deletes every event below `floor`, a batch at a time, yielding between batches.
    async fn delete_below(&self, floor: u64) -> Result<(u64, u64), RetentionError> {
        let (mut n, mut bytes) = (0, 0);
        loop {
            let store = self.store.clone();
            let batch = self.config.batch;
            let (k, b) = tokio::task::spawn_blocking(move || store.delete_below(floor, batch))
                .await
                .map_err(|e| RetentionError::Join(e.to_string()))??;
            n += k;
            bytes += b;
            metrics::counter!(m::RETENTION_DELETED).increment(k);
            if k < self.config.batch as u64 {
                return Ok((n, bytes));
            }
            tokio::task::yield_now().await;
        }
    }

    /// Runs on `retention.cron` until `stop`; returns the task.
    pub fn spawn(
        self,
        mut ticks: mpsc::Receiver<()>,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    t = ticks.recv() => {
                        if t.is_none() {
                            return;
                        }
                        let _ = self.run().await;
                    }
                }
            }
        })
    }
}

/// The first offset in `[from, head]` whose timestamp is at or after `cutoff`
/// (`head + 1` when all are older). Timestamps never decrease with the offset, so this is a
/// binary search; offsets missing below the floor are never probed.
fn first_at_or_after(store: &Store, from: u64, head: u64, cutoff: u64) -> Result<u64, LogError> {
    let (mut lo, mut hi) = (from, head + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let ts = match store.get(mid)? {
            Some(r) => r.ts,
            // Missing inside the floor..head range cannot happen in a verified log; treat
            // it as old so the search moves past it.
            None => 0,
        };
        if ts >= cutoff {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// The mean of [`Store::record_bytes`] over up to [`SAMPLES`] events spread evenly over
/// `[from, head]`.
fn bytes_per_event(store: &Store, from: u64, head: u64) -> Result<u64, LogError> {
    let count = head + 1 - from;
    let step = (count / SAMPLES).max(1);
    let (mut sum, mut n) = (0u64, 0u64);
    let mut off = from;
    while off <= head && n < SAMPLES {
        if let Some(b) = store.record_bytes(off)? {
            sum += b;
            n += 1;
        }
        off += step;
    }
    Ok(if n == 0 { 0 } else { sum.div_ceil(n) })
}
