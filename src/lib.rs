//! Switchboard: an event-sourced real-time messaging broker.
//!
//! Data flows one way: frame -> command -> sequencer -> event -> state -> fan-out.
//! [`Broker::start`] wires the parts: it opens the log, rebuilds State by replaying it,
//! starts the sequencer (the only writer) and the gateway (WebSocket + HTTP API).

pub mod api;
pub mod clock;
pub mod config;
pub mod fanout;
pub mod gateway;
pub mod log;
pub mod logtool;
pub mod outbox;
pub mod protocol;
pub mod push;
pub mod retention;
pub mod scheduler;
pub mod sequencer;
pub mod snapshot;
pub mod state;
pub mod sync;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use config::Config;

use gateway::Gateway;
use sequencer::{Command, Sequencer, Settings, Shared};

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error(transparent)]
    Auth(#[from] gateway::auth::AuthError),
    #[error(transparent)]
    Tls(#[from] gateway::tls::TlsError),
    #[error(transparent)]
    Scheduler(#[from] scheduler::SchedulerError),
    #[error("config key {0}")]
    Push(#[from] push::providers::PushConfigError),
    #[error("config key sync: {0}")]
    Sync(#[from] sync::SyncError),
    #[error("refusing to serve a damaged log: {0} (`switchboard log verify` lists every fault)")]
    Damaged(log::LogError),
    #[error("reload: {0}")]
    Reload(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// What a reload applied, and the sections that changed but need a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub applied: Vec<&'static str>,
    pub restart: Vec<String>,
}

/// The `storage` keys a reload cannot change (all but `max_bytes`).
#[derive(PartialEq)]
struct StorageKeys<'a> {
    dir: &'a std::path::Path,
    check_on_start: config::CheckOnStart,
}

impl StorageKeys<'_> {
    fn of(s: &config::StorageConfig) -> StorageKeys<'_> {
        StorageKeys {
            dir: &s.dir,
            check_on_start: s.check_on_start,
        }
    }
}

/// A running broker.
pub struct Broker {
    addr: SocketAddr,
    gateway: Arc<Gateway>,
    commands: mpsc::Sender<Command>,
    sequencer: JoinHandle<()>,
    accept: JoinHandle<()>,
    scheduler: scheduler::Scheduler,
    push: Option<(tokio_util::sync::CancellationToken, JoinHandle<()>)>,
    sync: Vec<sync::Handle>,
    retention: retention::Retention,
    retention_task: Option<(tokio_util::sync::CancellationToken, JoinHandle<()>)>,
    shutdown_timeout: Duration,
}

impl Broker {
    /// Opens the log, replays it, and starts serving.
    pub async fn start(config: Config) -> Result<Broker, Error> {
        let prometheus = if config.metrics.enabled {
            telemetry::prometheus()
        } else {
            None
        };
        std::fs::create_dir_all(&config.storage.dir).map_err(|source| Error::Io {
            what: format!("config key storage.dir ({})", config.storage.dir.display()),
            source,
        })?;
        let store = log::Store::open(
            &config.storage.dir,
            config.log.durability,
            config.log.flush_interval_ms,
        )?;
        log::check::check_watermark(&store).map_err(|e| match e {
            e @ log::LogError::Corrupt { .. } => Error::Damaged(e),
            e => Error::Log(e),
        })?;
        if config.storage.check_on_start == config::CheckOnStart::All {
            let t0 = Instant::now();
            let store = store.clone();
            let dir = snapshot::dir_of(&config.storage.dir);
            let durability = config.log.durability;
            let checked = tokio::task::spawn_blocking(move || {
                log::check::check_all(&store, &dir, durability)
            })
            .await
            .map_err(|e| Error::Io {
                what: "start-up check".into(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|e| match e {
                e @ log::LogError::Corrupt { .. } => Error::Damaged(e),
                e => Error::Log(e),
            })?;
            tracing::info!(
                events = checked.events,
                first = checked.first,
                head = checked.head,
                ms = t0.elapsed().as_millis() as u64,
                "every event checked (storage.check_on_start = all)"
            );
        }
        let t0 = Instant::now();
        let (state, loaded) = {
            let store = store.clone();
            let dir = snapshot::dir_of(&config.storage.dir);
            tokio::task::spawn_blocking(move || snapshot::load(&store, &dir))
                .await
                .map_err(|e| Error::Io {
                    what: "replay".into(),
                    source: std::io::Error::other(e.to_string()),
                })??
        };
        match loaded {
            snapshot::Loaded::Snapshot { off, replayed } => tracing::info!(
                head = state.head,
                snapshot = off,
                replayed,
                ms = t0.elapsed().as_millis() as u64,
                "state loaded from a snapshot and the log tail"
            ),
            snapshot::Loaded::Full { replayed } => tracing::info!(
                head = state.head,
                replayed,
                ms = t0.elapsed().as_millis() as u64,
                "state rebuilt by a full replay"
            ),
        }
        let verifier = gateway::auth::Verifier::new(&config.auth)?;
        let tls = if config.tls.enabled() {
            Some(gateway::tls::acceptor(&config.tls)?)
        } else {
            None
        };
        let listener = TcpListener::bind(&config.server.listen)
            .await
            .map_err(|source| Error::Io {
                what: format!("config key server.listen ({})", config.server.listen),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            what: "listener address".into(),
            source,
        })?;
        let shared = Arc::new(Shared::new(state.head));
        shared.max_bytes.store(
            config.storage.max_bytes,
            std::sync::atomic::Ordering::Relaxed,
        );
        let floor = store.floor()?;
        shared
            .floor
            .store(floor, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!(telemetry::RETENTION_FLOOR).set(floor as f64);
        let (tx, rx) = mpsc::channel(config.log.queue_capacity);
        let mut seq = Sequencer::new(
            Settings::from_config(&config),
            store.clone(),
            state,
            rx,
            shared.clone(),
        );
        let push_configured =
            !(config.push.fcm.apps.is_empty() && config.push.apns.apps.is_empty());
        let push = if config.push.enabled && push_configured {
            let providers = Arc::new(push::providers::Providers::from_config(&config.push)?);
            let stop = tokio_util::sync::CancellationToken::new();
            let (push_tx, handle) = push::worker::spawn(
                &config.push,
                store.clone(),
                providers,
                tx.clone(),
                shared.clone(),
                stop.clone(),
            );
            seq.set_push_worker(push_tx);
            Some((stop, handle))
        } else {
            None
        };
        let sinks = sync::configured(&config.sync)?;
        let sequencer = tokio::spawn(seq.run());
        // SQL sinks only read the durable log (up to the published head): a database that
        // is down or slow never reaches the sequencer.
        let sync_policy = sync::Policy::from_config(&config.sync);
        let sync: Vec<sync::Handle> = sinks
            .into_iter()
            .map(|s| {
                s.spawn(
                    store.clone(),
                    shared.head.subscribe(),
                    shared.clone(),
                    sync_policy.clone(),
                )
            })
            .collect();
        let shutdown_timeout = Duration::from_millis(config.shutdown.timeout_ms);
        let retention = retention::Retention {
            config: config.retention.clone(),
            store: store.clone(),
            shared: shared.clone(),
            commands: tx.clone(),
            snapshot_dir: snapshot::dir_of(&config.storage.dir),
            sinks: sync.iter().map(|h| h.sink).collect(),
        };
        let (retention_tx, retention_task) =
            if config.retention.enabled() && !config.retention.cron.is_empty() {
                let (ticks_tx, ticks) = mpsc::channel(1);
                let stop = tokio_util::sync::CancellationToken::new();
                let task = retention.clone().spawn(ticks, stop.clone());
                (Some(ticks_tx), Some((stop, task)))
            } else {
                (None, None)
            };
        let scheduler = scheduler::Scheduler::start(&config, tx.clone(), retention_tx).await?;
        let gw = Arc::new(Gateway::new(
            config,
            tx.clone(),
            store,
            verifier,
            shared,
            prometheus,
        ));
        tracing::info!(addr = %addr, tls = tls.is_some(), "listening");
        if let Ok(mut slot) = gw.tls.write() {
            *slot = tls;
        }
        let accept = tokio::spawn(gateway::serve(listener, gw.clone()));
        Ok(Broker {
            addr,
            gateway: gw,
            commands: tx,
            sequencer,
            accept,
            scheduler,
            push,
            sync,
            retention,
            retention_task,
            shutdown_timeout,
        })
    }

    /// Applies what can change live from a newly loaded configuration: the TLS
    /// certificate and key files (re-read even when the paths are the same; sessions keep
    /// their connections) and the log level (applied by the caller, who owns logging).
    /// Returns what was applied and the keys that differ but need a restart.
    pub fn reload(&self, new: &Config) -> Result<Reloaded, Error> {
        let old = &self.gateway.config;
        let mut applied = Vec::new();
        if new.tls.enabled() != old.tls.enabled() {
            return Err(Error::Reload(
                "tls.cert/tls.key: turning TLS on or off needs a restart".into(),
            ));
        }
        if new.tls.enabled() {
            let acceptor = gateway::tls::acceptor(&new.tls)?;
            if let Ok(mut slot) = self.gateway.tls.write() {
                *slot = Some(acceptor);
            }
            applied.push("tls");
        }
        if new.logging.level != old.logging.level {
            applied.push("logging.level");
        }
        // Live: compared with the value in force (an earlier reload may have changed it).
        let was = self
            .gateway
            .shared
            .max_bytes
            .swap(new.storage.max_bytes, std::sync::atomic::Ordering::Relaxed);
        if was != new.storage.max_bytes {
            applied.push("storage.max_bytes");
        }
        let mut restart = Vec::new();
        let sections: [(&str, bool); 17] = [
            ("sync", new.sync != old.sync),
            ("server", new.server != old.server),
            (
                "storage",
                StorageKeys::of(&new.storage) != StorageKeys::of(&old.storage),
            ),
            ("log", new.log != old.log),
            ("auth", new.auth != old.auth),
            ("limits", new.limits != old.limits),
            ("heartbeat", new.heartbeat != old.heartbeat),
            ("presence", new.presence != old.presence),
            ("typing", new.typing != old.typing),
            ("calls", new.calls != old.calls),
            ("push", new.push != old.push),
            ("snapshot", new.snapshot != old.snapshot),
            ("retention", new.retention != old.retention),
            ("shutdown", new.shutdown != old.shutdown),
            ("metrics", new.metrics != old.metrics),
            ("debug", new.debug != old.debug),
            (
                "logging",
                new.logging.format != old.logging.format || new.logging.dir != old.logging.dir,
            ),
        ];
        for (name, changed) in sections {
            if changed {
                restart.push(name.to_string());
            }
        }
        Ok(Reloaded { applied, restart })
    }

    /// Runs one compaction now with the configured limits (whether or not the schedule is
    /// on), and reports what it did.
    pub async fn compact(&self) -> Result<retention::Report, retention::RetentionError> {
        self.retention.run().await
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful stop: stop accepting, close sessions with 4000, commit and flush the log.
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.gateway.stop_http.cancel();
        self.scheduler.stop().await;
        if let Some((stop, task)) = self.retention_task {
            stop.cancel();
            let _ = task.await;
        }
        if let Some((stop, handle)) = self.push {
            stop.cancel();
            let _ = handle.await;
        }
        // The token first: a session still before its hello watches it, and one whose hello
        // the sequencer refuses once draining then sees it cancelled (4000, not 1013).
        self.gateway.shutdown.cancel();
        let _ = self.commands.send(Command::Drain).await;
        self.gateway.tracker.close();
        if tokio::time::timeout_at(deadline, self.gateway.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions did not finish before shutdown.timeout_ms");
        }
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Stop(tx)).await.is_ok() {
            let _ = tokio::time::timeout_at(deadline + Duration::from_secs(2), rx).await;
        }
        let _ = self.sequencer.await;
        // After the last commit: each sink finishes (or abandons) its batch in flight and
        // stops at a committed checkpoint.
        for h in self.sync {
            h.stop().await;
        }
        self.accept.abort();
        tracing::info!("stopped");
    }
}
