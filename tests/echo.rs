//! The `/echo` endpoint (`debug.echo_endpoint`): off by default; when on, it sends every
//! message back through the same frame reader, limits and writer as `/ws`, which is what
//! lets the Autobahn suite (`.ci/autobahn.sh`) test the broker's WebSocket layer.

mod common;

use std::time::Duration;

use common::{TestBroker, TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn echo_url(b: &TestBroker) -> String {
    format!("ws://{}/echo", b.ep.addr)
}

async fn open(b: &TestBroker) -> Ws {
    // The client must accept the frames we send back unfragmented, whatever their size.
    let cfg = WebSocketConfig {
        max_message_size: None,
        max_frame_size: None,
        ..Default::default()
    };
    let (ws, _) = tokio::time::timeout(
        TIMEOUT,
        tokio_tungstenite::connect_async_with_config(echo_url(b), Some(cfg), false),
    )
    .await
    .expect("handshake within timeout")
    .expect("echo upgrade");
    ws
}

/// The next message that is not a ping or pong.
async fn next(ws: &mut Ws) -> Message {
    loop {
        let m = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("a message within timeout")
            .expect("socket open")
            .expect("a valid message");
        if !matches!(m, Message::Ping(_)) {
            return m;
        }
    }
}

/// Reads until the server's close frame and returns its code.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("a close within timeout")
        {
            Some(Ok(Message::Close(Some(c)))) => return u16::from(c.code),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_echo_endpoint_does_not_exist_by_default() {
    let b = TestBroker::start().await;
    let r = tokio_tungstenite::connect_async(echo_url(&b)).await;
    match r {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected an HTTP 404, got {other:?}"),
    }
}

#[tokio::test]
async fn text_binary_fragmented_and_ping_come_back_as_sent() {
    let b = TestBroker::start_with(|c| c.debug.echo_endpoint = true).await;
    let mut ws = open(&b).await;

    ws.send(Message::Text("héllo".into())).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::Text("héllo".into()));

    let big: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::Binary(big.clone())).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::Binary(big));

    // Three fragments, a ping between them, the UTF-8 of "é" cut across two of them.
    let text = "a fragmented é message";
    let bytes = text.as_bytes();
    let cut = text.find('é').expect("é") + 1;
    ws.feed(Message::Frame(Frame::message(
        bytes[..cut].to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .expect("feed");
    ws.feed(Message::Ping(b"between".to_vec()))
        .await
        .expect("feed");
    ws.feed(Message::Frame(Frame::message(
        bytes[cut..cut + 4].to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .await
    .expect("feed");
    ws.feed(Message::Frame(Frame::message(
        bytes[cut + 4..].to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await
    .expect("feed");
    ws.flush().await.expect("flush");
    let pong = tokio::time::timeout(TIMEOUT, ws.next())
        .await
        .expect("pong within timeout")
        .expect("open")
        .expect("valid");
    assert_eq!(pong, Message::Pong(b"between".to_vec()));
    assert_eq!(next(&mut ws).await, Message::Text(text.into()));

    // Our close is answered with the same code.
    ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: CloseCode::Library(4321),
        reason: "done".into(),
    }))
    .await
    .expect("close");
    assert_eq!(close_code(&mut ws).await, 4321);
}

#[tokio::test]
async fn a_message_over_the_frame_limit_is_refused_with_1009() {
    let b = TestBroker::start_with(|c| {
        c.debug.echo_endpoint = true;
        c.limits.max_frame_bytes = 1024;
    })
    .await;
    let mut ws = open(&b).await;
    ws.send(Message::Binary(vec![7; 1024])).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::Binary(vec![7; 1024]));
    // Fragments each under the limit, adding up to more than it.
    for (i, fin) in [(0, false), (1, false), (2, true)] {
        let op = if i == 0 { Data::Binary } else { Data::Continue };
        let f = Frame::message(vec![1; 400], OpCode::Data(op), fin);
        if ws.send(Message::Frame(f)).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await, 1009);
}

#[tokio::test]
async fn invalid_utf8_and_protocol_violations_close_with_their_codes() {
    let b = TestBroker::start_with(|c| c.debug.echo_endpoint = true).await;

    let mut ws = open(&b).await;
    let f = Frame::message(vec![b'o', b'k', 0xC3, 0x28], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(f)).await.expect("send");
    assert_eq!(close_code(&mut ws).await, 1007);

    // A continuation with no message to continue.
    let mut ws = open(&b).await;
    let f = Frame::message(b"x".to_vec(), OpCode::Data(Data::Continue), true);
    ws.send(Message::Frame(f)).await.expect("send");
    assert_eq!(close_code(&mut ws).await, 1002);
}

#[tokio::test]
async fn shutdown_closes_echo_sockets_with_4000() {
    let mut b = TestBroker::start_with(|c| c.debug.echo_endpoint = true).await;
    let mut ws = open(&b).await;
    ws.send(Message::Text("x".into())).await.expect("send");
    assert_eq!(next(&mut ws).await, Message::Text("x".into()));
    let (code, _) = tokio::join!(close_code(&mut ws), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.shutdown().await;
    });
    assert_eq!(code, 4000);
}
