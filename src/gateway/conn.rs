//! One WebSocket connection's bytes: client frames in, assembled into whole messages; server
//! frames out, buffered and written when the socket takes them.
//!
//! Why not fastwebsockets' reader and writer: they keep an 8 KiB read buffer per socket for
//! the socket's whole life and need a task per half, which put an idle session at about
//! 16 KiB. Here both directions are driven from one task by one poll function, and a buffer
//! exists only while bytes wait in it:
//! - `rbuf` holds the bytes of frames not yet complete; reads go through a buffer on the
//!   stack, so a socket with nothing to read holds no read buffer at all;
//! - `wbuf` holds frames not yet written; once the socket has taken everything it is freed,
//!   so a burst costs one write, and an idle session holds no write buffer.
//!
//! Invariants:
//! - every limit is checked before the bytes it limits are buffered: a frame header over
//!   `max` is refused (1009) before its payload is read, and so is a fragment that would take
//!   the whole message over `max`;
//! - [`Conn::poll_io`] is cancel-safe: everything it has read or written is recorded in
//!   `self` before it returns, so it may sit in a `select!` beside timers and queues;
//! - text messages are valid UTF-8 (checked as fragments arrive, so an invalid one fails
//!   fast, 1007); control frames are handled between fragments;
//! - `wbuf` is bounded by the caller: [`Conn::backlog`] says how much waits, and the session
//!   stops taking from its queue above its high-water mark.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::wire::{self, FrameError, OpCode};

/// Bytes read from the socket per read call (on the stack, not kept).
const READ_CHUNK: usize = 8 * 1024;

/// A whole message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// A text message (valid UTF-8).
    Text(Vec<u8>),
    Binary(Vec<u8>),
    /// A ping with its payload, to be answered with a pong.
    Ping(Vec<u8>),
    Pong,
    /// The client's close frame and its code (`None`: the frame had no code).
    Close(Option<u16>),
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client broke the protocol; close with this code (1002, 1007 or 1009).
    #[error("websocket violation, close {code}: {why}")]
    Violation { code: u16, why: &'static str },
    /// The socket ended without a close frame.
    #[error("connection closed")]
    Eof,
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

impl ReadError {
    fn protocol(why: &'static str) -> ReadError {
        ReadError::Violation { code: 1002, why }
    }
}

impl From<FrameError> for ReadError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Protocol(why) => ReadError::protocol(why),
            FrameError::TooBig => ReadError::Violation {
                code: 1009,
                why: "message over limits.max_frame_bytes",
            },
        }
    }
}

/// A fragmented message being assembled.
struct Partial {
    text: bool,
    data: Vec<u8>,
    /// Bytes of `data` known to be valid UTF-8 (text only).
    valid: usize,
}

pub struct Conn<S> {
    io: S,
    /// Largest message, fragments added up (and so largest frame payload).
    max: usize,
    /// Read but not yet parsed; `rbuf[rpos..]` is unparsed.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Boxed: fragmented messages are rare, and an idle session should not hold their room.
    partial: Option<Box<Partial>>,
    /// Written to the socket up to `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    read_eof: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S, max: usize) -> Conn<S> {
        Conn {
            io,
            max,
            rbuf: Vec::new(),
            rpos: 0,
            partial: None,
            wbuf: Vec::new(),
            wpos: 0,
            read_eof: false,
        }
    }

    /// Queues one final, unmasked frame.
    pub fn queue(&mut self, opcode: OpCode, payload: &[u8]) {
        wire::write_header(&mut self.wbuf, opcode, payload.len());
        self.wbuf.extend_from_slice(payload);
    }

    /// Queues a close frame with `code` and `reason`.
    pub fn queue_close(&mut self, code: u16, reason: &str) {
        let mut p = Vec::with_capacity(2 + reason.len());
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(reason.as_bytes());
        p.truncate(125);
        self.queue(OpCode::Close, &p);
    }

    /// Bytes queued and not yet written.
    pub fn backlog(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Writes what is queued; `Ready(Ok)` once the socket has taken all of it (and flushed
    /// it, for TLS), and the buffer is freed.
    pub fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.wpos < self.wbuf.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.wpos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if !self.wbuf.is_empty() {
            self.wbuf = Vec::new();
            self.wpos = 0;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Drives both directions: writes what is queued as far as the socket takes it, and
    /// returns the next whole client message; with `until_drained`, returns `Ok(None)` as
    /// soon as the socket has taken everything queued. Cancel-safe.
    pub fn poll_io(
        &mut self,
        cx: &mut Context<'_>,
        until_drained: bool,
    ) -> Poll<Result<Option<Message>, ReadError>> {
        if self.backlog() > 0 {
            match self.poll_write_out(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(ReadError::Io(e))),
                Poll::Ready(Ok(())) if until_drained => return Poll::Ready(Ok(None)),
                _ => {}
            }
        }
        self.poll_message(cx).map(|r| r.map(Some))
    }

    /// The next whole client message.
    pub fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Result<Message, ReadError>> {
        loop {
            if let Some(m) = self.parse()? {
                return Poll::Ready(Ok(m));
            }
            if self.read_eof {
                return Poll::Ready(Err(ReadError::Eof));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(())) => {
                    let got = rb.filled();
                    if got.is_empty() {
                        self.read_eof = true;
                        continue;
                    }
                    if self.rpos > 0 {
                        self.rbuf.drain(..self.rpos);
                        self.rpos = 0;
                    }
                    self.rbuf.extend_from_slice(got);
                }
            }
        }
    }

    /// Parses the buffered bytes into the next message, if they hold one.
    fn parse(&mut self) -> Result<Option<Message>, ReadError> {
        loop {
            let avail = &self.rbuf[self.rpos..];
            let Some(h) = wire::parse_header(avail, self.max)? else {
                return Ok(None);
            };
            let total = h.header_len + h.len;
            if avail.len() < total {
                self.rbuf.reserve(total - avail.len());
                return Ok(None);
            }
            let start = self.rpos + h.header_len;
            let end = start + h.len;
            wire::unmask(&mut self.rbuf[start..end], h.mask, 0);
            self.rpos = end;
            let msg = self.frame(h.fin, h.opcode, start, end)?;
            if self.rpos == self.rbuf.len() {
                // Everything parsed: give the memory back.
                self.rbuf = Vec::new();
                self.rpos = 0;
            }
            if let Some(m) = msg {
                return Ok(Some(m));
            }
        }
    }

    /// One complete frame, payload `rbuf[start..end]`; a message when it completes one.
    fn frame(
        &mut self,
        fin: bool,
        opcode: OpCode,
        start: usize,
        end: usize,
    ) -> Result<Option<Message>, ReadError> {
        let payload = &self.rbuf[start..end];
        match opcode {
            OpCode::Ping => Ok(Some(Message::Ping(payload.to_vec()))),
            OpCode::Pong => Ok(Some(Message::Pong)),
            OpCode::Close => close_frame(payload).map(Some),
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(ReadError::protocol("new message inside a fragmented one"));
                }
                let text = opcode == OpCode::Text;
                let mut p = Box::new(Partial {
                    text,
                    data: payload.to_vec(),
                    valid: 0,
                });
                check_utf8(&mut p, fin)?;
                if fin {
                    return Ok(Some((*p).into_message()));
                }
                self.partial = Some(p);
                Ok(None)
            }
            OpCode::Continuation => {
                let Some(mut p) = self.partial.take() else {
                    return Err(ReadError::protocol("continuation without a message"));
                };
                if p.data.len() + payload.len() > self.max {
                    return Err(FrameError::TooBig.into());
                }
                p.data.extend_from_slice(payload);
                check_utf8(&mut p, fin)?;
                if fin {
                    return Ok(Some((*p).into_message()));
                }
                self.partial = Some(p);
                Ok(None)
            }
        }
    }

    /// Shuts the write side down (after a close frame was written).
    pub fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    /// Ends the connection with a close frame: queues it behind what waits, gives the socket
    /// `write_for` to take everything, then (when `wait_for_client`: we started the close)
    /// reads and drops messages until the client's close frame or `linger` passes, and
    /// shuts the write side down. Returns whether everything queued, the close frame
    /// included, reached the socket.
    pub async fn close(
        &mut self,
        code: u16,
        reason: &str,
        write_for: Duration,
        linger: Duration,
        wait_for_client: bool,
    ) -> bool {
        self.queue_close(code, reason);
        let wrote = tokio::time::timeout(write_for, poll_fn(|cx| self.poll_write_out(cx))).await;
        if !matches!(wrote, Ok(Ok(()))) {
            return false;
        }
        let deadline = tokio::time::Instant::now() + linger;
        if wait_for_client {
            let _ = tokio::time::timeout_at(deadline, async {
                loop {
                    match poll_fn(|cx| self.poll_message(cx)).await {
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
        let _ = tokio::time::timeout_at(
            deadline + Duration::from_millis(200),
            poll_fn(|cx| self.poll_shutdown(cx)),
        )
        .await;
        true
    }
}

/// The code to answer a client's close frame with: its own when it may be sent back,
/// else 1000.
pub fn answer_code(code: Option<u16>) -> u16 {
    code.filter(|c| matches!(c, 1000..=1003 | 1007..=1011 | 3000..=4999))
        .unwrap_or(1000)
}

impl Partial {
    fn into_message(self) -> Message {
        if self.text {
            Message::Text(self.data)
        } else {
            Message::Binary(self.data)
        }
    }
}

/// Checks the UTF-8 of a text message's bytes so far: the whole of it when `fin`, else
/// everything but a code point cut at the end.
fn check_utf8(p: &mut Partial, fin: bool) -> Result<(), ReadError> {
    if !p.text {
        return Ok(());
    }
    let invalid = ReadError::Violation {
        code: 1007,
        why: "text message is not valid UTF-8",
    };
    match std::str::from_utf8(&p.data[p.valid..]) {
        Ok(_) => {
            p.valid = p.data.len();
            Ok(())
        }
        Err(e) if e.error_len().is_none() && !fin => {
            // Only an incomplete sequence at the end: the next fragment may finish it.
            p.valid += e.valid_up_to();
            Ok(())
        }
        Err(_) => Err(invalid),
    }
}

/// A client's close frame: no payload, or a valid code and a UTF-8 reason.
fn close_frame(payload: &[u8]) -> Result<Message, ReadError> {
    match payload {
        [] => Ok(Message::Close(None)),
        [_] => Err(ReadError::protocol("close frame with a 1-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !wire::valid_close_code(code) {
                return Err(ReadError::protocol("close code not allowed on the wire"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(ReadError::Violation {
                    code: 1007,
                    why: "close reason is not valid UTF-8",
                });
            }
            Ok(Message::Close(Some(code)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0xA1, 0xB2, 0xC3, 0xD4];
        let mut v = vec![first];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        let mut p = payload.to_vec();
        wire::unmask(&mut p, mask, 0);
        v.extend_from_slice(&p);
        v
    }

    async fn next<S: AsyncRead + AsyncWrite + Unpin>(
        c: &mut Conn<S>,
    ) -> Result<Message, ReadError> {
        std::future::poll_fn(|cx| c.poll_io(cx, false))
            .await
            .map(|m| m.expect("not asked to report a drain"))
    }

    fn violation(r: Result<Message, ReadError>) -> u16 {
        match r {
            Err(ReadError::Violation { code, .. }) => code,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn messages_arrive_whole_even_a_byte_at_a_time() {
        let (client, server) = tokio::io::duplex(64);
        let mut conn = Conn::new(server, 1000);
        let mut bytes = frame(0x01, "hé".as_bytes()); // text, not final
        bytes.extend(frame(0x89, b"p")); // a ping between the fragments
        bytes.extend(frame(0x80, "llo wörld".as_bytes()));
        bytes.extend(frame(0x82, &[1, 2, 3]));
        let writer = tokio::spawn(async move {
            let mut client = client;
            for b in bytes {
                client.write_all(&[b]).await.unwrap();
            }
            client
        });
        assert_eq!(next(&mut conn).await.unwrap(), Message::Ping(b"p".to_vec()));
        assert_eq!(
            next(&mut conn).await.unwrap(),
            Message::Text("héllo wörld".as_bytes().to_vec())
        );
        assert_eq!(
            next(&mut conn).await.unwrap(),
            Message::Binary(vec![1, 2, 3])
        );
        drop(writer.await.unwrap());
        assert!(matches!(next(&mut conn).await, Err(ReadError::Eof)));
        assert_eq!(
            conn.rbuf.capacity(),
            0,
            "no read buffer is kept once parsed"
        );
    }

    #[tokio::test]
    async fn a_utf8_sequence_split_across_fragments_is_valid() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut conn = Conn::new(server, 1000);
        let euro = "€".as_bytes(); // 3 bytes
        client.write_all(&frame(0x01, &euro[..1])).await.unwrap();
        client.write_all(&frame(0x00, &euro[1..2])).await.unwrap();
        client.write_all(&frame(0x80, &euro[2..])).await.unwrap();
        assert_eq!(next(&mut conn).await.unwrap(), Message::Text(euro.to_vec()));
    }

    #[tokio::test]
    async fn invalid_utf8_fails_at_the_fragment_that_has_it() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut conn = Conn::new(server, 1000);
        client.write_all(&frame(0x01, b"ok")).await.unwrap();
        client.write_all(&frame(0x00, &[0xFF])).await.unwrap();
        // No final fragment is ever sent: the error comes from the second one.
        assert_eq!(violation(next(&mut conn).await), 1007);
    }

    #[tokio::test]
    async fn a_text_message_ending_mid_sequence_is_invalid() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut conn = Conn::new(server, 1000);
        client
            .write_all(&frame(0x81, &[b'a', 0xE2, 0x82]))
            .await
            .unwrap();
        assert_eq!(violation(next(&mut conn).await), 1007);
    }

    #[tokio::test]
    async fn fragments_adding_up_past_the_limit_are_refused() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut conn = Conn::new(server, 100);
        client.write_all(&frame(0x02, &[0; 60])).await.unwrap();
        client.write_all(&frame(0x00, &[0; 40])).await.unwrap();
        client.write_all(&frame(0x00, &[0; 1])).await.unwrap();
        assert_eq!(violation(next(&mut conn).await), 1009);
    }

    #[tokio::test]
    async fn a_frame_over_the_limit_is_refused_before_its_payload_arrives() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut conn = Conn::new(server, 100);
        // Only the header of a 1000-byte frame is ever sent.
        client
            .write_all(&frame(0x82, &[0; 1000])[..8])
            .await
            .unwrap();
        assert_eq!(violation(next(&mut conn).await), 1009);
    }

    #[tokio::test]
    async fn fragmentation_errors_are_protocol_errors() {
        for bytes in [
            frame(0x80, b"x"),                               // continuation, nothing started
            [frame(0x01, b"a"), frame(0x81, b"b")].concat(), // new message mid-message
        ] {
            let (mut client, server) = tokio::io::duplex(1024);
            let mut conn = Conn::new(server, 1000);
            client.write_all(&bytes).await.unwrap();
            assert_eq!(violation(next(&mut conn).await), 1002);
        }
    }

    #[tokio::test]
    async fn close_frames_are_checked() {
        // (payload, the close code read, or the violation's close code)
        type Case<'a> = (&'a [u8], Result<Option<u16>, u16>);
        let cases: [Case; 5] = [
            (&[], Ok(None)),
            (&[0x03, 0xE8], Ok(Some(1000))),
            (&[0x03], Err(1002)),
            (&[0x03, 0xED], Err(1002)), // 1005 must not be sent
            (&[0x03, 0xE8, 0xFF], Err(1007)),
        ];
        for (payload, want) in cases {
            let (mut client, server) = tokio::io::duplex(1024);
            let mut conn = Conn::new(server, 1000);
            client.write_all(&frame(0x88, payload)).await.unwrap();
            let got = next(&mut conn).await;
            match want {
                Ok(code) => assert_eq!(got.unwrap(), Message::Close(code)),
                Err(code) => assert_eq!(violation(got), code),
            }
        }
    }

    #[tokio::test]
    async fn queued_frames_go_out_in_one_buffer_which_is_then_freed() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut conn = Conn::new(server, 1000);
        conn.queue(OpCode::Text, b"one");
        conn.queue(OpCode::Binary, &[7; 200]);
        conn.queue_close(4008, "slow");
        assert_eq!(conn.backlog(), 5 + 204 + 8);
        std::future::poll_fn(|cx| conn.poll_write_out(cx))
            .await
            .unwrap();
        assert_eq!(conn.backlog(), 0);
        assert_eq!(conn.wbuf.capacity(), 0);
        let mut got = vec![0u8; 5 + 204 + 8];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..5], &[0x81, 3, b'o', b'n', b'e']);
        assert_eq!(&got[5..9], &[0x82, 126, 0, 200]);
        assert_eq!(&got[209..], &[0x88, 6, 0x0F, 0xA8, b's', b'l', b'o', b'w']);
    }
}
