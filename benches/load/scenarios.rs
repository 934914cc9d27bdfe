//! The five scenarios. Each takes a [`Target`] and bounded parameters, runs against the
//! broker over real sockets, and returns a typed result that converts into a [`Report`].
//!
//! Open loop (`chat`, `fanout`, `max`): every send has a scheduled instant on a fixed
//! timetable (`t0 + phase + k * interval`); a sender that falls behind sends at once but
//! latency is still measured from the *scheduled* instant, so a stalled broker shows up in
//! the percentiles instead of slowing the load down (no coordinated omission). The body of
//! every message carries its scheduled instant (`{"s": ns since t0}`), and the ack's `re` is
//! `k + FIRST_ID`, so both send->ack and send->deliver are measured without shared maps.
//! `client lag` reports how late the client itself was against the timetable (tokio's
//! timer has 1 ms resolution): it is part of every latency figure and bounds what the
//! client adds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use super::client::{
    body_sched_ns, next_frame, padding, run_prefix, Codec, LoadBody, SendFrame, Session, Target, Ws,
};
use super::procfs;
use super::report::{Errors, Report};
use super::stats::{r3, Latency, Summary};

/// The `id` of the first `send` of a sender (1 is the hello).
const FIRST_ID: u64 = 2;
/// Connections being opened at once during setup.
const SETUP_CONCURRENCY: usize = 64;
/// Delay between the end of setup and the first scheduled send.
const START_DELAY: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// shared plumbing

/// The broker's pid: `--pid`, else the process listening on the URL's port.
pub async fn broker_pid(t: &Target) -> Option<u32> {
    if t.pid.is_some() {
        return t.pid;
    }
    let addr = t.ws_addr().await.ok()?;
    tokio::task::spawn_blocking(move || procfs::find_listener(addr.port()))
        .await
        .ok()
        .flatten()
}

/// Broker CPU seconds used between two samples, and per delivered item (µs).
fn cpu_figures(
    pid: Option<u32>,
    before: Option<f64>,
    delivered: u64,
) -> (Option<f64>, Option<f64>) {
    let after = pid.and_then(procfs::cpu_seconds);
    match (before, after) {
        (Some(b), Some(a)) => {
            let s = (a - b).max(0.0);
            let per = (delivered > 0).then(|| r3(s * 1e6 / delivered as f64));
            (Some(r3(s)), per)
        }
        _ => (None, None),
    }
}

/// Opens `who.len()` sessions concurrently (at most [`SETUP_CONCURRENCY`] at a time),
/// returned in the order of `who`.
async fn connect_all(
    t: &Target,
    addr: SocketAddr,
    who: &[(String, String)],
) -> Result<Vec<Session>> {
    let mut out: Vec<Option<Session>> = (0..who.len()).map(|_| None).collect();
    let mut stream = futures_util::stream::iter(who.iter().enumerate().map(|(i, (u, d))| {
        let t = t.clone();
        async move { (i, t.connect(addr, u, d, None).await) }
    }))
    .buffer_unordered(SETUP_CONCURRENCY);
    while let Some((i, r)) = stream.next().await {
        out[i] = Some(r.with_context(|| format!("connect {}/{}", who[i].0, who[i].1))?);
    }
    out.into_iter()
        .map(|s| s.ok_or_else(|| anyhow!("a session was not opened")))
        .collect()
}

/// Counters one connection's tasks share with the run's coordinator.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    /// Latest delivery, ns after t0.
    last_delivery_ns: AtomicU64,
}

/// The timetable of one open-loop sender: send `k` is due at `t0 + phase + k * interval`.
#[derive(Clone, Copy, Debug)]
struct Timetable {
    t0: Instant,
    phase_ns: u64,
    interval_ns: u64,
    count: u64,
}

impl Timetable {
    fn due_ns(&self, k: u64) -> u64 {
        self.phase_ns + k * self.interval_ns
    }
    fn due(&self, k: u64) -> Instant {
        self.t0 + Duration::from_nanos(self.due_ns(k))
    }
}

/// Where a sender sends.
#[derive(Clone, Debug)]
enum Dest {
    User(String),
    Conv(String),
}

/// One open-loop sender: sends on the timetable; returns its sink and the lag histogram.
async fn run_sender(
    mut sink: SplitSink<Ws, Message>,
    codec: Codec,
    tt: Timetable,
    dest: Dest,
    pad: Arc<String>,
    counters: Arc<Counters>,
) -> (SplitSink<Ws, Message>, Latency, Errors) {
    let mut lag = Latency::new();
    let mut errors = Errors::default();
    for k in 0..tt.count {
        let due = tt.due(k);
        tokio::time::sleep_until(due.into()).await;
        lag.record(Instant::now().saturating_duration_since(due));
        let Ok(id) = u32::try_from(k + FIRST_ID) else {
            errors.push("more sends than frame ids");
            break;
        };
        let (to, conv) = match &dest {
            Dest::User(u) => (Some(u.as_str()), None),
            Dest::Conv(c) => (None, Some(c.as_str())),
        };
        let frame = SendFrame {
            op: "send",
            id,
            to,
            conv,
            cid: format!("c{k}"),
            body: LoadBody {
                s: tt.due_ns(k),
                p: pad.as_str(),
            },
        };
        let msg = match codec.encode(&frame) {
            Ok(m) => m,
            Err(e) => {
                errors.push(format!("encode send: {e}"));
                break;
            }
        };
        if let Err(e) = sink.send(msg).await {
            errors.push(format!("send: {e}"));
            break;
        }
        counters.sent.fetch_add(1, Ordering::Relaxed);
    }
    (sink, lag, errors)
}

/// What a reader measured.
#[derive(Default)]
struct ReaderOut {
    ack: Latency,
    deliver: Latency,
    errors: Errors,
    dups: u64,
    /// Own messages echoed back to the sending device (Switchboard does that, the
    /// contract's text does not); not counted as deliveries.
    echoes: u64,
}

/// One reader's view: its connection's identity and what it measures.
struct ReaderSpec {
    codec: Codec,
    /// `(user, device)` of this connection: a message from it is an echo, not a delivery.
    me: (String, String),
    /// The timetable of this connection's own sends (for acks), if it sends.
    tt: Option<Timetable>,
    t0: Instant,
    /// Count deliveries in this conversation only (any when `None`).
    conv: Option<String>,
}

/// Reads one connection until `stop`: acks of its own sends (by `re`, against `tt`) and
/// `message` deliveries from other devices.
async fn run_reader(
    mut stream: SplitStream<Ws>,
    spec: ReaderSpec,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) -> (SplitStream<Ws>, ReaderOut) {
    let ReaderSpec {
        codec,
        me,
        tt,
        t0,
        conv,
    } = spec;
    let mut out = ReaderOut::default();
    loop {
        let m = tokio::select! {
            _ = stop.changed() => break,
            m = stream.next() => m,
        };
        let m = match m {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                out.errors.push(format!("read: {e}"));
                break;
            }
            None => {
                out.errors.push("socket closed by the server");
                break;
            }
        };
        let f = match codec.decode(&m) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                out.errors.push(format!("{e:#}"));
                break;
            }
        };
        let now = Instant::now();
        if let Some(re) = f.re {
            if f.ok != Some(true) {
                out.errors
                    .push(format!("reply to {re}: {}", f.error_text()));
                continue;
            }
            if f.dup == Some(true) {
                out.dups += 1;
            }
            if let Some(tt) = tt.filter(|_| re >= FIRST_ID) {
                out.ack
                    .record(now.saturating_duration_since(tt.due(re - FIRST_ID)));
                counters.acked.fetch_add(1, Ordering::Relaxed);
            }
        } else if f.ok == Some(false) {
            out.errors.push(format!("error frame: {}", f.error_text()));
        } else if f.is_event("message")
            && conv.as_deref().is_none_or(|c| f.conv.as_deref() == Some(c))
        {
            let Some(s) = body_sched_ns(&f.body) else {
                continue; // not one of ours
            };
            if f.from.as_deref() == Some(me.0.as_str())
                && f.device.as_deref() == Some(me.1.as_str())
            {
                out.echoes += 1;
                continue;
            }
            let due = t0 + Duration::from_nanos(s);
            out.deliver.record(now.saturating_duration_since(due));
            counters.delivered.fetch_add(1, Ordering::Relaxed);
            let at = u64::try_from(now.saturating_duration_since(t0).as_nanos()).unwrap_or(0);
            counters.last_delivery_ns.fetch_max(at, Ordering::Relaxed);
        }
    }
    (stream, out)
}

/// Waits until `done()` or `limit`, polling every 10 ms. True when done.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn sum(cs: &[Arc<Counters>], f: impl Fn(&Counters) -> u64) -> u64 {
    cs.iter().map(|c| f(c)).sum()
}

// ---------------------------------------------------------------------------------------------
// chat

/// `chat`: `pairs` pairs of users, both sides sending to each other, `rate` messages/s in
/// total, for `seconds`.
#[derive(Clone, Debug)]
pub struct ChatParams {
    pub pairs: usize,
    /// Total sends per second over all senders.
    pub rate: f64,
    pub seconds: f64,
    pub body_bytes: usize,
    /// Longest wait for outstanding acks and deliveries after the last send.
    pub drain: Duration,
}

#[derive(Clone, Debug)]
pub struct ChatResult {
    pub params: ChatParams,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub dups: u64,
    /// Own messages echoed to the sending device (not deliveries).
    pub echoes: u64,
    pub errors: Errors,
    pub ack: Summary,
    pub deliver: Summary,
    pub client_lag: Summary,
    pub setup_s: f64,
    /// From t0 to the last delivery.
    pub elapsed_s: f64,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    pub broker_pid: Option<u32>,
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_us_per_delivered: Option<f64>,
}

impl ChatResult {
    /// Every send acked once and delivered once, no error.
    pub fn complete(&self) -> bool {
        self.errors.count == 0
            && self.dups == 0
            && self.acked == self.sent
            && self.delivered == self.sent
    }

    pub fn report(&self) -> Report {
        let mut r = Report::new("chat");
        let p = &self.params;
        r.param("pairs", p.pairs)
            .param("rate", p.rate)
            .param("seconds", p.seconds)
            .param("body_bytes", p.body_bytes);
        self.fill(&mut r);
        r
    }

    fn fill(&self, r: &mut Report) {
        r.result("sent", self.sent)
            .result("acked", self.acked)
            .result("delivered", self.delivered)
            .result("dups", self.dups)
            .result("echoes_to_sender", self.echoes)
            .result("errors", self.errors.count)
            .result("setup_s", r3(self.setup_s))
            .result("elapsed_s", r3(self.elapsed_s))
            .result("sent_per_s", r3(self.sent_per_s))
            .result("delivered_per_s", r3(self.delivered_per_s))
            .result("broker_pid", self.broker_pid)
            .result("broker_cpu_s", self.broker_cpu_s)
            .result(
                "broker_cpu_us_per_delivered",
                self.broker_cpu_us_per_delivered,
            );
        r.latency("send->ack", self.ack)
            .latency("send->deliver", self.deliver)
            .latency("client lag", self.client_lag);
        r.errors = self.errors.lines();
        if self.errors.count == 0 && !self.complete() {
            r.errors.push(format!(
                "incomplete: sent {} acked {} delivered {} dups {}",
                self.sent, self.acked, self.delivered, self.dups
            ));
        }
    }
}

fn check_rate(rate: f64, seconds: f64) -> Result<u64> {
    if !(rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0) {
        bail!("rate must be in (0, 1000000] messages/s");
    }
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
        bail!("seconds must be in (0, 3600]");
    }
    let total = (rate * seconds).ceil() as u64;
    if total > 50_000_000 {
        bail!("rate x seconds = {total} sends; at most 50,000,000 per run");
    }
    Ok(total)
}

pub async fn chat(t: &Target, p: &ChatParams) -> Result<ChatResult> {
    if !(1..=10_000).contains(&p.pairs) {
        bail!("pairs must be 1..=10000");
    }
    check_rate(p.rate, p.seconds)?;
    let addr = t.ws_addr().await?;
    let pid = broker_pid(t).await;
    let prefix = run_prefix();
    let n = 2 * p.pairs;
    let users: Vec<(String, String)> = (0..n)
        .map(|i| {
            let side = if i % 2 == 0 { 'a' } else { 'b' };
            (format!("{prefix}-{side}{}", i / 2), "d1".to_string())
        })
        .collect();
    let setup = Instant::now();
    let sessions = connect_all(t, addr, &users).await?;
    let setup_s = setup.elapsed().as_secs_f64();

    // Sender i sends every n/rate s; sender i's phase is i/rate, so the total is even.
    let interval_ns = (n as f64 * 1e9 / p.rate).round().max(1.0) as u64;
    let spacing_ns = 1e9 / p.rate;
    let horizon_ns = (p.seconds * 1e9) as u64;
    let t0 = Instant::now() + START_DELAY;
    let pad = Arc::new(padding(p.body_bytes));
    let (stop_tx, stop_rx) = watch::channel(false);
    let cpu_before = pid.and_then(procfs::cpu_seconds);

    let mut counters = Vec::with_capacity(n);
    let mut senders = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for (i, s) in sessions.into_iter().enumerate() {
        let phase_ns = (i as f64 * spacing_ns) as u64;
        let count = if phase_ns < horizon_ns {
            (horizon_ns - phase_ns).div_ceil(interval_ns)
        } else {
            0
        };
        let tt = Timetable {
            t0,
            phase_ns,
            interval_ns,
            count,
        };
        let c = Arc::new(Counters::default());
        counters.push(c.clone());
        let (sink, stream) = s.ws.split();
        let peer = users[i ^ 1].0.clone();
        senders.push(tokio::spawn(run_sender(
            sink,
            s.codec,
            tt,
            Dest::User(peer),
            pad.clone(),
            c.clone(),
        )));
        let spec = ReaderSpec {
            codec: s.codec,
            me: users[i].clone(),
            tt: Some(tt),
            t0,
            conv: None,
        };
        readers.push(tokio::spawn(run_reader(stream, spec, c, stop_rx.clone())));
    }

    let mut errors = Errors::default();
    let mut lag = Latency::new();
    let mut sinks = Vec::with_capacity(n);
    for h in senders {
        let (sink, l, e) = h.await.context("sender task")?;
        lag.merge(&l);
        errors.merge(e);
        sinks.push(sink);
    }
    let sent = sum(&counters, |c| c.sent.load(Ordering::Relaxed));
    let drained = wait_until(p.drain, || {
        sum(&counters, |c| c.acked.load(Ordering::Relaxed)) >= sent
            && sum(&counters, |c| c.delivered.load(Ordering::Relaxed)) >= sent
    })
    .await;
    let _ = stop_tx.send(true);
    let mut ack = Latency::new();
    let mut deliver = Latency::new();
    let mut dups = 0;
    let mut echoes = 0;
    for h in readers {
        let (_stream, out) = h.await.context("reader task")?;
        ack.merge(&out.ack);
        deliver.merge(&out.deliver);
        errors.merge(out.errors);
        dups += out.dups;
        echoes += out.echoes;
    }
    drop(sinks);
    let acked = sum(&counters, |c| c.acked.load(Ordering::Relaxed));
    let delivered = sum(&counters, |c| c.delivered.load(Ordering::Relaxed));
    if !drained {
        errors.push(format!(
            "not drained within {:?}: sent {sent}, acked {acked}, delivered {delivered}",
            p.drain
        ));
    }
    let last = counters
        .iter()
        .map(|c| c.last_delivery_ns.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let elapsed_s = (last as f64 / 1e9).max(p.seconds.min(1e-3));
    let (broker_cpu_s, per) = cpu_figures(pid, cpu_before, delivered);
    Ok(ChatResult {
        params: p.clone(),
        sent,
        acked,
        delivered,
        dups,
        echoes,
        errors,
        ack: ack.summary(),
        deliver: deliver.summary(),
        client_lag: lag.summary(),
        setup_s,
        elapsed_s,
        sent_per_s: sent as f64 / p.seconds,
        delivered_per_s: delivered as f64 / elapsed_s,
        broker_pid: pid,
        broker_cpu_s,
        broker_cpu_us_per_delivered: per,
    })
}

// ---------------------------------------------------------------------------------------------
// fanout

/// `fanout`: one sender into a room of `members` users with `devices` devices each.
#[derive(Clone, Debug)]
pub struct FanoutParams {
    pub members: usize,
    pub devices: usize,
    /// Messages per second from the one sender.
    pub rate: f64,
    pub seconds: f64,
    pub body_bytes: usize,
    pub drain: Duration,
}

#[derive(Clone, Debug)]
pub struct FanoutResult {
    pub params: FanoutParams,
    pub sent: u64,
    pub acked: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    /// Own messages echoed to the sending device (not deliveries).
    pub echoes: u64,
    pub errors: Errors,
    pub ack: Summary,
    pub deliver: Summary,
    pub client_lag: Summary,
    pub setup_s: f64,
    pub elapsed_s: f64,
    pub deliveries_per_s: f64,
    pub broker_pid: Option<u32>,
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_us_per_delivered: Option<f64>,
}

impl FanoutResult {
    pub fn complete(&self) -> bool {
        self.errors.count == 0
            && self.acked == self.sent
            && self.delivered == self.expected_deliveries
    }

    pub fn report(&self) -> Report {
        let mut r = Report::new("fanout");
        let p = &self.params;
        r.param("members", p.members)
            .param("devices", p.devices)
            .param("rate", p.rate)
            .param("seconds", p.seconds)
            .param("body_bytes", p.body_bytes);
        r.result("sent", self.sent)
            .result("acked", self.acked)
            .result("expected_deliveries", self.expected_deliveries)
            .result("delivered", self.delivered)
            .result("echoes_to_sender", self.echoes)
            .result("errors", self.errors.count)
            .result("setup_s", r3(self.setup_s))
            .result("elapsed_s", r3(self.elapsed_s))
            .result("deliveries_per_s", r3(self.deliveries_per_s))
            .result("broker_pid", self.broker_pid)
            .result("broker_cpu_s", self.broker_cpu_s)
            .result(
                "broker_cpu_us_per_delivered",
                self.broker_cpu_us_per_delivered,
            );
        r.latency("send->ack", self.ack)
            .latency("send->deliver", self.deliver)
            .latency("client lag", self.client_lag);
        r.errors = self.errors.lines();
        if self.errors.count == 0 && !self.complete() {
            r.errors.push(format!(
                "incomplete: sent {} acked {} delivered {} of {}",
                self.sent, self.acked, self.delivered, self.expected_deliveries
            ));
        }
        r
    }
}

pub async fn fanout(t: &Target, p: &FanoutParams) -> Result<FanoutResult> {
    if !(1..=100_000).contains(&p.members) || !(1..=100).contains(&p.devices) {
        bail!("members must be 1..=100000 and devices 1..=100");
    }
    if p.members * p.devices > 100_000 {
        bail!("members x devices must be at most 100000");
    }
    check_rate(p.rate, p.seconds)?;
    let addr = t.ws_addr().await?;
    let pid = broker_pid(t).await;
    let prefix = run_prefix();
    let sender = format!("{prefix}-s");
    let members: Vec<String> = (0..p.members).map(|i| format!("{prefix}-m{i}")).collect();
    let room = format!("{prefix}-room");
    let conv = format!("room:{room}");
    let mut all = vec![sender.clone()];
    all.extend(members.iter().cloned());

    let setup = Instant::now();
    t.create_room(&room, &all).await?;
    let mut who = vec![(sender.clone(), "d1".to_string())];
    for m in &members {
        for d in 0..p.devices {
            who.push((m.clone(), format!("d{d}")));
        }
    }
    let sessions = connect_all(t, addr, &who).await?;
    let setup_s = setup.elapsed().as_secs_f64();

    let interval_ns = (1e9 / p.rate).round().max(1.0) as u64;
    let count = ((p.seconds * 1e9) as u64).div_ceil(interval_ns);
    let t0 = Instant::now() + START_DELAY;
    let tt = Timetable {
        t0,
        phase_ns: 0,
        interval_ns,
        count,
    };
    let pad = Arc::new(padding(p.body_bytes));
    let (stop_tx, stop_rx) = watch::channel(false);
    let cpu_before = pid.and_then(procfs::cpu_seconds);

    let mut counters = Vec::with_capacity(who.len());
    let mut readers = Vec::with_capacity(who.len());
    let mut sender_task = None;
    let mut member_sinks = Vec::new();
    for (i, s) in sessions.into_iter().enumerate() {
        let c = Arc::new(Counters::default());
        counters.push(c.clone());
        let (sink, stream) = s.ws.split();
        if i == 0 {
            sender_task = Some(tokio::spawn(run_sender(
                sink,
                s.codec,
                tt,
                Dest::Conv(conv.clone()),
                pad.clone(),
                c.clone(),
            )));
        } else {
            member_sinks.push(sink);
        }
        let spec = ReaderSpec {
            codec: s.codec,
            me: who[i].clone(),
            tt: (i == 0).then_some(tt),
            t0,
            conv: Some(conv.clone()),
        };
        readers.push(tokio::spawn(run_reader(stream, spec, c, stop_rx.clone())));
    }
    let mut errors = Errors::default();
    let mut lag = Latency::new();
    let sender_task = sender_task.ok_or_else(|| anyhow!("no sender session"))?;
    let (sink, l, e) = sender_task.await.context("sender task")?;
    lag.merge(&l);
    errors.merge(e);
    let sent = counters[0].sent.load(Ordering::Relaxed);
    let expected = sent * (p.members * p.devices) as u64;
    let drained = wait_until(p.drain, || {
        counters[0].acked.load(Ordering::Relaxed) >= sent
            && sum(&counters, |c| c.delivered.load(Ordering::Relaxed)) >= expected
    })
    .await;
    let _ = stop_tx.send(true);
    let mut ack = Latency::new();
    let mut deliver = Latency::new();
    let mut echoes = 0;
    for h in readers {
        let (_stream, out) = h.await.context("reader task")?;
        ack.merge(&out.ack);
        deliver.merge(&out.deliver);
        errors.merge(out.errors);
        echoes += out.echoes;
    }
    drop(sink);
    drop(member_sinks);
    let acked = counters[0].acked.load(Ordering::Relaxed);
    let delivered = sum(&counters, |c| c.delivered.load(Ordering::Relaxed));
    if !drained {
        errors.push(format!(
            "not drained within {:?}: sent {sent}, acked {acked}, delivered {delivered} of {expected}",
            p.drain
        ));
    }
    let last = counters
        .iter()
        .map(|c| c.last_delivery_ns.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    let elapsed_s = (last as f64 / 1e9).max(1e-3);
    let (broker_cpu_s, per) = cpu_figures(pid, cpu_before, delivered);
    Ok(FanoutResult {
        params: p.clone(),
        sent,
        acked,
        expected_deliveries: expected,
        delivered,
        echoes,
        errors,
        ack: ack.summary(),
        deliver: deliver.summary(),
        client_lag: lag.summary(),
        setup_s,
        elapsed_s,
        deliveries_per_s: delivered as f64 / elapsed_s,
        broker_pid: pid,
        broker_cpu_s,
        broker_cpu_us_per_delivered: per,
    })
}

// ---------------------------------------------------------------------------------------------
// resume

/// `resume`: `devices` devices (one per user, all in one room with a sender) disconnect,
/// the sender sends `missed` messages into the room, and all devices reconnect at once with
/// `since`.
#[derive(Clone, Debug)]
pub struct ResumeParams {
    pub devices: usize,
    pub missed: usize,
    pub body_bytes: usize,
}

#[derive(Clone, Debug)]
pub struct ResumeResult {
    pub params: ResumeParams,
    /// Devices whose replay held exactly the missed messages, in order.
    pub devices_exact: u64,
    pub devices_synced: u64,
    pub resets: u64,
    pub replayed_messages: u64,
    /// Durable events of other kinds in the replays (e.g. presence changes of room members).
    pub replayed_other: u64,
    pub errors: Errors,
    /// From the common start to the last device's `sync`.
    pub all_synced_s: f64,
    /// Per device: start -> `sync`.
    pub to_sync: Summary,
    pub setup_s: f64,
    pub broker_pid: Option<u32>,
    pub broker_cpu_s: Option<f64>,
    pub broker_cpu_us_per_replayed: Option<f64>,
}

impl ResumeResult {
    pub fn complete(&self) -> bool {
        let k = self.params.devices as u64;
        self.errors.count == 0 && self.devices_exact == k && self.devices_synced == k
    }

    pub fn report(&self) -> Report {
        let mut r = Report::new("resume");
        let p = &self.params;
        r.param("devices", p.devices)
            .param("missed", p.missed)
            .param("body_bytes", p.body_bytes);
        r.result("devices_synced", self.devices_synced)
            .result("devices_exact", self.devices_exact)
            .result("resets", self.resets)
            .result("replayed_messages", self.replayed_messages)
            .result("replayed_other_events", self.replayed_other)
            .result("errors", self.errors.count)
            .result("setup_s", r3(self.setup_s))
            .result("all_synced_s", r3(self.all_synced_s))
            .result("broker_pid", self.broker_pid)
            .result("broker_cpu_s", self.broker_cpu_s)
            .result(
                "broker_cpu_us_per_replayed",
                self.broker_cpu_us_per_replayed,
            );
        r.latency("reconnect->sync", self.to_sync);
        r.errors = self.errors.lines();
        if self.errors.count == 0 && !self.complete() {
            r.errors.push(format!(
                "{} of {} devices synced, {} got exactly the missed messages",
                self.devices_synced, p.devices, self.devices_exact
            ));
        }
        r
    }
}

/// Reads a session for `settle`, returning the largest `off` seen (the device's `since`).
async fn settle_and_close(s: Session, settle: Duration) -> Result<u64> {
    let mut since = s.sync_head.max(s.head);
    let mut ws = s.ws;
    let end = tokio::time::Instant::now() + settle;
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Err(_) => break,
            Ok(None) => bail!("socket closed before the disconnect"),
            Ok(Some(m)) => {
                if let Some(f) = s.codec.decode(&m?)? {
                    if let Some(o) = f.off.filter(|_| f.ev.is_some()) {
                        since = since.max(o);
                    }
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    Ok(since)
}

pub async fn resume(t: &Target, p: &ResumeParams) -> Result<ResumeResult> {
    if !(1..=100_000).contains(&p.devices) || !(1..=1_000_000).contains(&p.missed) {
        bail!("devices must be 1..=100000 and missed 1..=1000000");
    }
    let addr = t.ws_addr().await?;
    let pid = broker_pid(t).await;
    let prefix = run_prefix();
    let sender = format!("{prefix}-s");
    let users: Vec<String> = (0..p.devices).map(|i| format!("{prefix}-r{i}")).collect();
    let room = format!("{prefix}-room");
    let conv = format!("room:{room}");
    let mut all = vec![sender.clone()];
    all.extend(users.iter().cloned());

    let setup = Instant::now();
    t.create_room(&room, &all).await?;
    let mut tx = t.connect(addr, &sender, "d1", None).await?;
    let who: Vec<(String, String)> = users.iter().map(|u| (u.clone(), "d1".into())).collect();
    let sessions = connect_all(t, addr, &who).await?;
    // Everyone online; let the live presence changes arrive, note each device's `since`,
    // then disconnect all of them.
    let mut closing = Vec::with_capacity(sessions.len());
    for s in sessions {
        closing.push(tokio::spawn(settle_and_close(
            s,
            Duration::from_millis(300),
        )));
    }
    let mut since = Vec::with_capacity(closing.len());
    for h in closing {
        since.push(h.await.context("close task")??);
    }

    // The missed messages, pipelined (at most 64 unanswered); their offsets in order.
    let pad = padding(p.body_bytes);
    let mut offs = Vec::with_capacity(p.missed);
    let mut in_flight = 0usize;
    let mut next = 0usize;
    while offs.len() < p.missed {
        while next < p.missed && in_flight < 64 {
            let frame = SendFrame {
                op: "send",
                id: u32::try_from(next as u64 + FIRST_ID)?,
                to: None,
                conv: Some(&conv),
                cid: format!("c{next}"),
                body: LoadBody { s: 0, p: &pad },
            };
            tx.ws.send(tx.codec.encode(&frame)?).await?;
            next += 1;
            in_flight += 1;
        }
        let f = next_frame(&mut tx.ws, tx.codec, t.timeout).await?;
        if let Some(re) = f.re.filter(|re| *re >= FIRST_ID) {
            if f.ok != Some(true) {
                bail!("send {re} refused: {}", f.error_text());
            }
            let off = f.off.ok_or_else(|| anyhow!("send reply without off"))?;
            offs.push(off);
            in_flight -= 1;
        }
    }
    offs.sort_unstable();
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.ws.close(None)).await;
    let setup_s = setup.elapsed().as_secs_f64();

    // All devices at once.
    let cpu_before = pid.and_then(procfs::cpu_seconds);
    let offs = Arc::new(offs);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(users.len());
    for (u, s) in users.iter().zip(since) {
        let (t, u, conv, offs) = (t.clone(), u.clone(), conv.clone(), offs.clone());
        tasks.push(tokio::spawn(async move {
            let r = t.connect(addr, &u, "d1", Some(s)).await;
            let took = start.elapsed();
            r.map(|sess| {
                let got: Vec<u64> = sess
                    .replay
                    .iter()
                    .filter(|f| f.is_event("message") && f.conv.as_deref() == Some(&conv))
                    .filter_map(|f| f.off)
                    .collect();
                let other = (sess.replay.len() - got.len()) as u64;
                (
                    took,
                    sess.reset,
                    got == *offs,
                    got.len() as u64,
                    other,
                    sess,
                )
            })
        }));
    }
    let mut errors = Errors::default();
    let mut to_sync = Latency::new();
    let (mut synced, mut exact, mut resets, mut msgs, mut other) = (0, 0, 0, 0, 0);
    let mut last = Duration::ZERO;
    let mut keep = Vec::with_capacity(tasks.len());
    for h in tasks {
        match h.await.context("resume task")? {
            Ok((took, reset, is_exact, n, o, sess)) => {
                synced += 1;
                to_sync.record(took);
                last = last.max(took);
                resets += u64::from(reset);
                exact += u64::from(is_exact);
                if !is_exact {
                    errors.push(format!(
                        "a device replayed {n} room messages, expected exactly {} (reset {reset})",
                        offs.len()
                    ));
                }
                msgs += n;
                other += o;
                keep.push(sess);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let (broker_cpu_s, per) = cpu_figures(pid, cpu_before, msgs + other);
    drop(keep);
    Ok(ResumeResult {
        params: p.clone(),
        devices_exact: exact,
        devices_synced: synced,
        resets,
        replayed_messages: msgs,
        replayed_other: other,
        errors,
        all_synced_s: last.as_secs_f64(),
        to_sync: to_sync.summary(),
        setup_s,
        broker_pid: pid,
        broker_cpu_s,
        broker_cpu_us_per_replayed: per,
    })
}

// ---------------------------------------------------------------------------------------------
// idle

/// `idle`: `connections` sessions past `hello`, then nothing; the broker's RSS per session.
#[derive(Clone, Debug)]
pub struct IdleParams {
    pub connections: usize,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// How long the sessions stay open (idle) before RSS is read again.
    pub hold: Duration,
}

#[derive(Clone, Debug)]
pub struct IdleResult {
    pub params: IdleParams,
    pub opened: u64,
    pub errors: Errors,
    pub open_s: f64,
    pub opens_per_s: f64,
    /// Per connection: TCP connect -> `sync`.
    pub connect: Summary,
    pub broker_pid: Option<u32>,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub kib_per_connection: Option<f64>,
    /// `/health` `connections` while all were open.
    pub broker_connections: Option<u64>,
    pub broker_cpu_s: Option<f64>,
    pub source_ips: Vec<String>,
}

impl IdleResult {
    pub fn complete(&self) -> bool {
        self.errors.count == 0 && self.opened == self.params.connections as u64
    }

    pub fn report(&self) -> Report {
        let mut r = Report::new("idle");
        let p = &self.params;
        r.param("connections", p.connections)
            .param("concurrency", p.concurrency)
            .param("hold_s", p.hold.as_secs_f64())
            .param("source_ips", json!(self.source_ips));
        r.result("opened", self.opened)
            .result("errors", self.errors.count)
            .result("open_s", r3(self.open_s))
            .result("opens_per_s", r3(self.opens_per_s))
            .result("broker_pid", self.broker_pid)
            .result("broker_connections", self.broker_connections)
            .result("rss_before_kib", self.rss_before_kib)
            .result("rss_after_kib", self.rss_after_kib)
            .result("kib_per_connection", self.kib_per_connection)
            .result("broker_cpu_s", self.broker_cpu_s);
        r.latency("connect->sync", self.connect);
        r.errors = self.errors.lines();
        if self.errors.count == 0 && !self.complete() {
            r.errors.push(format!(
                "opened {} of {}",
                self.opened, self.params.connections
            ));
        }
        r
    }
}

/// Refuses `n` client sockets when the open-file limit cannot hold them.
pub fn check_fd_budget(n: usize) -> Result<()> {
    let Some(limit) = procfs::open_file_limit() else {
        return Ok(());
    };
    let used = procfs::open_files().unwrap_or(0);
    let need = n as u64 + used + 32;
    if need > limit {
        bail!(
            "idle: {n} connections need about {need} open files ({used} already open), but this \
             process may hold at most {limit} (ulimit -n). Lower --connections, or spread the \
             load over several processes (each with its own --source-ips)."
        );
    }
    Ok(())
}

pub async fn idle(t: &Target, p: &IdleParams) -> Result<IdleResult> {
    if !(1..=1_000_000).contains(&p.connections) || !(1..=10_000).contains(&p.concurrency) {
        bail!("connections must be 1..=1000000 and concurrency 1..=10000");
    }
    check_fd_budget(p.connections)?;
    let addr = t.ws_addr().await?;
    let pid = broker_pid(t).await;
    let prefix = run_prefix();
    let rss_before = pid.and_then(procfs::rss_kib);
    let cpu_before = pid.and_then(procfs::cpu_seconds);

    let start = Instant::now();
    let mut errors = Errors::default();
    let mut connect = Latency::new();
    let mut open: Vec<Ws> = Vec::with_capacity(p.connections);
    let mut stream = futures_util::stream::iter((0..p.connections).map(|i| {
        let t = t.clone();
        let user = format!("{prefix}-i{i}");
        async move {
            let at = Instant::now();
            let r = t.connect(addr, &user, "d1", None).await;
            (at.elapsed(), r)
        }
    }))
    .buffer_unordered(p.concurrency);
    while let Some((took, r)) = stream.next().await {
        match r {
            Ok(s) => {
                connect.record(took);
                open.push(s.ws);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    let open_s = start.elapsed().as_secs_f64();
    let opened = open.len() as u64;

    tokio::time::sleep(p.hold).await;
    let broker_connections = t
        .health()
        .await
        .ok()
        .and_then(|h| h.get("connections").and_then(|c| c.as_u64()));
    let rss_after = pid.and_then(procfs::rss_kib);
    let kib_per_connection = match (rss_before, rss_after) {
        (Some(b), Some(a)) if opened > 0 => Some(r3((a as f64 - b as f64) / opened as f64)),
        _ => None,
    };
    let (broker_cpu_s, _) = cpu_figures(pid, cpu_before, 0);
    drop(open);
    Ok(IdleResult {
        params: p.clone(),
        opened,
        errors,
        open_s,
        opens_per_s: opened as f64 / open_s.max(1e-9),
        connect: connect.summary(),
        broker_pid: pid,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        kib_per_connection,
        broker_connections,
        broker_cpu_s,
        source_ips: t.source_ips.iter().map(|i| i.to_string()).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// max

/// `max`: step search for the highest `chat` rate whose send->ack p99 stays under `p99_ms`.
#[derive(Clone, Debug)]
pub struct MaxParams {
    pub pairs: usize,
    pub start_rate: f64,
    pub p99_ms: f64,
    pub step_seconds: f64,
    pub max_steps: usize,
    pub body_bytes: usize,
    pub drain: Duration,
}

#[derive(Clone, Debug)]
pub struct MaxStep {
    pub rate: f64,
    pub pass: bool,
    pub result: ChatResult,
}

#[derive(Clone, Debug)]
pub struct MaxResult {
    pub params: MaxParams,
    pub steps: Vec<MaxStep>,
    /// The highest passing rate (None when no step passed).
    pub best_rate: Option<f64>,
    /// The lowest failing rate above it (None when none failed).
    pub first_fail: Option<f64>,
}

impl MaxResult {
    pub fn report(&self) -> Report {
        let mut r = Report::new("max");
        let p = &self.params;
        r.param("pairs", p.pairs)
            .param("start_rate", p.start_rate)
            .param("p99_ms", p.p99_ms)
            .param("step_seconds", p.step_seconds)
            .param("max_steps", p.max_steps);
        r.result("best_rate", self.best_rate)
            .result("first_failing_rate", self.first_fail)
            .result("steps", self.steps.len());
        if let Some(best) = self
            .steps
            .iter()
            .filter(|s| s.pass)
            .max_by(|a, b| a.rate.total_cmp(&b.rate))
        {
            let res = &best.result;
            r.result("best_delivered_per_s", r3(res.delivered_per_s))
                .result(
                    "best_broker_cpu_us_per_delivered",
                    res.broker_cpu_us_per_delivered,
                );
            r.latency("send->ack @best", res.ack)
                .latency("send->deliver @best", res.deliver);
        }
        for s in &self.steps {
            let c = &s.result;
            r.steps.push(json!({
                "rate": s.rate, "pass": s.pass, "sent": c.sent, "acked": c.acked,
                "delivered": c.delivered, "errors": c.errors.count,
                "ack_p50_ms": c.ack.p50_ms, "ack_p99_ms": c.ack.p99_ms,
                "deliver_p99_ms": c.deliver.p99_ms,
                "delivered_per_s": r3(c.delivered_per_s),
                "broker_cpu_us_per_delivered": c.broker_cpu_us_per_delivered,
            }));
        }
        r
    }
}

/// Doubles the rate while steps pass, halves it while they fail, then bisects between the
/// best pass and the first fail until they are within 10 % or `max_steps` ran. A step
/// passes when every send was acked and delivered once with no error and the p99 of
/// send->ack is at most `p99_ms`.
pub async fn max(t: &Target, p: &MaxParams) -> Result<MaxResult> {
    if !(1..=50).contains(&p.max_steps) {
        bail!("max-steps must be 1..=50");
    }
    if !(p.p99_ms.is_finite() && p.p99_ms > 0.0) {
        bail!("p99-ms must be positive");
    }
    let mut steps: Vec<MaxStep> = Vec::new();
    let (mut lo, mut hi): (Option<f64>, Option<f64>) = (None, None);
    let mut rate = p.start_rate;
    for _ in 0..p.max_steps {
        let cp = ChatParams {
            pairs: p.pairs,
            rate,
            seconds: p.step_seconds,
            body_bytes: p.body_bytes,
            drain: p.drain,
        };
        let res = chat(t, &cp).await?;
        let pass = res.complete() && res.ack.p99_ms <= p.p99_ms;
        steps.push(MaxStep {
            rate,
            pass,
            result: res,
        });
        if pass {
            lo = Some(lo.map_or(rate, |l| l.max(rate)));
        } else {
            hi = Some(hi.map_or(rate, |h| h.min(rate)));
        }
        rate = match (lo, hi) {
            (Some(l), None) => l * 2.0,
            (None, Some(h)) => (h / 2.0).max(1.0),
            (Some(l), Some(h)) => {
                if (h - l) / l <= 0.10 {
                    break;
                }
                ((l + h) / 2.0).round()
            }
            (None, None) => rate,
        };
        if lo.is_none() && hi == Some(1.0) {
            break;
        }
        // Let the broker settle between steps (closed sessions, presence timers).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(MaxResult {
        params: p.clone(),
        steps,
        best_rate: lo,
        first_fail: hi,
    })
}
