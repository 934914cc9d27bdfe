//! The public protocol, client side, over real sockets (section 1-4 of the contract).
//!
//! - [`Target`]: where the broker is (`ws://` URL, HTTP API URL and key), how to sign
//!   tokens (HS256 secret), which loopback source addresses to bind, which encoding.
//! - [`Target::connect`]: TCP (optionally bound to a source address), WebSocket upgrade with
//!   the subprotocol, `hello` (with `since` for a resume), the replay up to `sync`.
//! - [`Codec`] and [`Incoming`]: one frame out (JSON text or MessagePack binary) and the
//!   few fields of a frame in that the scenarios look at.
//!
//! Nothing here unwraps data from the network: every malformed or missing frame is an
//! error (or a counted anomaly), every wait is bounded by [`Target::timeout`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The development HS256 secret of the embedded config.
pub const DEV_SECRET: &str = "switchboard-dev-secret-change-me";
/// The development API key of the embedded config.
pub const DEV_API_KEY: &str = "switchboard-dev-api-key-change-me";

pub const JSON_PROTO: &str = "switchboard.v1.json";
pub const MSGPACK_PROTO: &str = "switchboard.v1.msgpack";

/// A client WebSocket on plain TCP (loopback only: no TLS).
pub type Ws = WebSocketStream<TcpStream>;

/// Frame encoding, chosen with `Sec-WebSocket-Protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Json,
    Msgpack,
}

impl Codec {
    pub fn proto(self) -> &'static str {
        match self {
            Codec::Json => JSON_PROTO,
            Codec::Msgpack => MSGPACK_PROTO,
        }
    }

    /// One frame: a JSON text frame or a MessagePack (named fields) binary frame.
    pub fn encode<T: Serialize>(self, v: &T) -> Result<Message> {
        Ok(match self {
            Codec::Json => Message::Text(serde_json::to_string(v)?),
            Codec::Msgpack => Message::Binary(rmp_serde::to_vec_named(v)?),
        })
    }

    /// Decodes a data frame; `Ok(None)` for control frames (ping/pong/raw frames);
    /// an error for a close frame or a frame of the wrong kind or shape.
    pub fn decode(self, m: &Message) -> Result<Option<Incoming>> {
        match (self, m) {
            (Codec::Json, Message::Text(t)) => Ok(Some(
                serde_json::from_str(t).context("undecodable JSON frame")?,
            )),
            (Codec::Msgpack, Message::Binary(b)) => Ok(Some(
                rmp_serde::from_slice(b).context("undecodable MessagePack frame")?,
            )),
            (_, Message::Close(c)) => match c {
                Some(c) => bail!("closed by the server: {} {}", u16::from(c.code), c.reason),
                None => bail!("closed by the server (no close code)"),
            },
            (_, Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Ok(None),
            (c, _) => bail!("a frame of the wrong kind for {c:?}"),
        }
    }
}

/// An error object of a reply.
#[derive(Debug, Default, Deserialize, Clone)]
pub struct ErrorBody {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
}

/// The fields of a server frame the scenarios use; everything else is ignored.
#[derive(Debug, Default, Deserialize, Clone)]
pub struct Incoming {
    /// The `id` of the client frame this answers (null on an error to an id-less frame).
    #[serde(default)]
    pub re: Option<u64>,
    #[serde(default)]
    pub ok: Option<bool>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
    /// The event type of a push.
    #[serde(default)]
    pub ev: Option<String>,
    /// Offset of a durable event, or of a `send` reply.
    #[serde(default)]
    pub off: Option<u64>,
    #[serde(default)]
    pub head: Option<u64>,
    #[serde(default)]
    pub conv: Option<String>,
    #[serde(default)]
    pub seq: Option<u64>,
    /// `from` and `device` of a `message` event.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub dup: Option<bool>,
    #[serde(default)]
    pub resumed: Option<bool>,
    #[serde(default)]
    pub reset: Option<bool>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub body: Option<Value>,
}

impl Incoming {
    pub fn is_event(&self, ev: &str) -> bool {
        self.ev.as_deref() == Some(ev)
    }

    /// A one-line description of an error reply.
    pub fn error_text(&self) -> String {
        match &self.error {
            Some(e) => format!("{}: {}", e.code, e.message),
            None => "error reply without an error object".to_string(),
        }
    }
}

/// The body of every message the load tool sends: `s` is the time the send was *scheduled*
/// for, in ns since the run's start instant (one clock, one process), `p` pads it.
#[derive(Debug, Serialize)]
pub struct LoadBody<'a> {
    pub s: u64,
    pub p: &'a str,
}

/// `s` of a received [`LoadBody`], if it is one.
pub fn body_sched_ns(body: &Option<Value>) -> Option<u64> {
    body.as_ref()?.get("s")?.as_u64()
}

/// A `send` frame.
#[derive(Debug, Serialize)]
pub struct SendFrame<'a> {
    pub op: &'static str,
    pub id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv: Option<&'a str>,
    pub cid: String,
    pub body: LoadBody<'a>,
}

/// What a completed `hello` gives.
pub struct Session {
    pub ws: Ws,
    pub codec: Codec,
    /// The hello reply's `head`.
    pub head: u64,
    pub resumed: bool,
    pub reset: bool,
    pub reason: Option<String>,
    /// Every durable event (`ev` with `off`) between the reply and `sync`, in order.
    pub replay: Vec<Incoming>,
    /// The `sync` frame's `head`.
    pub sync_head: u64,
}

/// Where the broker is and how to talk to it.
#[derive(Clone, Debug)]
pub struct Target {
    /// `ws://host:port/path`.
    pub url: String,
    /// `http://host:port` (for `POST /v1/rooms` and `GET /health`).
    pub api_url: String,
    pub api_key: String,
    /// HS256 secret the tokens are signed with.
    pub secret: String,
    /// Loopback source addresses to bind client sockets to, round robin (empty: any).
    pub source_ips: Vec<IpAddr>,
    pub codec: Codec,
    /// The broker's pid, for `/proc` figures (found by the port when absent).
    pub pid: Option<u32>,
    /// Bound of every single wait (connect, upgrade, one frame, one HTTP call).
    pub timeout: Duration,
    next_ip: Arc<AtomicUsize>,
}

impl Target {
    pub fn new(url: &str, api_url: &str, api_key: &str, secret: &str) -> Target {
        Target {
            url: url.to_string(),
            api_url: api_url.trim_end_matches('/').to_string(),
            api_key: api_key.to_string(),
            secret: secret.to_string(),
            source_ips: Vec::new(),
            codec: Codec::Json,
            pid: None,
            timeout: Duration::from_secs(10),
            next_ip: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The socket address of the `ws://` URL (resolved once per call).
    pub async fn ws_addr(&self) -> Result<SocketAddr> {
        let req = self
            .url
            .as_str()
            .into_client_request()
            .with_context(|| format!("bad --url {}", self.url))?;
        let uri = req.uri();
        if uri.scheme_str() != Some("ws") {
            bail!("--url must be ws://host:port/path (the load tool speaks no TLS)");
        }
        let host = uri.host().ok_or_else(|| anyhow!("--url has no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(80);
        let first = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("resolve {host}"))?
            .next();
        first.ok_or_else(|| anyhow!("{host} resolves to nothing"))
    }

    /// An HS256 token `{sub, exp: now + 1 h}`.
    pub fn token(&self, user: &str) -> Result<String> {
        let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
        Ok(jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &json!({"sub": user, "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(self.secret.as_bytes()),
        )?)
    }

    /// TCP connect (bound to the next source address, if any) and WebSocket upgrade.
    pub async fn open(&self, addr: SocketAddr) -> Result<Ws> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if !self.source_ips.is_empty() {
            let i = self.next_ip.fetch_add(1, Ordering::Relaxed) % self.source_ips.len();
            let src = SocketAddr::new(self.source_ips[i], 0);
            socket
                .bind(src)
                .with_context(|| format!("bind the client socket to {src}"))?;
        }
        let tcp = tokio::time::timeout(self.timeout, socket.connect(addr))
            .await
            .map_err(|_| anyhow!("TCP connect to {addr} timed out"))?
            .with_context(|| format!("TCP connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let mut req = self.url.as_str().into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(self.codec.proto()),
        );
        let (ws, _resp) =
            tokio::time::timeout(self.timeout, tokio_tungstenite::client_async(req, tcp))
                .await
                .map_err(|_| anyhow!("WebSocket upgrade timed out"))?
                .context("WebSocket upgrade")?;
        Ok(ws)
    }

    /// Opens a socket and completes `hello` -> (replay) -> `sync` as `user`/`device`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        user: &str,
        device: &str,
        since: Option<u64>,
    ) -> Result<Session> {
        let mut ws = self.open(addr).await?;
        let mut hello = json!({
            "op": "hello", "id": 1, "token": self.token(user)?, "device": device,
            "platform": "server",
        });
        if let Some(s) = since {
            hello["since"] = json!(s);
        }
        ws.send(self.codec.encode(&hello)?).await?;
        let reply = loop {
            let f = next_frame(&mut ws, self.codec, self.timeout).await?;
            if f.re == Some(1) {
                break f;
            }
        };
        if reply.ok != Some(true) {
            bail!("hello as {user}/{device} refused: {}", reply.error_text());
        }
        let head = reply
            .head
            .ok_or_else(|| anyhow!("hello reply without `head`"))?;
        let mut replay = Vec::new();
        let sync_head = loop {
            let f = next_frame(&mut ws, self.codec, self.timeout)
                .await
                .with_context(|| format!("waiting for sync as {user}/{device}"))?;
            if f.is_event("sync") {
                break f.head.unwrap_or(head);
            }
            if f.ev.is_some() && f.off.is_some() {
                replay.push(f);
            }
        };
        Ok(Session {
            ws,
            codec: self.codec,
            head,
            resumed: reply.resumed.unwrap_or(false),
            reset: reply.reset.unwrap_or(false),
            reason: reply.reason,
            replay,
            sync_head,
        })
    }

    fn http(&self) -> Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .no_proxy()
            .timeout(self.timeout)
            .build()?)
    }

    /// `POST /v1/rooms {"id","name","members"}`; 201 expected.
    pub async fn create_room(&self, id: &str, members: &[String]) -> Result<()> {
        let resp = self
            .http()?
            .post(format!("{}/v1/rooms", self.api_url))
            .bearer_auth(&self.api_key)
            .json(&json!({"id": id, "name": id, "members": members}))
            .send()
            .await
            .context("POST /v1/rooms")?;
        let status = resp.status();
        if status.as_u16() != 201 {
            let text = resp.text().await.unwrap_or_default();
            bail!("POST /v1/rooms answered {status}: {text}");
        }
        Ok(())
    }

    /// `GET /health` (no auth), e.g. `{"connections": n, "head": h, ...}`.
    pub async fn health(&self) -> Result<Value> {
        let resp = self
            .http()?
            .get(format!("{}/health", self.api_url))
            .send()
            .await
            .context("GET /health")?;
        if !resp.status().is_success() {
            bail!("GET /health answered {}", resp.status());
        }
        resp.json().await.context("GET /health body")
    }
}

/// The next data frame of `ws`, decoded; control frames are skipped. Bounded by `timeout`.
pub async fn next_frame<S>(ws: &mut S, codec: Codec, timeout: Duration) -> Result<Incoming>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let m = tokio::time::timeout(timeout, ws.next())
            .await
            .map_err(|_| anyhow!("no frame within {timeout:?}"))?
            .ok_or_else(|| anyhow!("socket closed"))??;
        if let Some(f) = codec.decode(&m)? {
            return Ok(f);
        }
    }
}

/// A run-unique lowercase prefix for user ids, cids and rooms, so that runs against one
/// long-lived broker never collide (a repeated `cid` would be answered `dup` and not logged).
pub fn run_prefix() -> String {
    format!("ld{:08x}", rand::random::<u32>())
}

/// `n` bytes of padding for message bodies.
pub fn padding(n: usize) -> String {
    "x".repeat(n)
}
