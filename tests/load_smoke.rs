//! Smoke test of the load generator (`benches/load.rs`): every scenario runs tiny against
//! an in-process broker, over real sockets, and must report sane numbers: counts match,
//! no errors, percentiles ordered, the JSON line parses. No timing assertions.
//!
//! A bench target cannot be called from a test, so the scenario logic lives in
//! `benches/load/` and is compiled into this test as a module.

mod common;

#[path = "../benches/load/mod.rs"]
mod load;

use std::time::Duration;

use common::TestBroker;
use load::client::Target;
use load::report::Report;
use load::scenarios::{self, ChatParams, FanoutParams, IdleParams, MaxParams, ResumeParams};
use load::stats::Summary;

fn target(b: &TestBroker) -> Target {
    Target::new(&b.ws_url(), &b.base_url(), &b.api_key, &b.secret)
}

/// The report's JSON line parses back, says `ok`, and names the scenario.
fn check_report(r: &Report, scenario: &str) {
    print!("{}", r.table());
    let line = r.json_line();
    assert!(!line.contains('\n'), "one line: {line}");
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line parses");
    assert_eq!(v["scenario"], scenario, "{line}");
    assert_eq!(v["ok"], true, "{line}");
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
}

fn check_summary(name: &str, s: &Summary, count: u64) {
    assert_eq!(s.count, count, "{name}: count");
    assert!(s.is_ordered(), "{name}: percentiles out of order: {s:?}");
    if count > 0 {
        assert!(s.p50_ms >= 0.0 && s.max_ms > 0.0, "{name}: {s:?}");
    }
}

fn drain() -> Duration {
    Duration::from_secs(10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_tiny_run_counts_match() {
    let b = TestBroker::start().await;
    let t = target(&b);
    let p = ChatParams {
        pairs: 2,
        rate: 50.0,
        seconds: 1.0,
        body_bytes: 16,
        drain: drain(),
    };
    let r = scenarios::chat(&t, &p).await.expect("chat runs");
    check_report(&r.report(), "chat");
    assert_eq!(r.sent, 50, "50/s for 1 s");
    assert_eq!(r.acked, r.sent);
    assert_eq!(r.delivered, r.sent);
    assert_eq!(r.dups, 0);
    assert!(r.complete());
    check_summary("ack", &r.ack, r.sent);
    check_summary("deliver", &r.deliver, r.sent);
    check_summary("lag", &r.client_lag, r.sent);
    assert!(r.delivered_per_s > 0.0);
    // In process: the listener is this test process.
    assert_eq!(r.broker_pid, Some(std::process::id()));
    assert!(r.broker_cpu_s.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_over_msgpack_counts_match() {
    let b = TestBroker::start().await;
    let mut t = target(&b);
    t.codec = load::client::Codec::Msgpack;
    let p = ChatParams {
        pairs: 1,
        rate: 20.0,
        seconds: 0.5,
        body_bytes: 0,
        drain: drain(),
    };
    let r = scenarios::chat(&t, &p).await.expect("chat runs");
    check_report(&r.report(), "chat");
    assert_eq!(r.sent, 10);
    assert!(r.complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_tiny_run_delivers_to_every_device() {
    let b = TestBroker::start().await;
    let t = target(&b);
    let p = FanoutParams {
        members: 5,
        devices: 2,
        rate: 20.0,
        seconds: 0.5,
        body_bytes: 16,
        drain: drain(),
    };
    let r = scenarios::fanout(&t, &p).await.expect("fanout runs");
    check_report(&r.report(), "fanout");
    assert_eq!(r.sent, 10);
    assert_eq!(r.acked, r.sent);
    assert_eq!(r.expected_deliveries, 10 * 5 * 2);
    assert_eq!(r.delivered, r.expected_deliveries);
    check_summary("ack", &r.ack, r.sent);
    check_summary("deliver", &r.deliver, r.delivered);
    assert!(r.deliveries_per_s > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_tiny_run_replays_exactly_the_missed_messages() {
    let b = TestBroker::start().await;
    let t = target(&b);
    let p = ResumeParams {
        devices: 3,
        missed: 10,
        body_bytes: 16,
    };
    let r = scenarios::resume(&t, &p).await.expect("resume runs");
    check_report(&r.report(), "resume");
    assert_eq!(r.devices_synced, 3);
    assert_eq!(r.devices_exact, 3);
    assert_eq!(r.resets, 0);
    assert_eq!(r.replayed_messages, 30);
    check_summary("to_sync", &r.to_sync, 3);
    assert!(r.all_synced_s > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tiny_run_opens_every_connection() {
    let b = TestBroker::start().await;
    let t = target(&b);
    let p = IdleParams {
        connections: 5,
        concurrency: 5,
        hold: Duration::from_millis(100),
    };
    let r = scenarios::idle(&t, &p).await.expect("idle runs");
    check_report(&r.report(), "idle");
    assert_eq!(r.opened, 5);
    check_summary("connect", &r.connect, 5);
    assert_eq!(r.broker_pid, Some(std::process::id()));
    assert!(r.rss_before_kib.is_some() && r.rss_after_kib.is_some());
    assert!(r.kib_per_connection.is_some());
    assert!(r.broker_connections.is_some_and(|c| c >= 5), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_refuses_more_connections_than_open_files() {
    let limit = load::procfs::open_file_limit().expect("/proc/self/limits");
    if limit > 10_000_000 {
        return; // unlimited: nothing to refuse
    }
    let err = scenarios::check_fd_budget(limit as usize + 1).expect_err("over the limit");
    assert!(err.to_string().contains("ulimit -n"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tiny_search_runs_its_steps() {
    let b = TestBroker::start().await;
    let t = target(&b);
    let p = MaxParams {
        pairs: 1,
        start_rate: 10.0,
        // Generous so both steps usually pass; the test does not depend on it.
        p99_ms: 10_000.0,
        step_seconds: 0.5,
        max_steps: 2,
        body_bytes: 16,
        drain: drain(),
    };
    let r = scenarios::max(&t, &p).await.expect("max runs");
    let report = r.report();
    check_report(&report, "max");
    assert_eq!(r.steps.len(), 2);
    assert_eq!(report.steps.len(), 2);
    for s in &r.steps {
        assert_eq!(s.result.errors.count, 0, "{:?}", s.result.errors);
        assert_eq!(s.result.acked, s.result.sent);
        assert_eq!(s.result.delivered, s.result.sent);
        check_summary("ack", &s.result.ack, s.result.sent);
    }
    // The search doubles after a pass and halves after a fail.
    let (a, b2) = (&r.steps[0], &r.steps[1]);
    assert_eq!(a.rate, 10.0);
    assert_eq!(b2.rate, if a.pass { 20.0 } else { 5.0 });
    if r.steps.iter().any(|s| s.pass) {
        assert!(r.best_rate.is_some());
    }
}

#[test]
fn summary_of_an_hdr_histogram_is_ordered() {
    let mut l = load::stats::Latency::new();
    for us in [5u64, 50, 500, 5_000, 50_000] {
        l.record(Duration::from_micros(us));
    }
    let s = l.summary();
    assert_eq!(s.count, 5);
    assert!(s.is_ordered(), "{s:?}");
    assert!((s.max_ms - 50.0).abs() < 0.1, "{s:?}");
    let empty = load::stats::Latency::new().summary();
    assert_eq!(empty.count, 0);
    assert!(empty.is_ordered());
}
