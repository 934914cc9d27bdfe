//! Scheduled jobs (tokio-cron-scheduler): each job only submits a command to the
//! sequencer, which decides what the time means: the leftover sweep
//! (`presence.sweep_cron`) and snapshots (`snapshot.cron`); the compaction tick
//! (`retention.cron`) goes to the retention worker instead, which asks the sequencer to move
//! the floor.

use tokio::sync::mpsc;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use crate::config::Config;
use crate::sequencer::Command;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("config key {key}: {reason}")]
    Schedule { key: &'static str, reason: String },
    #[error("scheduler: {0}")]
    Scheduler(#[from] JobSchedulerError),
}

/// The running scheduler.
pub struct Scheduler {
    inner: JobScheduler,
}

impl Scheduler {
    pub async fn start(
        config: &Config,
        commands: mpsc::Sender<Command>,
        retention: Option<mpsc::Sender<()>>,
    ) -> Result<Scheduler, SchedulerError> {
        let inner = JobScheduler::new().await?;
        let sweep_cron = &config.presence.sweep_cron;
        inner
            .add(tick_job(
                "presence.sweep_cron",
                sweep_cron,
                commands.clone(),
                || Command::Sweep,
            )?)
            .await?;
        if !config.snapshot.cron.is_empty() {
            inner
                .add(tick_job(
                    "snapshot.cron",
                    &config.snapshot.cron,
                    commands,
                    || Command::Snapshot,
                )?)
                .await?;
        }
        if let Some(tx) = retention {
            inner
                .add(tick_job(
                    "retention.cron",
                    &config.retention.cron,
                    tx,
                    || (),
                )?)
                .await?;
        }
        inner.start().await?;
        Ok(Scheduler { inner })
    }

    pub async fn stop(mut self) {
        if let Err(e) = self.inner.shutdown().await {
            tracing::warn!(error = %e, "scheduler shutdown failed");
        }
    }
}

/// A job that, on each tick of `cron` (the value of config key `key`), puts `make()` on
/// `tx`. A full queue means the receiver is busy (or still running the last tick): this tick
/// is skipped and the next one does the work.
fn tick_job<T: Send + 'static>(
    key: &'static str,
    cron: &str,
    tx: mpsc::Sender<T>,
    make: fn() -> T,
) -> Result<Job, SchedulerError> {
    Job::new_async(cron, move |_, _| {
        let tx = tx.clone();
        Box::pin(async move {
            if tx.try_send(make()).is_err() {
                tracing::debug!(job = key, "tick skipped: queue full");
            }
        })
    })
    .map_err(|e| SchedulerError::Schedule {
        key,
        reason: format!("`{cron}` is not a cron schedule (sec min hour day month weekday): {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bad_schedule_is_refused_naming_its_key() {
        for key in ["presence.sweep_cron", "snapshot.cron", "retention.cron"] {
            let mut cfg = Config::embedded();
            match key {
                "presence.sweep_cron" => cfg.presence.sweep_cron = "every minute".into(),
                "snapshot.cron" => cfg.snapshot.cron = "every minute".into(),
                _ => cfg.retention.cron = "every minute".into(),
            }
            let (tx, _rx) = mpsc::channel(1);
            let (rtx, _rrx) = mpsc::channel(1);
            match Scheduler::start(&cfg, tx, Some(rtx)).await {
                Err(SchedulerError::Schedule { key: k, reason }) => {
                    assert_eq!(k, key);
                    assert!(reason.contains("every minute"), "{reason}");
                }
                Err(e) => panic!("{key}: unexpected error {e}"),
                Ok(s) => {
                    s.stop().await;
                    panic!("{key}: a bad schedule was accepted");
                }
            }
        }
    }
}
