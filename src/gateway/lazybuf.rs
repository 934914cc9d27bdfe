//! A write buffer that holds memory only while frames wait to be flushed.
//!
//! `tokio::io::BufWriter` allocates its whole capacity when the session starts and keeps it
//! for the session's life, so every idle connection paid for a 16 KiB buffer it was not
//! using. [`LazyBuf`] grows its buffer as frames are written, writes it out at `flush` (or
//! when it would pass `cap`), and gives the memory back once it is empty: an idle session
//! holds no write buffer at all, a busy one still gets one syscall per drained queue.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

pub struct LazyBuf<W> {
    inner: W,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to `inner`.
    written: usize,
    cap: usize,
}

impl<W: AsyncWrite + Unpin> LazyBuf<W> {
    pub fn new(inner: W, cap: usize) -> LazyBuf<W> {
        LazyBuf {
            inner,
            buf: Vec::new(),
            written: 0,
            cap: cap.max(1),
        }
    }

    /// Writes out everything buffered; frees the buffer once empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        self.buf = Vec::new();
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for LazyBuf<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() + data.len() > this.cap {
            ready!(this.poll_drain(cx))?;
            if data.len() >= this.cap {
                // Larger than the buffer: straight through.
                return Pin::new(&mut this.inner).poll_write(cx, data);
            }
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn buffers_until_flush_and_frees_its_memory() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut w = LazyBuf::new(a, 64);
        assert_eq!(w.buf.capacity(), 0);
        w.write_all(b"hello ").await.unwrap();
        w.write_all(b"world").await.unwrap();
        assert_eq!(w.buf.len(), 11, "buffered, not written");
        w.flush().await.unwrap();
        assert_eq!(w.buf.capacity(), 0, "the buffer is given back when empty");
        let mut got = [0u8; 11];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello world");
    }

    #[tokio::test]
    async fn a_write_past_the_cap_drains_first_and_large_writes_go_through() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut w = LazyBuf::new(a, 8);
        w.write_all(b"12345").await.unwrap();
        w.write_all(b"6789").await.unwrap();
        w.write_all(&[b'x'; 20]).await.unwrap();
        w.flush().await.unwrap();
        let mut got = vec![0u8; 29];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..9], b"123456789");
        assert_eq!(&got[9..], &[b'x'; 20]);
    }
}
