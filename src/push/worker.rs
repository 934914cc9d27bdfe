//! The push worker: sends what the outbox owes, durably.
//!
//! The outbox (sled, written by the sequencer in the same batch as the events) is the
//! source of truth; the worker keeps only a schedule of keys by due time. A job is
//! removed from the outbox only after the provider accepted it (a crash in between sends
//! it again: at least once; the collapse id keeps the phone from showing it twice), moved
//! to the dead letters when it is refused or its deadline passes, and rewritten with its
//! next attempt time when it must wait (full-jitter exponential backoff, Retry-After
//! honoured). An app whose credentials are refused, or FCM answering 429, pauses that
//! app (circuit breaker: its jobs wait, the next one after the pause is the probe).
//! Dead tokens are pruned through the sequencer, as logged events.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::job::{DeadJob, Job, JobKind};
use super::provider::{redact, Outcome, ProviderKind};
use super::providers::Providers;
use crate::config::PushConfig;
use crate::log::{keys, Store};
use crate::sequencer::{now_ms, Command, Shared};

/// Sent pushes, by provider (counter).
pub const PUSH_SENT: &str = "switchboard_push_sent_total";
/// Failed attempts, by provider and outcome (counter).
pub const PUSH_FAILED: &str = "switchboard_push_failed_total";
/// Attempts rescheduled (counter).
pub const PUSH_RETRIES: &str = "switchboard_push_retries_total";
/// Owed pushes scheduled (gauge).
pub const PUSH_QUEUE: &str = "switchboard_push_queue";
/// Age of the oldest owed push past its due time, seconds (gauge).
pub const PUSH_OLDEST_AGE: &str = "switchboard_push_oldest_owed_seconds";
/// Pushes moved to the dead letters, by reason class (counter).
pub const PUSH_DEAD: &str = "switchboard_push_dead_total";
/// Apps paused (credentials refused or throttled) (gauge).
pub const PUSH_PAUSED: &str = "switchboard_push_paused_apps";

/// How often the outbox is rescanned for jobs the worker was not told about.
const RESCAN: Duration = Duration::from_secs(30);
/// Longest pause of a broken app between probes.
const MAX_PAUSE_MS: u64 = 600_000;

/// Retry and pause settings from `[push]`.
#[derive(Debug, Clone)]
pub struct Policy {
    pub base_ms: u64,
    pub cap_ms: u64,
    pub concurrency: usize,
    pub probe_ms: u64,
}

impl Policy {
    pub fn from_config(c: &PushConfig) -> Policy {
        Policy {
            base_ms: c.retry_base_ms,
            cap_ms: c.retry_cap_ms,
            concurrency: c.concurrency.max(1),
            probe_ms: c.breaker_probe_ms,
        }
    }

    /// Full-jitter backoff for the `attempt`-th retry (1-based): rand(0, min(cap, base·2^n)).
    pub fn backoff(&self, attempt: u32) -> u64 {
        let ceiling = self
            .base_ms
            .saturating_mul(1u64 << attempt.min(30))
            .min(self.cap_ms);
        rand::thread_rng().gen_range(0..=ceiling)
    }
}

/// Paused apps: (provider, app) -> (until ms, consecutive failures).
#[derive(Default)]
struct Breakers {
    paused: HashMap<(ProviderKind, Option<String>), (u64, u32)>,
}

impl Breakers {
    fn key(job: &Job) -> (ProviderKind, Option<String>) {
        // APNs alert and VoIP share one set of credentials.
        let p = match job.provider {
            ProviderKind::ApnsVoip => ProviderKind::Apns,
            p => p,
        };
        (p, job.app.clone())
    }

    fn until(&self, job: &Job) -> Option<u64> {
        self.paused.get(&Self::key(job)).map(|(u, _)| *u)
    }

    fn trip(&mut self, job: &Job, pause_ms: u64, now: u64) -> u64 {
        let e = self.paused.entry(Self::key(job)).or_insert((0, 0));
        e.1 += 1;
        e.0 = now + pause_ms;
        e.0
    }

    fn trip_doubling(&mut self, job: &Job, probe_ms: u64, now: u64) -> (u64, bool) {
        let fails = self
            .paused
            .get(&Self::key(job))
            .map(|(_, f)| *f)
            .unwrap_or(0);
        let pause = probe_ms
            .saturating_mul(1u64 << fails.min(10))
            .min(MAX_PAUSE_MS);
        (self.trip(job, pause, now), fails == 0)
    }

    /// A success closes the breaker; returns whether it was open.
    fn reset(&mut self, job: &Job) -> bool {
        self.paused.remove(&Self::key(job)).is_some()
    }
}

/// Starts the worker. Returns the channel the sequencer announces new jobs on.
pub fn spawn(
    config: &PushConfig,
    store: Store,
    providers: Arc<Providers>,
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> (mpsc::Sender<(Vec<u8>, u64)>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4096);
    let worker = Worker {
        store,
        providers,
        commands,
        shared,
        policy: Policy::from_config(config),
        schedule: BinaryHeap::new(),
        scheduled: HashSet::new(),
        breakers: Breakers::default(),
    };
    let handle = tokio::spawn(worker.run(rx, shutdown));
    (tx, handle)
}

struct Worker {
    store: Store,
    providers: Arc<Providers>,
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    policy: Policy,
    schedule: BinaryHeap<Reverse<(u64, Vec<u8>)>>,
    scheduled: HashSet<Vec<u8>>,
    breakers: Breakers,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<(Vec<u8>, u64)>, shutdown: CancellationToken) {
        self.rescan();
        let mut inflight: JoinSet<(Vec<u8>, Job, Outcome)> = JoinSet::new();
        let mut rescan = tokio::time::interval(RESCAN);
        rescan.tick().await;
        loop {
            self.launch_due(&mut inflight);
            self.publish_gauges();
            let wait = self
                .schedule
                .peek()
                .map(|Reverse((due, _))| due.saturating_sub(now_ms()))
                .unwrap_or(1000)
                .clamp(1, 1000);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    if let Ok((key, job, outcome)) = done {
                        self.settle(key, job, outcome).await;
                    }
                }
                Some((key, due)) = rx.recv() => self.schedule_key(key, due),
                _ = rescan.tick() => self.rescan(),
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
        // Pushes in flight at shutdown stay in the outbox and go out after the restart.
        inflight.abort_all();
    }

    fn schedule_key(&mut self, key: Vec<u8>, due: u64) {
        if self.scheduled.insert(key.clone()) {
            self.schedule.push(Reverse((due, key)));
        }
    }

    /// Picks up every outbox job not scheduled yet (start-up, and missed announcements).
    fn rescan(&mut self) {
        let found: Vec<(Vec<u8>, u64)> = self
            .store
            .scan_prefix(&[keys::OUTBOX])
            .filter_map(Result::ok)
            .filter_map(|(k, v)| Job::decode(&v).map(|j| (k, j.due_ms)))
            .collect();
        for (k, due) in found {
            self.schedule_key(k, due);
        }
    }

    fn publish_gauges(&self) {
        let n = self.scheduled.len();
        self.shared.push_queue.store(n as u64, Ordering::Relaxed);
        metrics::gauge!(PUSH_QUEUE).set(n as f64);
        let oldest = self
            .schedule
            .peek()
            .map(|Reverse((due, _))| now_ms().saturating_sub(*due))
            .unwrap_or(0);
        metrics::gauge!(PUSH_OLDEST_AGE).set(oldest as f64 / 1000.0);
        metrics::gauge!(PUSH_PAUSED).set(self.breakers.paused.len() as f64);
    }

    /// Starts sends for due jobs, up to the concurrency limit.
    fn launch_due(&mut self, inflight: &mut JoinSet<(Vec<u8>, Job, Outcome)>) {
        let now = now_ms();
        while inflight.len() < self.policy.concurrency {
            let Some(Reverse((due, _))) = self.schedule.peek() else {
                return;
            };
            if *due > now {
                return;
            }
            let Some(Reverse((_, key))) = self.schedule.pop() else {
                return;
            };
            self.scheduled.remove(&key);
            // Cancelled (the device came back, the token was dropped) or already done.
            let Some(job) = self
                .store
                .get_raw(&key)
                .ok()
                .flatten()
                .and_then(|v| Job::decode(&v))
            else {
                continue;
            };
            if now > job.deadline_ms {
                let reason = match job.kind {
                    JobKind::Call => "expired with the ring",
                    _ => "deadline passed",
                };
                self.bury(&key, job, reason, "expired");
                continue;
            }
            if let Some(until) = self.breakers.until(&job).filter(|u| *u > now) {
                self.schedule_key(key, until);
                continue;
            }
            let providers = self.providers.clone();
            inflight.spawn(async move {
                let outcome = providers.send(&job.message()).await;
                (key, job, outcome)
            });
        }
    }

    async fn settle(&mut self, key: Vec<u8>, mut job: Job, outcome: Outcome) {
        let provider = job.provider.as_str();
        let now = now_ms();
        match outcome {
            Outcome::Sent => {
                if self.breakers.reset(&job) {
                    tracing::info!(provider, app = ?job.app, "push provider answering again; resumed");
                }
                if let Err(e) = self.store.remove_raw(&key, None) {
                    tracing::warn!(error = %e, "sent push could not be removed from the outbox");
                }
                metrics::counter!(PUSH_SENT, "provider" => provider).increment(1);
            }
            Outcome::Retry { after, reason } => {
                metrics::counter!(PUSH_FAILED, "provider" => provider, "outcome" => "retry")
                    .increment(1);
                job.attempts += 1;
                let wait = self
                    .policy
                    .backoff(job.attempts)
                    .max(after.map(|d| d.as_millis() as u64).unwrap_or(0));
                self.reschedule(key, job, now + wait, &reason);
            }
            Outcome::Throttled { after, reason } => {
                metrics::counter!(PUSH_FAILED, "provider" => provider, "outcome" => "throttled")
                    .increment(1);
                let until = self.breakers.trip(&job, after.as_millis() as u64, now);
                tracing::warn!(provider, app = ?job.app, pause_ms = until - now, reason = %reason, "push app throttled; pausing it");
                self.reschedule(key, job, until, &reason);
            }
            Outcome::AuthFailed { reason } => {
                metrics::counter!(PUSH_FAILED, "provider" => provider, "outcome" => "auth_failed")
                    .increment(1);
                let (until, first) = self.breakers.trip_doubling(&job, self.policy.probe_ms, now);
                if first {
                    tracing::error!(provider, app = ?job.app, reason = %reason, "push credentials refused; pausing the app until a probe succeeds");
                }
                self.reschedule(key, job, until, &reason);
            }
            Outcome::TokenDead { reason } => {
                metrics::counter!(PUSH_FAILED, "provider" => provider, "outcome" => "token_dead")
                    .increment(1);
                if let Err(e) = self.store.remove_raw(&key, None) {
                    tracing::warn!(error = %e, "dead-token push could not be removed");
                }
                let cmd = Command::PushTokenDead {
                    user: job.user,
                    device: job.device,
                    provider: job.provider,
                    token: job.token,
                    reason,
                };
                let _ = self.commands.send(cmd).await;
            }
            Outcome::Rejected { reason } => {
                metrics::counter!(PUSH_FAILED, "provider" => provider, "outcome" => "rejected")
                    .increment(1);
                tracing::error!(provider, token = %redact(&job.token), off = job.off, reason = %reason, "push refused by the provider (payload or headers); moved to dead letters");
                self.bury(&key, job, &reason, "rejected");
            }
        }
    }

    /// Rewrites a job with its next attempt time, or buries it past its deadline.
    fn reschedule(&mut self, key: Vec<u8>, mut job: Job, at: u64, reason: &str) {
        if at > job.deadline_ms {
            self.bury(&key, job, &format!("gave up: {reason}"), "gave_up");
            return;
        }
        // The job may have been cancelled while in flight: do not resurrect it.
        if !matches!(self.store.get_raw(&key), Ok(Some(_))) {
            return;
        }
        job.due_ms = at;
        metrics::counter!(PUSH_RETRIES).increment(1);
        if let Err(e) = self.store.put_raw(&key, &job.encode()) {
            tracing::warn!(error = %e, "push retry could not be recorded");
        }
        self.schedule_key(key, at);
    }

    /// Moves a job to the dead letters.
    fn bury(&mut self, key: &[u8], job: Job, reason: &str, class: &'static str) {
        let dead = DeadJob {
            reason: reason.to_string(),
            at_ms: now_ms(),
            job,
        };
        let dkey = keys::dead(dead.job.id);
        match self.store.remove_raw(key, Some((&dkey, &dead.encode()))) {
            Ok(()) => {
                self.shared.push_dead.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(PUSH_DEAD, "reason" => class).increment(1);
            }
            Err(e) => tracing::warn!(error = %e, "push could not be moved to dead letters"),
        }
    }
}

/// Dead letters, newest first, at most `limit`.
pub fn dead_letters(store: &Store, limit: usize) -> Vec<DeadJob> {
    let mut all: Vec<DeadJob> = store
        .scan_prefix(&[keys::DEAD])
        .filter_map(Result::ok)
        .filter_map(|(_, v)| DeadJob::decode(&v))
        .collect();
    all.sort_by_key(|d| std::cmp::Reverse(d.at_ms));
    all.truncate(limit);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_the_capped_exponential() {
        let p = Policy {
            base_ms: 2000,
            cap_ms: 600_000,
            concurrency: 1,
            probe_ms: 1000,
        };
        for attempt in 1..40 {
            let ceiling = (2000u64 << attempt.min(30)).min(600_000);
            for _ in 0..20 {
                assert!(p.backoff(attempt) <= ceiling);
            }
        }
        assert!(
            (0..200).map(|_| p.backoff(20)).any(|d| d > 300_000),
            "jitter spans the range"
        );
    }
}
