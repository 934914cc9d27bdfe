//! Shared harness of the black-box integration tests.
//!
//! - [`TestBroker`]: an in-process [`switchboard::Broker`] on `127.0.0.1:0` with its own temp
//!   data dir, a random JWT secret and API key, and a 300 ms presence grace period.
//! - [`ServerProcess`]: the real `switchboard` binary as a child process, configured only
//!   through `SWITCHBOARD_*` variables; it can be SIGKILLed, SIGTERMed and restarted on the
//!   same data dir.
//! - [`Endpoint`]: what both expose: URLs, HS256 tokens, WebSocket clients, the HTTP API.
//! - [`Client`]: a WebSocket client (JSON text or MessagePack binary frames) whose background
//!   reader keeps every frame it receives; every wait is bounded by [`TIMEOUT`], so a missing
//!   frame fails the test instead of hanging it.
//! - [`Http`]: the `/v1` backend API with `Authorization: Bearer <api_key>`.

#![allow(dead_code, clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use switchboard::config::Config;
use switchboard::Broker;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// How long any single expected frame, reply or close may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Presence grace period every test broker runs with.
pub const GRACE_MS: u64 = 300;

pub const JSON_PROTO: &str = "switchboard.v1.json";
pub const MSGPACK_PROTO: &str = "switchboard.v1.msgpack";

/// Fields every hello reply carries.
pub const HELLO_KEYS: &[&str] = &[
    "re", "ok", "user", "device", "session", "head", "resumed", "reset",
];
/// Fields every `message` event carries.
pub const MESSAGE_KEYS: &[&str] = &[
    "ev", "off", "ts", "conv", "seq", "from", "device", "cid", "body",
];
/// Fields every `receipt` event carries.
pub const RECEIPT_KEYS: &[&str] = &["ev", "off", "ts", "conv", "user", "kind", "seq"];

// ---------------------------------------------------------------------------------------------
// small helpers

/// An id unique to this run: lowercase, `prefix-<10 hex>`.
pub fn uid(prefix: &str) -> String {
    format!("{prefix}-{:010x}", rand::random::<u64>() & 0xff_ffff_ffff)
}

/// The id of the direct conversation between two users.
pub fn dm(a: &str, b: &str) -> String {
    if a <= b {
        format!("dm:{a}:{b}")
    } else {
        format!("dm:{b}:{a}")
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Panics unless `v` is an object holding every key of `keys`.
pub fn assert_keys(v: &Value, keys: &[&str]) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    for k in keys {
        assert!(obj.contains_key(*k), "missing `{k}` in {v}");
    }
}

/// Panics unless `reply` is an error reply with `code` and a string message.
pub fn assert_error(reply: &Value, code: &str) {
    assert_eq!(
        reply["ok"],
        json!(false),
        "expected error {code}, got {reply}"
    );
    assert_eq!(
        reply["error"]["code"],
        json!(code),
        "expected error {code}, got {reply}"
    );
    assert!(
        reply["error"]["message"].is_string(),
        "error without message: {reply}"
    );
}

/// Durable pushes carry `ev` and `off`.
pub fn is_durable(f: &Value) -> bool {
    f.get("ev").is_some() && f.get("off").is_some_and(|o| o.is_u64())
}

pub fn off(f: &Value) -> u64 {
    f["off"]
        .as_u64()
        .unwrap_or_else(|| panic!("no u64 `off` in {f}"))
}

pub fn seq(f: &Value) -> u64 {
    f["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no u64 `seq` in {f}"))
}

/// The `message` events of `frames`, optionally only those of `conv`.
pub fn messages<'a>(frames: impl IntoIterator<Item = &'a Value>, conv: Option<&str>) -> Vec<Value> {
    frames
        .into_iter()
        .filter(|f| f["ev"] == "message" && conv.is_none_or(|c| f["conv"] == c))
        .cloned()
        .collect()
}

/// `n` send frames to `to`, cids `<prefix><i>`, bodies `{"i": i}`.
pub fn send_frames(to: &str, prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"op": "send", "to": to, "body": {"i": i}, "cid": format!("{prefix}{i}")}))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// tokens

/// Claims `{sub, iat: now, exp: now + ttl_s}`.
pub fn claims(user: &str, ttl_s: i64) -> Value {
    json!({"sub": user, "iat": now_s(), "exp": now_s() + ttl_s})
}

/// An HS256 JWT of `claims` signed with `secret`.
pub fn mint(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

/// An unsigned `alg: none` token (header.payload. with an empty signature).
pub fn unsigned_token(claims: &Value) -> String {
    let header = json!({"alg": "none", "typ": "JWT"});
    format!(
        "{}.{}.",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// endpoint: what a broker (in process or child process) offers a test

/// The address and credentials of a running broker.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub secret: String,
    pub api_key: String,
}

/// Options of [`Endpoint::connect_with`].
#[derive(Clone, Debug, Default)]
pub struct ConnectOpts {
    pub device: String,
    pub platform: Option<String>,
    pub since: Option<u64>,
    pub msgpack: bool,
    pub contacts: Option<Vec<String>>,
    /// Use this token instead of minting one.
    pub token: Option<String>,
}

impl ConnectOpts {
    pub fn device(device: &str) -> Self {
        ConnectOpts {
            device: device.to_string(),
            ..Default::default()
        }
    }
    pub fn since(mut self, since: u64) -> Self {
        self.since = Some(since);
        self
    }
    pub fn platform(mut self, p: &str) -> Self {
        self.platform = Some(p.to_string());
        self
    }
    pub fn msgpack(mut self) -> Self {
        self.msgpack = true;
        self
    }
    pub fn token(mut self, t: String) -> Self {
        self.token = Some(t);
        self
    }
}

/// Options of [`Endpoint::open_with`].
#[derive(Clone, Debug, Default)]
pub struct OpenOpts {
    /// Offered subprotocols, in order (none: no header).
    pub protocols: Vec<String>,
    pub headers: Vec<(String, String)>,
    /// SO_RCVBUF of the client socket (a small one makes a slow consumer quickly).
    pub recv_buffer: Option<u32>,
}

impl Endpoint {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A valid HS256 token for `user`, one hour.
    pub fn token(&self, user: &str) -> String {
        mint(&self.secret, &claims(user, 3600))
    }

    pub fn token_ttl(&self, user: &str, ttl_s: i64) -> String {
        mint(&self.secret, &claims(user, ttl_s))
    }

    /// The `/v1` API with the right key.
    pub fn http(&self) -> Http {
        Http::new(self.base_url(), Some(self.api_key.clone()))
    }

    /// The API with no Authorization header.
    pub fn http_anonymous(&self) -> Http {
        Http::new(self.base_url(), None)
    }

    pub async fn health(&self) -> Value {
        let r = self.http_anonymous().get("/health").await;
        assert_eq!(r.status, 200, "/health: {}", r.text);
        r.json()
    }

    /// A socket offering only the JSON subprotocol, no hello yet.
    pub async fn open(&self) -> Client {
        self.open_protocols(&[JSON_PROTO]).await
    }

    pub async fn open_protocols(&self, protocols: &[&str]) -> Client {
        let opts = OpenOpts {
            protocols: protocols.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        self.open_with(opts).await.expect("websocket upgrade")
    }

    /// Opens a socket; the error is the handshake failure (e.g. an HTTP 400).
    pub async fn open_with(&self, opts: OpenOpts) -> Result<Client, WsError> {
        Client::open(self.addr, &self.ws_url(), opts).await
    }

    /// Opens a JSON socket and completes hello -> replay -> sync -> presence.snapshot.
    pub async fn connect(&self, user: &str, device: &str) -> Client {
        self.connect_with(user, ConnectOpts::device(device)).await
    }

    pub async fn connect_since(&self, user: &str, device: &str, since: u64) -> Client {
        self.connect_with(user, ConnectOpts::device(device).since(since))
            .await
    }

    pub async fn connect_with(&self, user: &str, o: ConnectOpts) -> Client {
        let proto = if o.msgpack { MSGPACK_PROTO } else { JSON_PROTO };
        let mut c = self.open_protocols(&[proto]).await;
        let token = match o.token {
            Some(t) => t,
            None => {
                let mut cl = claims(user, 3600);
                if let Some(contacts) = &o.contacts {
                    cl["contacts"] = json!(contacts);
                }
                mint(&self.secret, &cl)
            }
        };
        let mut frame = json!({"op": "hello", "id": 1, "token": token, "device": o.device});
        if let Some(p) = &o.platform {
            frame["platform"] = json!(p);
        }
        if let Some(s) = o.since {
            frame["since"] = json!(s);
        }
        c.hello_frame(frame).await;
        c
    }
}

// ---------------------------------------------------------------------------------------------
// in-process broker

/// A [`Broker`] on port 0 with its own data dir (kept alive as long as this value).
pub struct TestBroker {
    broker: Option<Broker>,
    pub ep: Endpoint,
    pub dir: TempDir,
    /// The config it runs on (for a restart on the same dir).
    pub cfg: Config,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

/// In-process brokers running at once in one test binary. sled 0.34 shares a process-wide
/// lock and I/O thread pool between databases; with many brokers flushing at once in one
/// process (e.g. `--test-threads=16`) it was seen to deadlock, so the harness keeps a few.
static BROKER_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

impl std::ops::Deref for TestBroker {
    type Target = Endpoint;
    fn deref(&self) -> &Endpoint {
        &self.ep
    }
}

/// The config every test broker starts from.
pub fn test_config(dir: &TempDir) -> Config {
    let mut cfg = Config::embedded();
    cfg.server.listen = "127.0.0.1:0".to_string();
    cfg.storage.dir = dir.path().join("data");
    cfg.auth.jwt_secret = random_hex();
    cfg.auth.api_key = random_hex();
    cfg.presence.grace_ms = GRACE_MS;
    // The per-session rate limit is off: tests pipeline hundreds of frames; tests/limits.rs
    // turns it on where it is the subject.
    cfg.limits.rate_per_s = 0;
    // No wall-clock schedules: a snapshot or a compaction that happens to fall on a minute
    // boundary mid-test would move the floor or the snapshot a test asserts on (seen in CI:
    // tests/retention.rs found its floor held by a 5-minute compaction's snapshot). Tests
    // take snapshots and compact through the broker when they mean to.
    cfg.snapshot.cron = String::new();
    cfg.retention.cron = String::new();
    cfg
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    /// Starts with the test config adjusted by `f`.
    pub async fn start_with(f: impl FnOnce(&mut Config)) -> TestBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = test_config(&dir);
        f(&mut cfg);
        Self::start_config(dir, cfg).await
    }

    /// Starts on exactly `cfg` (which should point into `dir`).
    pub async fn start_config(dir: TempDir, cfg: Config) -> TestBroker {
        let slot = BROKER_SLOTS.acquire().await.expect("semaphore open");
        let broker = Broker::start(cfg.clone()).await.expect("broker starts");
        let ep = Endpoint {
            addr: broker.local_addr(),
            secret: cfg.auth.jwt_secret.clone(),
            api_key: cfg.auth.api_key.clone(),
        };
        TestBroker {
            broker: Some(broker),
            ep,
            dir,
            cfg,
            _slot: slot,
        }
    }

    /// Shuts down (if still running) and starts again on the same data dir and credentials,
    /// on a new port. The old broker's last tasks may hold the directory for a moment after
    /// shutdown, so a refused open is retried for up to 5 s.
    pub async fn restart(mut self) -> TestBroker {
        self.shutdown().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let broker = loop {
            match Broker::start(self.cfg.clone()).await {
                Ok(broker) => break broker,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart on the same dir: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restart on the same dir after shutdown: {e}"),
            }
        };
        self.ep.addr = broker.local_addr();
        self.broker = Some(broker);
        self
    }

    /// The running broker (panics after [`TestBroker::shutdown`]).
    pub fn broker(&self) -> &Broker {
        self.broker.as_ref().expect("broker is running")
    }

    /// Graceful shutdown (sessions closed with 4000, log flushed).
    pub async fn shutdown(&mut self) {
        if let Some(b) = self.broker.take() {
            tokio::time::timeout(Duration::from_secs(15), b.shutdown())
                .await
                .expect("broker shutdown within 15 s");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket client

type Ws = WebSocketStream<TcpStream>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
}

#[derive(Default)]
struct State {
    /// Every decoded frame, in arrival order.
    all: Vec<Value>,
    /// Text/binary, per frame of `all`.
    kinds: Vec<Option<Kind>>,
    /// Indexes (into `all`) of pushes not yet taken: `ev` frames and `re: null` errors.
    inbox: VecDeque<usize>,
    /// Replies by `re`, as indexes into `all`.
    replies: HashMap<u64, usize>,
    /// Frames that did not decode.
    undecodable: Vec<String>,
    pings: usize,
    /// The close frame's code (None: closed without a code, or not closed).
    close_code: Option<u16>,
    close_reason: String,
    closed: bool,
    /// Why the stream ended, when it was an error.
    error: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change of `state`.
    tick: watch::Sender<u64>,
}

impl Shared {
    fn bump(&self) {
        self.tick.send_modify(|t| *t += 1);
    }
}

/// A WebSocket client that keeps every frame. All methods take `&self`, so a client can be
/// shared (e.g. in an `Arc`) by a task that sends while the test watches.
pub struct Client {
    sink: tokio::sync::Mutex<SplitSink<Ws, Message>>,
    shared: Arc<Shared>,
    pause: watch::Sender<bool>,
    reader: JoinHandle<()>,
    msgpack: bool,
    /// The subprotocol the server echoed.
    pub subprotocol: Option<String>,
    next_id: std::sync::atomic::AtomicU64,
    /// Filled by a successful hello.
    pub hello_reply: Value,
    pub replay: Vec<Value>,
    pub sync: Value,
    pub snapshot: Value,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    async fn open(addr: SocketAddr, url: &str, opts: OpenOpts) -> Result<Client, WsError> {
        let socket = TcpSocket::new_v4()?;
        if let Some(n) = opts.recv_buffer {
            socket.set_recv_buffer_size(n)?;
        }
        let stream = tokio::time::timeout(TIMEOUT, socket.connect(addr))
            .await
            .expect("tcp connect within timeout")?;
        stream.set_nodelay(true)?;
        let mut req = url.into_client_request()?;
        if !opts.protocols.is_empty() {
            req.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(&opts.protocols.join(",")).expect("header value"),
            );
        }
        for (k, v) in &opts.headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes())
                    .expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        let (ws, resp) =
            tokio::time::timeout(TIMEOUT, tokio_tungstenite::client_async(req, stream))
                .await
                .expect("websocket handshake within timeout")?;
        let subprotocol = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let msgpack = subprotocol.as_deref() == Some(MSGPACK_PROTO);
        let (sink, stream) = ws.split();
        let (tick, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            tick,
        });
        let (pause, pause_rx) = watch::channel(false);
        let reader = tokio::spawn(read_loop(stream, shared.clone(), msgpack, pause_rx));
        Ok(Client {
            sink: tokio::sync::Mutex::new(sink),
            shared,
            pause,
            reader,
            msgpack,
            subprotocol,
            next_id: std::sync::atomic::AtomicU64::new(100),
            hello_reply: Value::Null,
            replay: Vec::new(),
            sync: Value::Null,
            snapshot: Value::Null,
        })
    }

    pub fn is_msgpack(&self) -> bool {
        self.msgpack
    }

    // -- sending ---------------------------------------------------------------------------

    /// Encodes `frame` for this socket's subprotocol (text JSON or binary MessagePack).
    pub fn encode(&self, frame: &Value) -> Message {
        if self.msgpack {
            Message::Binary(rmp_serde::to_vec_named(frame).expect("msgpack encode"))
        } else {
            Message::Text(frame.to_string())
        }
    }

    /// Sends a message as is. Errors are returned (the socket may be closed already).
    pub async fn send_raw(&self, msg: Message) -> Result<(), WsError> {
        let mut sink = self.sink.lock().await;
        tokio::time::timeout(TIMEOUT, sink.send(msg))
            .await
            .unwrap_or_else(|_| Err(WsError::Io(std::io::ErrorKind::TimedOut.into())))
    }

    /// Sends a frame as is (no id added).
    pub async fn send(&self, frame: &Value) {
        self.send_raw(self.encode(frame)).await.expect("send frame");
    }

    /// Sends one WebSocket message as the given fragments (first opcode `kind`, then
    /// continuations, FIN on the last).
    pub async fn send_fragments(&self, kind: Kind, parts: &[Vec<u8>]) -> Result<(), WsError> {
        let mut sink = self.sink.lock().await;
        for (i, part) in parts.iter().enumerate() {
            let op = if i == 0 {
                match kind {
                    Kind::Text => OpData::Text,
                    Kind::Binary => OpData::Binary,
                }
            } else {
                OpData::Continue
            };
            let frame = Frame::message(part.clone(), OpCode::Data(op), i + 1 == parts.len());
            sink.feed(Message::Frame(frame)).await?;
        }
        sink.flush().await
    }

    fn fresh_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends `{"op": op, ...fields}` with a fresh id and returns the reply.
    pub async fn request(&self, op: &str, fields: Value) -> Value {
        let mut frame = fields;
        if frame.is_null() {
            frame = json!({});
        }
        frame["op"] = json!(op);
        self.request_frame(frame).await
    }

    /// Sends `frame` (adding an `id` unless it has one) and returns the reply to that id.
    pub async fn request_frame(&self, mut frame: Value) -> Value {
        let id = match frame.get("id").and_then(Value::as_u64) {
            Some(id) => id,
            None => {
                let id = self.fresh_id();
                frame["id"] = json!(id);
                id
            }
        };
        if let Err(e) = self.send_raw(self.encode(&frame)).await {
            panic!(
                "sending {frame} failed: {e} (close {:?})",
                self.close_code()
            );
        }
        self.reply(id, &frame).await.1
    }

    /// A request that must succeed; returns the reply.
    pub async fn ok(&self, op: &str, fields: Value) -> Value {
        let shown = fields.to_string();
        let r = self.request(op, fields).await;
        assert_eq!(r["ok"], json!(true), "{op} {shown} failed: {r}");
        r
    }

    /// A request that must fail with `code`; returns the reply.
    pub async fn err(&self, op: &str, fields: Value, code: &str) -> Value {
        let shown = fields.to_string();
        let r = self.request(op, fields).await;
        assert_eq!(
            r["ok"],
            json!(false),
            "{op} {shown}: expected {code}, got {r}"
        );
        assert_error(&r, code);
        r
    }

    /// Sends `frames` in order keeping at most `window` unanswered; returns the replies in
    /// order. Ids are added.
    pub async fn pipeline(&self, frames: Vec<Value>, window: usize) -> Vec<Value> {
        let mut ids = Vec::with_capacity(frames.len());
        let mut replies = Vec::with_capacity(frames.len());
        for (i, mut frame) in frames.into_iter().enumerate() {
            if i >= window {
                let waiting_for = ids[i - window];
                replies.push(
                    self.reply(waiting_for, &json!({"pipelined id": waiting_for}))
                        .await
                        .1,
                );
            }
            let id = self.fresh_id();
            frame["id"] = json!(id);
            ids.push(id);
            if let Err(e) = self.send_raw(self.encode(&frame)).await {
                panic!(
                    "pipelined send {i} failed: {e} (close {:?})",
                    self.close_code()
                );
            }
        }
        for id in ids.iter().skip(replies.len()) {
            replies.push(self.reply(*id, &json!({"pipelined id": id})).await.1);
        }
        replies
    }

    /// Waits for the reply to a frame sent with `id` by other means (e.g. fragments).
    pub async fn reply_to(&self, id: u64) -> Value {
        self.reply(id, &json!({"id": id})).await.1
    }

    /// Waits for the reply to `id`: (index in `all`, frame).
    async fn reply(&self, id: u64, sent: &Value) -> (usize, Value) {
        let found = self
            .wait(TIMEOUT, |st| {
                st.replies.get(&id).map(|&i| (i, st.all[i].clone()))
            })
            .await;
        match found {
            Ok(Some(x)) => x,
            Ok(None) => panic!(
                "connection closed (code {:?}) before the reply to {sent}; last frames: {}",
                self.close_code(),
                self.tail(6)
            ),
            Err(()) => panic!(
                "no reply to {sent} within {TIMEOUT:?}; last frames: {}",
                self.tail(6)
            ),
        }
    }

    /// Polls `f` on every change of the state until it returns Some, the socket closes
    /// (Ok(None)) or `timeout` passes (Err).
    async fn wait<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&mut State) -> Option<T>,
    ) -> Result<Option<T>, ()> {
        let deadline = Instant::now() + timeout;
        let mut rx = self.shared.tick.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let mut st = self.shared.state.lock().unwrap();
                if let Some(t) = f(&mut st) {
                    return Ok(Some(t));
                }
                if let Some(u) = st.undecodable.first() {
                    panic!("undecodable frame received: {u}");
                }
                if st.closed {
                    return Ok(None);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(());
            }
            match tokio::time::timeout(left, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Ok(None),
                Err(_) => {}
            }
        }
    }

    // -- receiving ---------------------------------------------------------------------------

    /// Takes the first pending push matching `pred` (others stay queued), within `timeout`.
    pub async fn next_push_within(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.take_push(timeout, what, pred).await.1
    }

    async fn take_push(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (usize, Value) {
        let r = self
            .wait(timeout, |st| {
                let pos = st.inbox.iter().position(|&i| pred(&st.all[i]))?;
                let i = st.inbox.remove(pos).unwrap();
                Some((i, st.all[i].clone()))
            })
            .await;
        match r {
            Ok(Some(x)) => x,
            Ok(None) => panic!(
                "closed (code {:?}) while waiting for {what}; last frames: {}",
                self.close_code(),
                self.tail(8)
            ),
            Err(()) => panic!(
                "no {what} within {timeout:?}; last frames: {}",
                self.tail(8)
            ),
        }
    }

    /// The next pending push with `ev` that satisfies `pred`.
    pub async fn next_event(&self, ev: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.next_event_within(TIMEOUT, ev, pred).await
    }

    pub async fn next_event_within(
        &self,
        timeout: Duration,
        ev: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.take_push(timeout, &format!("`{ev}` event"), |f| {
            f["ev"] == ev && pred(f)
        })
        .await
        .1
    }

    /// The next pending `ev` push whose `key` equals `value`.
    pub async fn next_where(&self, ev: &str, key: &str, value: impl Into<Value>) -> Value {
        let value = value.into();
        let what = format!("`{ev}` event with {key} = {value}");
        self.take_push(TIMEOUT, &what, |f| f["ev"] == ev && f[key] == value)
            .await
            .1
    }

    /// The `message` event with this `cid`.
    pub async fn next_message(&self, cid: &str) -> Value {
        self.next_where("message", "cid", cid).await
    }

    /// Waits until `cond` holds over all frames received so far.
    pub async fn wait_frames(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&[Value]) -> bool,
    ) {
        match self.wait(timeout, |st| cond(&st.all).then_some(())).await {
            Ok(Some(())) => {}
            Ok(None) => panic!(
                "closed (code {:?}) while waiting for {what}",
                self.close_code()
            ),
            Err(()) => panic!(
                "{what}: not within {timeout:?}; last frames: {}",
                self.tail(8)
            ),
        }
    }

    /// Every frame received so far, in arrival order.
    pub fn all(&self) -> Vec<Value> {
        self.shared.state.lock().unwrap().all.clone()
    }

    /// Index of the first frame equal to `f` (frames carrying `off` are unique).
    pub fn index_of(&self, f: &Value) -> usize {
        let st = self.shared.state.lock().unwrap();
        st.all
            .iter()
            .position(|x| x == f)
            .unwrap_or_else(|| panic!("frame not received: {f}"))
    }

    /// Frames received before `f`.
    pub fn before(&self, f: &Value) -> Vec<Value> {
        let i = self.index_of(f);
        self.all()[..i].to_vec()
    }

    /// Frames received after `f`.
    pub fn after(&self, f: &Value) -> Vec<Value> {
        let i = self.index_of(f);
        self.all()[i + 1..].to_vec()
    }

    /// Every received frame with `ev` (taken or not).
    pub fn find(&self, ev: &str) -> Vec<Value> {
        self.all().into_iter().filter(|f| f["ev"] == ev).collect()
    }

    /// Text/binary of every data frame received (undecodable ones included).
    pub fn kinds(&self) -> Vec<Kind> {
        self.shared
            .state
            .lock()
            .unwrap()
            .kinds
            .iter()
            .flatten()
            .copied()
            .collect()
    }

    pub fn pings(&self) -> usize {
        self.shared.state.lock().unwrap().pings
    }

    fn tail(&self, n: usize) -> String {
        let st = self.shared.state.lock().unwrap();
        let from = st.all.len().saturating_sub(n);
        let frames: Vec<String> = st.all[from..]
            .iter()
            .map(|f| {
                let s = f.to_string();
                if s.len() > 300 {
                    format!("{}...", &s[..300])
                } else {
                    s
                }
            })
            .collect();
        format!(
            "[{}] (of {}, closed={}, close code {:?}, error {:?})",
            frames.join(", "),
            st.all.len(),
            st.closed,
            st.close_code,
            st.error
        )
    }

    // -- closing -------------------------------------------------------------------------------

    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().unwrap().closed
    }

    pub fn close_code(&self) -> Option<u16> {
        self.shared.state.lock().unwrap().close_code
    }

    pub fn close_reason(&self) -> String {
        self.shared.state.lock().unwrap().close_reason.clone()
    }

    /// Waits (at most [`TIMEOUT`]) until the server closes; returns the close code.
    pub async fn wait_closed(&self) -> Option<u16> {
        self.wait_closed_within(TIMEOUT).await
    }

    pub async fn wait_closed_within(&self, timeout: Duration) -> Option<u16> {
        match self.wait(timeout, |_| None::<()>).await {
            Ok(_) => self.close_code(),
            Err(()) => panic!(
                "socket not closed within {timeout:?}; last frames: {}",
                self.tail(4)
            ),
        }
    }

    /// Closes from our side (normal closure) and waits for the end of the stream.
    pub async fn close(&self) {
        let _ = self.send_raw(Message::Close(None)).await;
        let _ = self.wait(TIMEOUT, |_| None::<()>).await;
    }

    /// Stops reading from the socket (pings go unanswered, the server's writes back up).
    pub fn pause_reading(&self) {
        self.pause.send_replace(true);
    }

    pub fn resume_reading(&self) {
        self.pause.send_replace(false);
    }

    // -- hello ---------------------------------------------------------------------------------

    /// Says hello with `token` (None: rely on the upgrade's Authorization header), no
    /// platform, and `since`; reads the reply, the replay, `sync`, `presence.snapshot`.
    pub async fn hello(&mut self, token: Option<&str>, device: &str, since: Option<u64>) -> Value {
        let mut frame = json!({"op": "hello", "id": 1, "device": device});
        if let Some(t) = token {
            frame["token"] = json!(t);
        }
        if let Some(s) = since {
            frame["since"] = json!(s);
        }
        self.hello_frame(frame).await
    }

    /// Sends a hello frame (must have an id) and checks the session start: the reply is
    /// the first frame, then only durable events (the replay), `sync`, `presence.snapshot`.
    pub async fn hello_frame(&mut self, frame: Value) -> Value {
        let id = frame["id"].as_u64().expect("hello frame needs an id");
        self.send_raw(self.encode(&frame))
            .await
            .expect("send hello");
        let (ri, reply) = self.reply(id, &frame).await;
        assert_eq!(reply["ok"], json!(true), "hello failed: {reply}");
        assert_eq!(
            ri,
            0,
            "the hello reply was not the first frame: {}",
            self.tail(4)
        );
        let (si, sync) = self
            .take_push(TIMEOUT, "`sync` after hello", |f| f["ev"] == "sync")
            .await;
        let replay: Vec<Value> = {
            let mut st = self.shared.state.lock().unwrap();
            st.inbox.retain(|&i| !(ri < i && i < si));
            st.all[ri + 1..si].to_vec()
        };
        for f in &replay {
            assert!(is_durable(f), "non-durable frame inside the replay: {f}");
        }
        let snapshot = self
            .take_push(TIMEOUT, "`presence.snapshot` after sync", |f| {
                f["ev"] == "presence.snapshot"
            })
            .await
            .1;
        self.hello_reply = reply.clone();
        self.replay = replay;
        self.sync = sync;
        self.snapshot = snapshot;
        reply
    }
}

async fn read_loop(
    mut stream: SplitStream<Ws>,
    shared: Arc<Shared>,
    msgpack: bool,
    mut pause: watch::Receiver<bool>,
) {
    loop {
        while *pause.borrow_and_update() {
            if pause.changed().await.is_err() {
                return;
            }
        }
        let item = stream.next().await;
        let go_on = handle_incoming(&shared, item, msgpack);
        shared.bump();
        if !go_on {
            return;
        }
    }
}

/// Records one item of the stream; false when the stream has ended.
fn handle_incoming(shared: &Shared, item: Option<Result<Message, WsError>>, msgpack: bool) -> bool {
    let mut st = shared.state.lock().unwrap();
    match item {
        Some(Ok(Message::Text(t))) => {
            st.kinds.push(Some(Kind::Text));
            match serde_json::from_str::<Value>(&t) {
                Ok(v) => record(&mut st, v),
                Err(e) => st.undecodable.push(format!("text {t:.200}: {e}")),
            }
        }
        Some(Ok(Message::Binary(b))) => {
            st.kinds.push(Some(Kind::Binary));
            let decoded = if msgpack {
                rmp_serde::from_slice::<Value>(&b).map_err(|e| e.to_string())
            } else {
                serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string())
            };
            match decoded {
                Ok(v) => record(&mut st, v),
                Err(e) => st
                    .undecodable
                    .push(format!("binary of {} bytes: {e}", b.len())),
            }
        }
        Some(Ok(Message::Ping(_))) => st.pings += 1,
        Some(Ok(Message::Pong(_))) | Some(Ok(Message::Frame(_))) => {}
        Some(Ok(Message::Close(cf))) => {
            if let Some(cf) = cf {
                st.close_code = Some(u16::from(cf.code));
                st.close_reason = cf.reason.to_string();
            }
            st.closed = true;
        }
        Some(Err(e)) => {
            st.error = Some(e.to_string());
            st.closed = true;
            return false;
        }
        None => {
            st.closed = true;
            return false;
        }
    }
    true
}

fn record(st: &mut State, v: Value) {
    let i = st.all.len();
    let reply_to = match (&v.get("re"), v.get("ev")) {
        (Some(re), None) => re.as_u64(),
        _ => None,
    };
    st.all.push(v);
    match reply_to {
        Some(id) => {
            st.replies.insert(id, i);
        }
        None => st.inbox.push_back(i),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP API

/// A reqwest client for one broker, optionally with the API key.
pub struct Http {
    client: reqwest::Client,
    base: String,
    key: Option<String>,
}

/// Status, headers and body of one HTTP answer.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub text: String,
}

impl HttpReply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!("HTTP {} body is not JSON ({e}): {}", self.status, self.text)
        })
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Asserts the status and the `{"error":{"code","message"}}` shape.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status, status,
            "expected HTTP {status} {code}, got: {}",
            self.text
        );
        let v = self.json();
        assert_eq!(v["error"]["code"], json!(code), "error body: {v}");
        assert!(
            v["error"]["message"].is_string(),
            "error body without message: {v}"
        );
    }
}

impl Http {
    pub fn new(base: String, key: Option<String>) -> Http {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("reqwest client");
        Http { client, base, key }
    }

    /// The same base URL with another bearer key.
    pub fn with_key(&self, key: &str) -> Http {
        Http::new(self.base.clone(), Some(key.to_string()))
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> HttpReply {
        let mut req = self
            .client
            .request(method.clone(), format!("{}{}", self.base, path));
        if let Some(k) = &self.key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} body: {e}"));
        HttpReply {
            status,
            content_type,
            text,
        }
    }

    pub async fn get(&self, path: &str) -> HttpReply {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> HttpReply {
        self.send(
            reqwest::Method::POST,
            path,
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    pub async fn post_raw(&self, path: &str, body: &[u8]) -> HttpReply {
        self.send(reqwest::Method::POST, path, Some(body.to_vec()))
            .await
    }

    pub async fn put(&self, path: &str) -> HttpReply {
        self.send(reqwest::Method::PUT, path, None).await
    }

    pub async fn delete(&self, path: &str) -> HttpReply {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    /// `POST /v1/rooms`, asserting 201; returns the bare room id.
    pub async fn create_room(&self, name: &str, members: &[&str]) -> String {
        let room = uid("room");
        let r = self
            .post(
                "/v1/rooms",
                json!({"id": room, "name": name, "members": members}),
            )
            .await;
        assert_eq!(r.status, 201, "create room: {}", r.text);
        room
    }
}

// ---------------------------------------------------------------------------------------------
// the real binary

/// The `switchboard` binary path.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_switchboard")
}

/// `switchboard serve` as a child process on 127.0.0.1:0, configured through the environment
/// only. Restartable on the same data dir. Killed (SIGKILL) when dropped.
pub struct ServerProcess {
    pub dir: TempDir,
    pub data_dir: PathBuf,
    pub secret: String,
    pub api_key: String,
    pub extra_env: Vec<(String, String)>,
    /// Arguments after `serve` (e.g. `--config FILE`).
    pub serve_args: Vec<String>,
    child: Option<tokio::process::Child>,
    addr: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The `addr=IP:PORT` of a `listening` log line.
fn parse_listen_line(line: &str) -> Option<SocketAddr> {
    let line = strip_ansi(line);
    if !line.contains("listening") {
        return None;
    }
    let at = line.find("addr=")? + "addr=".len();
    let rest = line[at..].trim_start_matches('"');
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '}')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl ServerProcess {
    pub fn new() -> ServerProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        ServerProcess {
            dir,
            data_dir,
            secret: random_hex(),
            api_key: random_hex(),
            extra_env: Vec::new(),
            serve_args: Vec::new(),
            child: None,
            addr: None,
            log: Arc::new(Mutex::new(String::new())),
        }
    }

    /// The configuration environment: the section 9 variables, nothing inherited.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "SWITCHBOARD_SERVER__LISTEN".to_string(),
                "127.0.0.1:0".to_string(),
            ),
            (
                "SWITCHBOARD_STORAGE__DIR".to_string(),
                self.data_dir.display().to_string(),
            ),
            (
                "SWITCHBOARD_AUTH__JWT_SECRET".to_string(),
                self.secret.clone(),
            ),
            (
                "SWITCHBOARD_AUTH__API_KEY".to_string(),
                self.api_key.clone(),
            ),
            (
                "SWITCHBOARD_PRESENCE__GRACE_MS".to_string(),
                GRACE_MS.to_string(),
            ),
            (
                "SWITCHBOARD_LOG__DURABILITY".to_string(),
                "flush".to_string(),
            ),
            (
                "SWITCHBOARD_LOGGING__FORMAT".to_string(),
                "text".to_string(),
            ),
            // as in test_config: the rate limit is the subject of tests/limits.rs only
            (
                "SWITCHBOARD_LIMITS__RATE_PER_S".to_string(),
                "0".to_string(),
            ),
            // as in test_config: no wall-clock snapshot or compaction schedule
            ("SWITCHBOARD_SNAPSHOT__CRON".to_string(), String::new()),
            ("SWITCHBOARD_RETENTION__CRON".to_string(), String::new()),
        ];
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// A command for the binary with `args`, this environment and the temp dir as cwd.
    pub fn command(&self, args: &[&str], extra: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bin());
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("NO_COLOR", "1");
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Starts (or restarts on the same data dir); returns once `/health` answers 200.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.log.lock().unwrap().push_str("--- start\n");
        let mut args = vec!["serve"];
        args.extend(self.serve_args.iter().map(String::as_str));
        let mut child = self
            .command(&args, &[])
            .spawn()
            .expect("spawn switchboard serve");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        for pipe in [
            Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(stderr),
        ] {
            let (log, tx) = (self.log.clone(), tx.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(a) = parse_listen_line(&line) {
                        let _ = tx.send(a);
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        drop(tx);
        let addr = match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Some(a)) => a,
            Ok(None) => {
                let status = child.wait().await;
                panic!(
                    "server exited ({status:?}) without a `listening addr=` line:\n{}",
                    self.log()
                )
            }
            Err(_) => {
                let _ = child.start_kill();
                panic!("no `listening addr=` line within 20 s:\n{}", self.log())
            }
        };
        self.child = Some(child);
        self.addr = Some(addr);
        let http = self.ep().http_anonymous();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = http
                .client
                .get(format!("{}/health", http.base))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .map(|r| r.status().as_u16() == 200)
                .unwrap_or(false);
            if ok {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("server exited with {st} during startup:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "/health not 200 within 20 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The running server's endpoint (its address changes with every start).
    pub fn ep(&self) -> Endpoint {
        Endpoint {
            addr: self.addr.expect("server not started"),
            secret: self.secret.clone(),
            api_key: self.api_key.clone(),
        }
    }

    /// The value of the first `/metrics` line starting with `name` (a metric name, with its
    /// labels if it has any).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.ep().base_url()))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }

    /// SIGTERM, a clean exit, then `switchboard log verify` on the data directory passes.
    pub async fn stop_and_verify(&mut self) {
        self.send_sigterm();
        assert!(self.wait_exit(Duration::from_secs(20)).await.success());
        let dir = self.data_dir.display().to_string();
        let (st, out, err) = run_to_end(
            self.command(&["log", "verify", "--dir", &dir], &[]),
            Duration::from_secs(60),
        )
        .await;
        assert!(st.success(), "log verify: {out}{err}");
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("SIGKILL");
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .expect("running child")
    }

    /// Sends `signal` (a `kill` name such as `HUP`) to the running child.
    pub fn signal(&self, signal: &str) {
        let st = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{signal} failed");
    }

    /// Sends SIGTERM (through `kill -TERM`).
    pub fn send_sigterm(&self) {
        let st = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(st.success(), "kill -TERM failed");
    }

    /// Waits for the child to exit within `timeout`; SIGKILLs and fails otherwise.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running child");
        match tokio::time::timeout(timeout, c.wait()).await {
            Ok(st) => st.expect("wait child"),
            Err(_) => {
                let _ = c.kill().await;
                panic!("server did not exit within {timeout:?}:\n{}", self.log())
            }
        }
    }

    /// Everything the server printed (stdout and stderr), across restarts.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// Runs the binary to completion (bounded); returns (status, stdout, stderr).
pub async fn run_to_end(
    mut cmd: tokio::process::Command,
    timeout: Duration,
) -> (ExitStatus, String, String) {
    let child = cmd.spawn().expect("spawn switchboard");
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.expect("wait for switchboard");
            (
                out.status,
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => panic!("switchboard did not exit within {timeout:?} (kill_on_drop reaps it)"),
    }
}

#[cfg(test)]
mod self_tests {
    use super::*;

    #[test]
    fn b64url_matches_known_vectors() {
        assert_eq!(b64url(b""), "");
        assert_eq!(b64url(b"f"), "Zg");
        assert_eq!(b64url(b"fo"), "Zm8");
        assert_eq!(b64url(b"foo"), "Zm9v");
        assert_eq!(b64url(b"\xfb\xff"), "-_8");
    }

    #[test]
    fn listen_line_is_parsed_with_or_without_colour() {
        let plain =
            "2026-01-01T00:00:00Z  INFO switchboard: listening addr=127.0.0.1:4567 tls=false";
        assert_eq!(
            parse_listen_line(plain),
            Some("127.0.0.1:4567".parse().unwrap())
        );
        let coloured = "\u{1b}[32m INFO\u{1b}[0m listening \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:80";
        assert_eq!(
            parse_listen_line(coloured),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            parse_listen_line("listening addr=\"127.0.0.1:9\""),
            Some("127.0.0.1:9".parse().unwrap())
        );
        assert_eq!(parse_listen_line("starting addr=127.0.0.1:9"), None);
    }
}

// ---------------------------------------------------------------------------------------------
// added for the presence and HTTP API tests

impl ConnectOpts {
    /// Puts a `contacts` claim with these user ids in the minted token.
    pub fn contacts(mut self, contacts: &[&str]) -> Self {
        self.contacts = Some(contacts.iter().map(|c| c.to_string()).collect());
        self
    }
}

/// Status, content type and raw body of one HTTP answer (for non-text bodies).
#[derive(Debug)]
pub struct HttpBytes {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Http {
    /// `PUT` with a JSON body.
    pub async fn put_json(&self, path: &str, body: Value) -> HttpReply {
        self.send(
            reqwest::Method::PUT,
            path,
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    /// `POST` with no body at all.
    pub async fn post_empty(&self, path: &str) -> HttpReply {
        self.send(reqwest::Method::POST, path, None).await
    }

    /// `GET` with an `Accept` header; the body is kept as bytes.
    pub async fn get_bytes(&self, path: &str, accept: &str) -> HttpBytes {
        let mut req = self
            .client
            .get(format!("{}{}", self.base, path))
            .header("Accept", accept);
        if let Some(k) = &self.key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("GET {path} body: {e}"))
            .to_vec();
        HttpBytes {
            status,
            content_type,
            body,
        }
    }
}

pub mod push_mock;
