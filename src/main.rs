//! The `switchboard` command line: `serve`, `token`, `gen-cert`, `sync`. Wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchboard::config::Config;
use switchboard::{telemetry, Broker};

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Event-sourced real-time messaging broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker.
    Serve {
        /// Config file laid over the embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print an HS256 connection token signed with auth.jwt_secret (development).
    Token {
        #[arg(long)]
        user: String,
        /// Lifetime in seconds (default auth.default_ttl_s).
        #[arg(long)]
        ttl: Option<u64>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Rebuild a SQL sink's tables from the log of a stopped broker (storage.dir), then exit.
    Sync {
        /// `postgres` or `mssql` (its URL comes from sync.postgres.url / sync.mssql.url).
        #[arg(long)]
        sink: String,
        /// Offset to start after: 0 empties the sink's tables first and replays everything.
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a self-signed development certificate and key (cert.pem, key.pem).
    GenCert {
        #[arg(long)]
        out: PathBuf,
        /// Names the certificate is valid for.
        #[arg(long, default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        name: Vec<String>,
    },
    /// Inspect, verify, back up and restore the event log.
    Log {
        #[command(subcommand)]
        cmd: switchboard::logtool::LogCmd,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Serve { config: path } => {
            let config = Config::load(path.as_deref())?;
            let logs = telemetry::init_logging(&config.logging);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(serve(config, path, logs))
        }
        Cmd::Token { user, ttl, config } => {
            let config = Config::load(config.as_deref())?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .context("clock before 1970")?
                .as_secs();
            let ttl = ttl.unwrap_or(config.auth.default_ttl_s);
            let token = switchboard::gateway::auth::mint(&config.auth.jwt_secret, &user, ttl, now)?;
            println!("{token}");
            Ok(())
        }
        Cmd::GenCert { out, name } => gen_cert(&out, name),
        Cmd::Log { cmd } => Ok(switchboard::logtool::run(cmd)?),
        Cmd::Sync { sink, from, config } => {
            let config = Config::load(config.as_deref())?;
            telemetry::init_logging(&config.logging);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            rt.block_on(sync_replay(config, &sink, from))
        }
    }
}

async fn serve(
    config: Config,
    path: Option<PathBuf>,
    logs: Option<telemetry::LogControl>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Before the broker serves: a SIGTERM or SIGHUP that arrives as soon as /health answers
    // must drain or reload, not kill the process (the default action).
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let broker = Broker::start(config).await?;
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!(signal = "SIGTERM", "draining");
                break;
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!(signal = "SIGINT", "draining");
                break;
            }
            _ = hup.recv() => reload(&broker, path.as_deref(), logs.as_ref()),
        }
    }
    broker.shutdown().await;
    Ok(())
}

/// SIGHUP: re-reads the configuration and applies what can change live.
fn reload(broker: &Broker, path: Option<&std::path::Path>, logs: Option<&telemetry::LogControl>) {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the configuration is invalid; nothing changed");
            return;
        }
    };
    match broker.reload(&new) {
        Ok(done) => {
            if let Some(logs) = logs {
                if let Err(e) = logs.set_level(&new.logging.level) {
                    tracing::error!(error = %e, "log level not changed");
                }
            }
            tracing::info!(applied = ?done.applied, needs_restart = ?done.restart, level = %new.logging.level, "configuration reloaded");
        }
        Err(e) => tracing::error!(error = %e, "reload failed; nothing changed"),
    }
}

async fn sync_replay(config: Config, sink: &str, from: u64) -> anyhow::Result<()> {
    use switchboard::sync;
    let target = sync::AnySink::by_name(sink, &config.sync)?;
    // Opening the store takes its lock: a running broker on this directory refuses it.
    let store = switchboard::log::Store::open(
        &config.storage.dir,
        config.log.durability,
        config.log.flush_interval_ms,
    )
    .with_context(|| format!("opening the log in {}", config.storage.dir.display()))?;
    let t0 = std::time::Instant::now();
    let reached = target
        .replay(store, from, sync::Policy::from_config(&config.sync))
        .await
        .with_context(|| format!("replaying into the {sink} sink"))?;
    println!(
        "sink {sink}: replayed offsets {}..={reached} in {} ms",
        from + 1,
        t0.elapsed().as_millis()
    );
    Ok(())
}

fn gen_cert(out: &std::path::Path, names: Vec<String>) -> anyhow::Result<()> {
    let cert = rcgen::generate_simple_self_signed(names).context("generating the certificate")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cert_path = out.join("cert.pem");
    let key_path = out.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    write_private(&key_path, cert.key_pair.serialize_pem().as_bytes())?;
    println!("wrote {} and {}", cert_path.display(), key_path.display());
    Ok(())
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}
