//! The gateway: one hyper 1.x listener (optionally TLS) serving WebSocket upgrades at
//! `/ws` and the HTTP API everywhere else.

pub mod auth;
pub mod conn;
pub mod echo;
pub mod rate;
pub mod session;
pub mod tls;
pub mod wire;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::config::Config;
use crate::log::Store;
use crate::protocol::{Codec, ErrorCode, ProtoError};
use crate::sequencer::{Command, Shared};

/// What every connection task shares.
pub struct Gateway {
    pub config: Config,
    pub commands: mpsc::Sender<Command>,
    pub store: Store,
    pub verifier: auth::Verifier,
    pub shared: Arc<Shared>,
    pub prometheus: Option<PrometheusHandle>,
    /// Cancelled when sessions must close with 4000.
    pub shutdown: CancellationToken,
    /// Cancelled when the listener and idle HTTP connections must stop.
    pub stop_http: CancellationToken,
    /// Every connection and session task.
    pub tracker: TaskTracker,
    /// The TLS acceptor of new connections (`None`: plain), swapped by a reload.
    pub tls: std::sync::RwLock<Option<TlsAcceptor>>,
    next_session: AtomicU64,
}

impl Gateway {
    pub fn new(
        config: Config,
        commands: mpsc::Sender<Command>,
        store: Store,
        verifier: auth::Verifier,
        shared: Arc<Shared>,
        prometheus: Option<PrometheusHandle>,
    ) -> Gateway {
        Gateway {
            config,
            commands,
            store,
            verifier,
            shared,
            prometheus,
            shutdown: CancellationToken::new(),
            stop_http: CancellationToken::new(),
            tracker: TaskTracker::new(),
            tls: std::sync::RwLock::new(None),
            next_session: AtomicU64::new(1),
        }
    }
}

pub type Body = Full<Bytes>;

/// Accepts connections until `stop_http` is cancelled.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>) {
    loop {
        let accepted = tokio::select! {
            _ = gw.stop_http.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, _peer)) => {
                let _ = tcp.set_nodelay(true);
                let gw2 = gw.clone();
                // Read per connection: a reload swaps the acceptor for new connections only.
                let tls = gw.tls.read().map(|t| t.clone()).unwrap_or(None);
                gw.tracker.spawn(async move {
                    match tls {
                        Some(acc) => {
                            match tokio::time::timeout(Duration::from_secs(10), acc.accept(tcp))
                                .await
                            {
                                Ok(Ok(stream)) => serve_http(TokioIo::new(stream), gw2).await,
                                Ok(Err(e)) => tracing::debug!(error = %e, "tls handshake failed"),
                                Err(_) => tracing::debug!("tls handshake timed out"),
                            }
                        }
                        None => serve_http(TokioIo::new(tcp), gw2).await,
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_http<I>(io: TokioIo<I>, gw: Arc<Gateway>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_gw = gw.clone();
    let service = service_fn(move |req| {
        let gw = svc_gw.clone();
        async move { Ok::<_, Infallible>(route(req, gw).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(gw.config.server.header_timeout_ms))
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "http connection ended");
            }
        }
        _ = gw.stop_http.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

async fn route(req: Request<Incoming>, gw: Arc<Gateway>) -> Response<Body> {
    match req.uri().path() {
        "/ws" => return upgrade(req, gw, Endpoint::Session),
        "/echo" if gw.config.debug.echo_endpoint => return upgrade(req, gw, Endpoint::Echo),
        _ => {}
    }
    api::handle(req, gw).await
}

/// A JSON error response.
pub fn error_response(e: &ProtoError) -> Response<Body> {
    api::json_response(
        e.code.http_status(),
        &serde_json::json!({"error": {"code": e.code.as_str(), "message": e.message}}),
    )
}

/// What an upgraded connection runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `/ws`: a Switchboard session.
    Session,
    /// `/echo` (`debug.echo_endpoint`): messages sent back as they came.
    Echo,
}

fn upgrade(mut req: Request<Incoming>, gw: Arc<Gateway>, endpoint: Endpoint) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        let mut r = error_response(&ProtoError::bad_request(
            "this path expects a WebSocket upgrade",
        ));
        *r.status_mut() = hyper::StatusCode::UPGRADE_REQUIRED;
        return r;
    }
    let allowed = &gw.config.server.allowed_origins;
    if !allowed.is_empty() {
        let origin = req.headers().get(ORIGIN).and_then(|v| v.to_str().ok());
        if !origin.is_some_and(|o| allowed.iter().any(|a| a == o)) {
            return error_response(&ProtoError::forbidden("origin not allowed"));
        }
    }
    if endpoint == Endpoint::Echo {
        let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
            Ok(x) => x,
            Err(e) => return error_response(&ProtoError::bad_request(e.to_string())),
        };
        let gw2 = gw.clone();
        gw.tracker.spawn(async move {
            match fut.await {
                Ok(ws) => echo::run(ws.into_inner(), gw2).await,
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Full::new(Bytes::new()));
    }
    let offer: Vec<&str> = req
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let offer = offer.join(",");
    let Some((codec, chosen)) = Codec::negotiate(Some(offer.as_str())) else {
        return error_response(&ProtoError::bad_request(
            "no supported subprotocol offered (switchboard.v1.json, switchboard.v1.msgpack)",
        ));
    };
    let bearer = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => return error_response(&ProtoError::bad_request(e.to_string())),
    };
    let id = gw.next_session.fetch_add(1, Ordering::Relaxed);
    // One box for everything the task needs before the session exists: what an async
    // block captures stays in the task all its life, and the box is 8 bytes of it.
    let args = Box::new((fut, gw.clone(), codec, bearer, id));
    gw.tracker.spawn(async move {
        // Moved out in a block of its own, so the box is freed here, not when the task ends.
        let (fut, gw, codec, bearer, id) = {
            let args = args;
            *args
        };
        let io = match fut.await {
            Ok(ws) => ws.into_inner(),
            Err(e) => return tracing::debug!(error = %e, "upgrade failed"),
        };
        session::run(io, gw, codec, bearer, id).await
    });
    let (mut parts, _) = resp.into_parts();
    if let Some(p) = chosen {
        parts
            .headers
            .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    Response::from_parts(parts, Full::new(Bytes::new()))
}

/// Maps a failed send to the sequencer (it stopped) to an error.
pub fn sequencer_gone() -> ProtoError {
    ProtoError::new(ErrorCode::Unavailable, "the broker is shutting down")
}
