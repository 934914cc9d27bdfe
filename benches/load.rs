//! `switchboard-load`: the end-to-end load generator (issue 8, item 1).
//!
//! It speaks only the public protocol (docs/PROTOCOL.md, sections 1-4) over real sockets,
//! so it can measure any server that implements it. Loopback only, bounded counts and
//! durations. Scenarios (`--scenario`):
//!
//! - `chat`: `--pairs` pairs exchanging messages at `--rate` msgs/s in total for `--seconds`,
//!   open loop; send->ack and send->deliver percentiles (HDR), delivered/s.
//! - `fanout`: one sender at `--rate` into a room of `--members` users with `--devices` each.
//! - `resume`: `--reconnects` devices disconnect, `--missed` messages happen, all reconnect
//!   with `since` at once; time until every device has its `sync`, and an exactness check.
//! - `idle`: `--connections` sessions past `hello`; broker RSS per connection, open time.
//! - `max`: step search for the highest chat rate whose send->ack p99 is under `--p99-ms`.
//!
//! Output: a human table, then one JSON line (starts with `{"scenario"`). The exit status
//! is 1 when the run saw errors or lost anything.
//!
//! ```text
//! cargo bench --bench load -- --scenario chat --pairs 50 --rate 1000 --seconds 10 \
//!     --url ws://127.0.0.1:18383/ws --api-url http://127.0.0.1:18383 --pid <broker pid>
//! ```
//!
//! The scenario logic lives in `benches/load/` (shared with `tests/load_smoke.rs`).

#[path = "load/mod.rs"]
mod load;

use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};

use load::client::{Codec, Target, DEV_API_KEY, DEV_SECRET};
use load::report::Report;
use load::scenarios::{self, ChatParams, FanoutParams, IdleParams, MaxParams, ResumeParams};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Scenario {
    Chat,
    Fanout,
    Resume,
    Idle,
    Max,
}

/// End-to-end load generator for a Switchboard-protocol broker (loopback only).
#[derive(Parser, Debug)]
#[command(name = "switchboard-load")]
struct Args {
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// WebSocket endpoint (ws:// only).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Base URL of the HTTP API (room creation, /health).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    api_url: String,
    /// Bearer key of the /v1 API.
    #[arg(long, default_value = DEV_API_KEY)]
    api_key: String,
    /// HS256 secret the connection tokens are signed with.
    #[arg(long, default_value = DEV_SECRET)]
    secret: String,
    /// The broker's pid, for RSS and CPU figures (default: the process listening on the port).
    #[arg(long)]
    pid: Option<u32>,
    /// Loopback source addresses to bind client sockets to, round robin (e.g. 127.0.0.2,127.0.0.3).
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// Use the MessagePack subprotocol instead of JSON.
    #[arg(long)]
    msgpack: bool,
    /// Bound of every single wait (connect, upgrade, one frame), seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout_s: f64,
    /// Longest wait for outstanding acks/deliveries after the last send, seconds.
    #[arg(long, default_value_t = 15.0)]
    drain_s: f64,
    /// Padding bytes in each message body.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,

    /// chat, max: pairs of users.
    #[arg(long, default_value_t = 50)]
    pairs: usize,
    /// chat: total msgs/s; fanout: msgs/s of the sender; max: starting rate.
    #[arg(long)]
    rate: Option<f64>,
    /// chat, fanout: seconds of sending; max: seconds per step.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// fanout: room members.
    #[arg(long, default_value_t = 100)]
    members: usize,
    /// fanout: devices per member.
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// resume: devices that disconnect and resume (K).
    #[arg(long, default_value_t = 200)]
    reconnects: usize,
    /// resume: messages sent while they are away (X).
    #[arg(long, default_value_t = 100)]
    missed: usize,
    /// idle: connections to open (N).
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// idle: handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// idle: seconds to stay idle before reading RSS again.
    #[arg(long, default_value_t = 2.0)]
    hold_s: f64,
    /// max: p99 send->ack bound, ms.
    #[arg(long, default_value_t = 10.0)]
    p99_ms: f64,
    /// max: most steps.
    #[arg(long, default_value_t = 10)]
    max_steps: usize,
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn secs(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

async fn run(a: &Args) -> Result<Report> {
    let mut t = Target::new(&a.url, &a.api_url, &a.api_key, &a.secret);
    t.source_ips = a.source_ips.clone();
    t.codec = if a.msgpack {
        Codec::Msgpack
    } else {
        Codec::Json
    };
    t.pid = a.pid;
    t.timeout = secs(a.timeout_s, "--timeout-s")?;
    let drain = secs(a.drain_s, "--drain-s")?;
    Ok(match a.scenario {
        Scenario::Chat => {
            let p = ChatParams {
                pairs: a.pairs,
                rate: a.rate.unwrap_or(1000.0),
                seconds: a.seconds,
                body_bytes: a.body_bytes,
                drain,
            };
            scenarios::chat(&t, &p).await?.report()
        }
        Scenario::Fanout => {
            let p = FanoutParams {
                members: a.members,
                devices: a.devices,
                rate: a.rate.unwrap_or(100.0),
                seconds: a.seconds,
                body_bytes: a.body_bytes,
                drain,
            };
            scenarios::fanout(&t, &p).await?.report()
        }
        Scenario::Resume => {
            let p = ResumeParams {
                devices: a.reconnects,
                missed: a.missed,
                body_bytes: a.body_bytes,
            };
            scenarios::resume(&t, &p).await?.report()
        }
        Scenario::Idle => {
            let p = IdleParams {
                connections: a.connections,
                concurrency: a.concurrency,
                hold: secs(a.hold_s, "--hold-s")?,
            };
            scenarios::idle(&t, &p).await?.report()
        }
        Scenario::Max => {
            let p = MaxParams {
                pairs: a.pairs,
                start_rate: a.rate.unwrap_or(500.0),
                p99_ms: a.p99_ms,
                step_seconds: a.seconds,
                max_steps: a.max_steps,
                body_bytes: a.body_bytes,
                drain,
            };
            scenarios::max(&t, &p).await?.report()
        }
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard-load: tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(&args)) {
        Ok(report) => {
            if !args.json {
                print!("{}", report.table());
            }
            println!("{}", report.json_line());
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("switchboard-load: {e:#}");
            ExitCode::from(2)
        }
    }
}
