//! Typed configuration: the embedded default (`config/switchboard.toml`), an optional file,
//! and `SWITCHBOARD_<SECTION>__<KEY>` environment overrides, validated in one place.
//!
//! Invariants: every key has a default in the embedded file (so a partial file works), an
//! unknown key or a value of the wrong type is an error that names the key
//! (`presence.grace_ms: invalid type ...`), and nothing reads the environment after
//! [`Config::load`] returns.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The text of `config/switchboard.toml`, compiled in: what `serve` runs with by default.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/switchboard.toml");

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

/// A configuration problem, always naming the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key {key}: {message}")]
    Key { key: String, message: String },
}

fn key_error(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    pub heartbeat: HeartbeatConfig,
    pub snapshot: SnapshotConfig,
    pub retention: RetentionConfig,
    pub presence: PresenceConfig,
    pub typing: TypingConfig,
    pub calls: CallsConfig,
    pub push: PushConfig,
    pub sync: SyncConfig,
    pub shutdown: ShutdownConfig,
    pub logging: LoggingConfig,
    pub metrics: MetricsConfig,
    pub debug: DebugConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address of the gateway and API (`host:port`, port 0 picks one).
    pub listen: String,
    /// Origins allowed to upgrade; empty allows all.
    pub allowed_origins: Vec<String>,
    /// Slowloris guard: time to receive a request head, ms.
    pub header_timeout_ms: u64,
    /// Largest API request body, bytes.
    pub max_body_bytes: usize,
    /// Slowloris guard on the body: time to receive a whole request body, ms.
    pub body_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// The sled directory of the event log.
    pub dir: PathBuf,
    /// Most bytes the store may occupy on disk; appends beyond it are refused with
    /// `unavailable` (0: unlimited).
    pub max_bytes: u64,
    /// What start-up checks before serving.
    pub check_on_start: CheckOnStart,
}

/// How much of the log start-up checksums before serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckOnStart {
    /// Every event: checksum, offset, contiguity (and a snapshot never ahead of the log).
    All,
    /// Only what the replay reads (the events after the snapshot loaded).
    Tail,
}

/// When an acknowledged event reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Flush every batch before answering it (group commit).
    Flush,
    /// Flush on a timer; answers do not wait for it.
    Interval,
    /// Never flush explicitly (benchmarks only).
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub durability: Durability,
    /// Timer period for [`Durability::Interval`], ms.
    pub flush_interval_ms: u64,
    /// Most commands in one sequencer batch.
    pub batch_max: usize,
    /// Capacity of the sequencer's command channel.
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub jwt_secret: String,
    pub jwt_public_key: String,
    pub leeway_s: u64,
    pub audience: String,
    pub issuer: String,
    pub api_key: String,
    pub default_ttl_s: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: String,
    pub key: String,
}

impl TlsConfig {
    /// True when both files are configured.
    pub fn enabled(&self) -> bool {
        !self.cert.is_empty() && !self.key.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_frame_bytes: usize,
    pub max_body_bytes: usize,
    pub hello_timeout_ms: u64,
    pub outbound_queue: usize,
    pub max_replay_events: u64,
    pub max_connections: usize,
    /// Per-session token bucket: frames refilled per second (0: no rate limit).
    pub rate_per_s: u32,
    /// Per-session token bucket: capacity, frames (a burst allowed at once).
    pub rate_burst: u32,
    /// Consecutive `rate_limited` frames after which the session is closed with 4009.
    pub rate_strikes: u32,
    /// Distinct devices of one user online at once (a further device's hello is refused).
    pub max_devices_per_user: usize,
    /// Most members of one room (HTTP API create and add beyond it are refused).
    pub max_room_members: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Snapshot every this many events (0: only on the schedule and at shutdown).
    pub every_events: u64,
    /// Cron schedule of snapshots ("" for none).
    pub cron: String,
    /// Snapshot files kept.
    pub keep: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Events older than this many seconds are compacted away (0: no age limit).
    pub max_age_s: u64,
    /// The retained events and their index entries are kept under this many bytes
    /// (estimated from their encoded size; 0: no size limit).
    pub max_bytes: u64,
    /// When compaction runs (cron with seconds; "" for none: only [`crate::Broker::compact`]).
    pub cron: String,
    /// Events deleted per store batch.
    pub batch: usize,
    /// With no snapshot to keep the floor behind, compaction asks for one and waits this
    /// long for it, ms.
    pub snapshot_wait_ms: u64,
}

impl RetentionConfig {
    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.max_age_s > 0 || self.max_bytes > 0
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceConfig {
    pub grace_ms: u64,
    /// Schedule of the leftover sweep (cron with seconds).
    pub sweep_cron: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypingConfig {
    pub expire_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallsConfig {
    /// A participant whose last device stays gone this long leaves the call, ms.
    pub drop_after_ms: u64,
    /// Most users one call may invite.
    pub max_invitees: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    pub enabled: bool,
    /// Wait before an owed push is sent, ms (0: `presence.grace_ms`).
    pub delay_ms: u64,
    pub preview: bool,
    pub preview_max_chars: usize,
    pub retry_base_ms: u64,
    pub retry_cap_ms: u64,
    /// Deadline of chat and notice pushes, s.
    pub deadline_s: u64,
    pub concurrency: usize,
    pub breaker_probe_ms: u64,
    pub fcm: FcmConfig,
    pub apns: ApnsConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmConfig {
    pub base_url: String,
    pub ca_cert: String,
    pub apps: Vec<FcmApp>,
}

/// One FCM project's credentials.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmApp {
    pub name: String,
    /// Path of the service-account JSON (its `token_uri` is where access tokens come from).
    pub service_account: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsConfig {
    pub base_url: String,
    pub ca_cert: String,
    pub apps: Vec<ApnsApp>,
}

/// One APNs app: a token-auth key and the bundle id.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsApp {
    pub name: String,
    /// Path of the `.p8` key (PKCS#8 EC P-256).
    pub key_file: String,
    pub key_id: String,
    pub team_id: String,
    /// The bundle id; VoIP pushes go to `<topic>.voip`.
    pub topic: String,
}

/// The SQL sinks (`[sync]`): empty URLs mean no sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Most events in one sink transaction.
    pub batch_max: usize,
    /// Longest wait for a batch to fill before it is written, ms.
    pub batch_ms: u64,
    /// Reconnect backoff with full jitter: base and cap, ms.
    pub retry_base_ms: u64,
    pub retry_cap_ms: u64,
    /// The PostgreSQL sink (`sync.postgres.url`: tokio-postgres connection string).
    pub postgres: SinkConfig,
    /// The SQL Server sink (`sync.mssql.url`: ADO.NET connection string).
    pub mssql: SinkConfig,
}

/// One SQL sink: its connection string ("" = no sink).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    pub timeout_ms: u64,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    pub level: String,
    pub format: LogFormat,
    /// Directory of daily-rotated log files ("": stdout only).
    pub dir: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugConfig {
    /// Serve `/echo`, a WebSocket echo through the same frame reader, limits and writer as
    /// `/ws`, for WebSocket conformance suites. Never in production.
    pub echo_endpoint: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub enabled: bool,
}

impl Config {
    /// The embedded default, with no file and no environment.
    pub fn embedded() -> Config {
        // The embedded text is part of the binary and covered by a unit test; if it did not
        // parse, no broker could start at all.
        match Self::from_layers(None, std::iter::empty::<(String, String)>()) {
            Ok(c) => c,
            Err(e) => panic!("embedded default config is invalid: {e}"),
        }
    }

    /// Embedded default, then `path` (if any), then every `SWITCHBOARD_*` variable.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(p) => Some((
                p.to_path_buf(),
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
            )),
            None => None,
        };
        Self::from_layers(
            file.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
            std::env::vars(),
        )
    }

    /// The pure core of [`Config::load`]: layers merged over the embedded default.
    pub fn from_layers(
        file: Option<(&Path, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut root: toml::Table =
            EMBEDDED_DEFAULT
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: PathBuf::from("<embedded>"),
                    message: e.message().to_string(),
                })?;
        if let Some((path, text)) = file {
            let overlay: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Syntax {
                        path: path.to_path_buf(),
                        message: e.to_string(),
                    })?;
            merge(&mut root, overlay);
        }
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        vars.sort();
        for (name, value) in vars {
            apply_env(&mut root, &name, &value)?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(root))
            .map_err(|e| key_error(e.path().to_string(), e.inner().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that types alone cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(key_error(
                "server.listen",
                format!("`{}` is not an ip:port address", self.server.listen),
            ));
        }
        let positive = [
            ("log.batch_max", self.log.batch_max as u64),
            ("log.queue_capacity", self.log.queue_capacity as u64),
            ("log.flush_interval_ms", self.log.flush_interval_ms),
            ("limits.max_frame_bytes", self.limits.max_frame_bytes as u64),
            ("limits.max_body_bytes", self.limits.max_body_bytes as u64),
            ("limits.hello_timeout_ms", self.limits.hello_timeout_ms),
            ("limits.outbound_queue", self.limits.outbound_queue as u64),
            ("limits.max_connections", self.limits.max_connections as u64),
            ("heartbeat.interval_ms", self.heartbeat.interval_ms),
            ("heartbeat.timeout_ms", self.heartbeat.timeout_ms),
            ("typing.expire_ms", self.typing.expire_ms),
            ("calls.max_invitees", self.calls.max_invitees as u64),
            ("push.preview_max_chars", self.push.preview_max_chars as u64),
            ("push.retry_base_ms", self.push.retry_base_ms),
            ("push.retry_cap_ms", self.push.retry_cap_ms),
            ("push.concurrency", self.push.concurrency as u64),
            ("push.breaker_probe_ms", self.push.breaker_probe_ms),
            ("sync.batch_max", self.sync.batch_max as u64),
            ("sync.retry_base_ms", self.sync.retry_base_ms),
            ("sync.retry_cap_ms", self.sync.retry_cap_ms),
            ("server.max_body_bytes", self.server.max_body_bytes as u64),
            ("retention.batch", self.retention.batch as u64),
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            (
                "limits.max_devices_per_user",
                self.limits.max_devices_per_user as u64,
            ),
            (
                "limits.max_room_members",
                self.limits.max_room_members as u64,
            ),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(key_error(key, "must be greater than 0"));
            }
        }
        if self.limits.rate_per_s > 0 && self.limits.rate_burst == 0 {
            return Err(key_error(
                "limits.rate_burst",
                "must be greater than 0 when limits.rate_per_s is set",
            ));
        }
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            return Err(key_error(
                "tls.cert",
                "tls.cert and tls.key must be set together",
            ));
        }
        Ok(())
    }
}

/// Recursively lays `overlay` over `base`.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// `SWITCHBOARD_PRESENCE__GRACE_MS=200` sets `presence.grace_ms`. The value is read as a TOML
/// value when it parses as one (numbers, booleans, arrays), else as a string.
fn apply_env(root: &mut toml::Table, name: &str, value: &str) -> Result<(), ConfigError> {
    let rest = &name[ENV_PREFIX.len()..];
    // Only SWITCHBOARD_<SECTION>__<KEY> names are configuration; others (SWITCHBOARD_BIN,
    // SWITCHBOARD_REQUIRE_DB, ...) belong to tools and tests.
    let Some((section, key)) = rest.split_once("__") else {
        return Ok(());
    };
    // SWITCHBOARD_PUSH__FCM__BASE_URL reaches the nested table push.fcm.
    let mut path: Vec<String> = std::iter::once(section)
        .chain(key.split("__"))
        .map(str::to_lowercase)
        .collect();
    let dotted = path.join(".");
    let Some(key) = path.pop() else {
        return Ok(());
    };
    let mut table = &mut *root;
    for part in &path {
        match table.get_mut(part) {
            Some(toml::Value::Table(t)) => table = t,
            _ => return Err(key_error(dotted, "unknown section")),
        }
    }
    let Some(current) = table.get(&key) else {
        return Err(key_error(dotted, "unknown key"));
    };
    let parsed = parse_env_value(value, current);
    table.insert(key, parsed);
    Ok(())
}

fn parse_env_value(raw: &str, current: &toml::Value) -> toml::Value {
    if current.is_str() {
        return toml::Value::String(raw.to_string());
    }
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_default_parses_and_matches_the_documented_defaults() {
        let c = Config::embedded();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.storage.dir, PathBuf::from("./data"));
        assert_eq!(c.log.durability, Durability::Flush);
        assert_eq!(c.presence.grace_ms, 5000);
        assert_eq!(c.heartbeat.interval_ms, 20000);
        assert_eq!(c.heartbeat.timeout_ms, 45000);
        assert_eq!(c.limits.max_frame_bytes, 65536);
    }

    #[test]
    fn env_override_sets_a_key() {
        let c = Config::from_layers(
            None,
            env(&[
                ("SWITCHBOARD_PRESENCE__GRACE_MS", "200"),
                ("SWITCHBOARD_SERVER__LISTEN", "127.0.0.1:9001"),
                ("SWITCHBOARD_LOG__DURABILITY", "interval"),
                ("PATH", "/bin"),
                ("SWITCHBOARD_REQUIRE_DB", "1"),
                ("SWITCHBOARD_PUSH__FCM__BASE_URL", "http://127.0.0.1:9"),
            ]),
        )
        .unwrap();
        assert_eq!(c.presence.grace_ms, 200);
        assert_eq!(c.server.listen, "127.0.0.1:9001");
        assert_eq!(c.log.durability, Durability::Interval);
        assert_eq!(c.push.fcm.base_url, "http://127.0.0.1:9");
    }

    #[test]
    fn unknown_env_key_is_named() {
        let e = Config::from_layers(None, env(&[("SWITCHBOARD_NOSUCH__KEY", "1")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nosuch.key"), "{e}");
    }

    #[test]
    fn bad_value_is_named() {
        let e = Config::from_layers(None, env(&[("SWITCHBOARD_PRESENCE__GRACE_MS", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("presence.grace_ms"), "{e}");
    }

    #[test]
    fn file_layer_overrides_and_unknown_file_key_is_named() {
        let c = Config::from_layers(
            Some((Path::new("x.toml"), "[limits]\nmax_frame_bytes = 4096\n")),
            env(&[]),
        )
        .unwrap();
        assert_eq!(c.limits.max_frame_bytes, 4096);
        assert_eq!(c.limits.hello_timeout_ms, 10000);
        let e = Config::from_layers(
            Some((Path::new("x.toml"), "[limits]\nmax_frames = 4096\n")),
            env(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("limits.max_frames"), "{e}");
    }

    #[test]
    fn bad_listen_address_is_named() {
        let e = Config::from_layers(None, env(&[("SWITCHBOARD_SERVER__LISTEN", "nowhere")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.listen"), "{e}");
    }
}
