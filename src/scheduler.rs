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
        let snapshot_commands = commands.clone();
        let cron = config.presence.sweep_cron.clone();
        let sweep = Job::new_async(cron.as_str(), move |_, _| {
            let commands = commands.clone();
            Box::pin(async move {
                // A full queue means the broker is busy; the next tick sweeps instead.
                if commands.try_send(Command::Sweep).is_err() {
                    tracing::debug!("sweep skipped: sequencer queue full");
                }
            })
        })
        .map_err(|e| SchedulerError::Schedule {
            key: "presence.sweep_cron",
            reason: format!(
                "`{cron}` is not a cron schedule (sec min hour day month weekday): {e}"
            ),
        })?;
        inner.add(sweep).await?;
        if !config.snapshot.cron.is_empty() {
            let cron = config.snapshot.cron.clone();
            let commands = snapshot_commands;
            let job = Job::new_async(cron.as_str(), move |_, _| {
                let commands = commands.clone();
                Box::pin(async move {
                    let _ = commands.try_send(Command::Snapshot);
                })
            })
            .map_err(|e| SchedulerError::Schedule {
                key: "snapshot.cron",
                reason: format!(
                    "`{cron}` is not a cron schedule (sec min hour day month weekday): {e}"
                ),
            })?;
            inner.add(job).await?;
        }
        if let Some(tx) = retention {
            let cron = config.retention.cron.clone();
            let job = Job::new_async(cron.as_str(), move |_, _| {
                let tx = tx.clone();
                Box::pin(async move {
                    // A run still going: this tick is skipped.
                    let _ = tx.try_send(());
                })
            })
            .map_err(|e| SchedulerError::Schedule {
                key: "retention.cron",
                reason: format!(
                    "`{cron}` is not a cron schedule (sec min hour day month weekday): {e}"
                ),
            })?;
            inner.add(job).await?;
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
