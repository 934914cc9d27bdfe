//! Logs and metrics: the tracing subscriber, the Prometheus recorder, and the name of every
//! metric (defined once, here, so dashboards can rely on them).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Sessions past hello (gauge).
pub const CONNECTIONS: &str = "switchboard_connections";
/// Events appended to the log (counter).
pub const EVENTS_APPENDED: &str = "switchboard_events_appended_total";
/// Events per committed batch (histogram).
pub const BATCH_EVENTS: &str = "switchboard_batch_events";
/// Append + flush latency of a batch, seconds (histogram).
pub const FLUSH_SECONDS: &str = "switchboard_flush_seconds";
/// Frames not queued because a session's outbound queue was full (counter).
pub const QUEUE_DROPS: &str = "switchboard_fanout_queue_drops_total";
/// Batches whose append or flush failed (counter).
pub const APPEND_FAILURES: &str = "switchboard_append_failures_total";
/// Reopenings of the store after a storage error, by outcome `ok` / `failed` (counter).
pub const STORE_REOPENS: &str = "switchboard_store_reopens_total";
/// Batches refused because the store reached `storage.max_bytes` (counter).
pub const LOG_FULL: &str = "switchboard_log_full_total";
/// `send`s answered as duplicates of an earlier cid (counter).
pub const DUPLICATES: &str = "switchboard_duplicate_sends_total";
/// Frames received from clients, by result (counter, label `result`).
pub const FRAMES_IN: &str = "switchboard_frames_received_total";
/// WebSocket sessions closed by the server, by close code (counter, label `code`).
pub const CLOSES: &str = "switchboard_sessions_closed_total";
/// Leftovers the scheduled sweep ended, by kind (`session`, `presence`) (counter).
pub const SWEEP_REMOVED: &str = "switchboard_sweep_removed_total";
/// Gauge: the retention floor (oldest offset served).
pub const RETENTION_FLOOR: &str = "switchboard_retention_floor";
/// Counter: events deleted by compaction.
pub const RETENTION_DELETED: &str = "switchboard_retention_deleted_total";
/// Counter: compaction runs, by outcome (`moved`, `held`, `idle`, `error`).
pub const RETENTION_RUNS: &str = "switchboard_retention_runs_total";
/// Histogram: seconds one compaction run took (floor decision and deletion).
pub const RETENTION_SECONDS: &str = "switchboard_retention_seconds";
/// HTTP API requests, by status (counter, label `status`).
pub const HTTP_REQUESTS: &str = "switchboard_http_requests_total";

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often the recorder's pending histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder once; later calls return the same handle.
///
/// A recorder made with `build_recorder` keeps every histogram sample until something runs
/// its upkeep (a scrape does, as part of rendering). Without a scraper that was unbounded
/// growth: about 8 bytes per sample, several samples per message. So a thread of its own
/// (process-wide, like the recorder; a task would die with the first runtime) runs it.
pub fn prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0,
                ])
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            let upkeep = handle.clone();
            if let Err(e) = spawn_periodic("metrics-upkeep", UPKEEP_EVERY, move || {
                upkeep.run_upkeep()
            }) {
                tracing::warn!(error = %e, "metrics upkeep thread not started; histograms grow until scraped");
            }
            Some(handle)
        })
        .clone()
}

/// Runs `f` every `period` on a named thread, for the life of the process.
fn spawn_periodic(
    name: &str,
    period: Duration,
    mut f: impl FnMut() + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || loop {
            std::thread::sleep(period);
            f();
        })
        .map(|_| ())
}

/// The subscriber under the output layers: the registry filtered by the reloadable filter.
type Base = tracing_subscriber::layer::Layered<
    tracing_subscriber::reload::Layer<EnvFilter, tracing_subscriber::Registry>,
    tracing_subscriber::Registry,
>;

/// The live side of logging: change the level, keep the file writer alive.
pub struct LogControl {
    filter: tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    _file: Option<tracing_appender::non_blocking::WorkerGuard>,
}

impl LogControl {
    /// Sets the filter (`RUST_LOG` syntax) now.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter =
            EnvFilter::try_new(level).map_err(|e| format!("logging.level `{level}`: {e}"))?;
        self.filter.reload(filter).map_err(|e| e.to_string())
    }
}

/// Installs the tracing subscriber: stdout (text or JSON) and, with `logging.dir`, JSON lines
/// in daily-rotated files. Returns `None` when a subscriber is already installed.
pub fn init_logging(cfg: &LoggingConfig) -> Option<LogControl> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let stdout: Box<dyn Layer<Base> + Send + Sync> = match cfg.format {
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stdout),
        ),
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::io::stdout),
        ),
    };
    let (file, guard) = if cfg.dir.is_empty() {
        (None, None)
    } else {
        let appender = tracing_appender::rolling::daily(&cfg.dir, "switchboard.log");
        let (writer, guard) = tracing_appender::non_blocking(appender);
        let layer: Box<dyn Layer<Base> + Send + Sync> = Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_ansi(false)
                .with_writer(writer),
        );
        (Some(layer), Some(guard))
    };
    let layers: Vec<Box<dyn Layer<Base> + Send + Sync>> =
        std::iter::once(stdout).chain(file).collect();
    tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init()
        .ok()?;
    Some(LogControl {
        filter: handle,
        _file: guard,
    })
}

/// Describes every metric and creates the counters at zero, so dashboards and alerts see
/// them before the first increment.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(CONNECTIONS, "WebSocket sessions past hello");
    describe_counter!(EVENTS_APPENDED, "events appended to the log");
    describe_histogram!(
        BATCH_EVENTS,
        "events per committed sequencer batch (group commit)"
    );
    describe_histogram!(
        FLUSH_SECONDS,
        Unit::Seconds,
        "append + flush time of one batch"
    );
    describe_counter!(QUEUE_DROPS, "frames not queued because a session's outbound queue was full (the session is closed with 4008)");
    describe_counter!(
        APPEND_FAILURES,
        "batches whose append or flush failed (answered unavailable)"
    );
    describe_counter!(
        STORE_REOPENS,
        "reopenings of the store after a storage error (sled's errors are sticky), by outcome"
    );
    describe_counter!(
        LOG_FULL,
        "batches refused (answered unavailable) because the store reached storage.max_bytes"
    );
    describe_counter!(DUPLICATES, "sends answered as duplicates of an earlier cid");
    describe_counter!(
        FRAMES_IN,
        "frames received from sessions past hello, by result"
    );
    describe_counter!(CLOSES, "sessions closed by the server, by close code");
    describe_counter!(HTTP_REQUESTS, "HTTP API requests, by status");
    describe_counter!(
        SWEEP_REMOVED,
        "leftover sessions and presence entries ended by the sweep, by kind"
    );
    describe_gauge!(
        RETENTION_FLOOR,
        "the retention floor: the oldest offset the log still serves"
    );
    describe_counter!(RETENTION_DELETED, "events deleted by compaction");
    describe_counter!(
        RETENTION_RUNS,
        "compaction runs, by outcome (moved, held, idle, error)"
    );
    describe_histogram!(
        RETENTION_SECONDS,
        Unit::Seconds,
        "time one compaction run took"
    );
    metrics::counter!(RETENTION_DELETED).absolute(0);
    metrics::counter!(SWEEP_REMOVED, "kind" => "session").absolute(0);
    metrics::counter!(SWEEP_REMOVED, "kind" => "presence").absolute(0);
    metrics::counter!(EVENTS_APPENDED).absolute(0);
    metrics::counter!(QUEUE_DROPS).absolute(0);
    metrics::counter!(APPEND_FAILURES).absolute(0);
    metrics::counter!(LOG_FULL).absolute(0);
    metrics::counter!(STORE_REOPENS, "outcome" => "ok").absolute(0);
    metrics::counter!(STORE_REOPENS, "outcome" => "failed").absolute(0);
    metrics::counter!(DUPLICATES).absolute(0);
    metrics::gauge!(CONNECTIONS).set(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_work_runs_again_and_again() {
        let (tx, rx) = std::sync::mpsc::channel();
        spawn_periodic("test-periodic", Duration::from_millis(5), move || {
            let _ = tx.send(());
        })
        .unwrap();
        // Bounded wait, not a timing assertion: three runs must come at all.
        for _ in 0..3 {
            rx.recv_timeout(Duration::from_secs(30)).unwrap();
        }
    }
}
