//! An HTTP/2 connection's socket whose flush waits one scheduler turn, so frames queued
//! by different tasks in the meantime leave in one write.
//!
//! h2 flushes whenever its connection task has nothing more to write *now*, and the
//! frames of one call come from two tasks. A client's HEADERS are written by the
//! connection task while the request body waits for the stream to open (hyper pipes it
//! from another task): strace of the gateway showed every call to rank 0 as a 48-byte
//! and a 137-byte `writev`. A server's reply whose DATA payload is 256 bytes or more is
//! written apart from the trailers that follow it (h2 sends such a payload from its own
//! buffer, and flushes before framing anything after it). Each extra write costs the
//! sender a syscall and the receiver a wake-up.
//!
//! [`Coalesce`] takes what h2 writes into its buffer, and on the first flush after new
//! bytes it only yields (waking itself at once): tasks already woken, such as the one
//! piping a request body, run and queue their frames; the next flush writes everything
//! in one call. A write never waits for more than that one turn of the runtime, and past
//! [`HIGH_WATER`] buffered bytes the buffer is written at once.
//!
//! Used where a connection carries whole batches and its runtime's queue is short: the
//! gateway's channels to rank 0 and the worker's gRPC server. Not on the gateway's front
//! ends: with many client connections a turn of the runtime is long, and most answers
//! there are single small writes already (hyper writes an HTTP/1.1 answer whole).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes past which a write goes to the socket before taking more.
pub const HIGH_WATER: usize = 64 * 1024;

/// `T` with writes coalesced until the flush after the next scheduler turn.
#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    sent: usize,
    /// A flush yielded since bytes were buffered: the next one writes.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out everything buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        self.yielded = false;
        Poll::Ready(Ok(()))
    }

    /// Room for more: past the high-water mark, what is buffered goes first.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() >= HIGH_WATER {
            std::task::ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesce<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        std::task::ready!(me.poll_room(cx))?;
        me.buf.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        std::task::ready!(me.poll_room(cx))?;
        let mut n = 0;
        for b in bufs {
            me.buf.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.buf.is_empty() {
            return Pin::new(&mut me.inner).poll_flush(cx);
        }
        if !me.yielded {
            me.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        std::task::ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        std::task::ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A socket that records each write call.
    #[derive(Default, Clone)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Writes {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn writes(w: &Writes) -> Vec<Vec<u8>> {
        w.0.lock().unwrap().clone()
    }

    /// A connection task as h2 runs one: it writes the frames queued so far, then
    /// flushes; `frames` is queued to before it starts, `later` by a task already woken.
    async fn connection(io: impl AsyncWrite + Unpin, frames: &[&'static [u8]], later: &'static [u8]) {
        let queue = Arc::new(Mutex::new(frames.to_vec()));
        let body = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.lock().unwrap().push(later) })
        };
        let mut io = io;
        std::future::poll_fn(|cx| {
            for frame in std::mem::take(&mut *queue.lock().unwrap()) {
                let n = std::task::ready!(Pin::new(&mut io).poll_write(cx, frame))?;
                assert_eq!(n, frame.len());
            }
            Pin::new(&mut io).poll_flush(cx)
        })
        .await
        .unwrap();
        body.await.unwrap();
        // What the body task queued after the flush is written by the next one.
        let rest = std::mem::take(&mut *queue.lock().unwrap());
        for frame in rest {
            tokio::io::AsyncWriteExt::write_all(&mut io, frame).await.unwrap();
        }
    }

    #[tokio::test]
    async fn frames_queued_by_another_task_leave_in_the_same_write() {
        // On the socket itself, HEADERS leave alone and DATA in a second write.
        let socket = Writes::default();
        connection(socket.clone(), &[b"HEADERS"], b"DATA").await;
        assert_eq!(writes(&socket), vec![b"HEADERS".to_vec(), b"DATA".to_vec()]);
        // Coalesced, the flush waits a turn, in which the body task queues DATA.
        let socket = Writes::default();
        connection(Coalesce::new(socket.clone()), &[b"HEADERS"], b"DATA").await;
        assert_eq!(writes(&socket), vec![b"HEADERSDATA".to_vec()]);
    }

    #[tokio::test]
    async fn a_flush_writes_after_one_turn_and_shutdown_writes_at_once() {
        use tokio::io::AsyncWriteExt;
        let socket = Writes::default();
        let mut io = Coalesce::new(socket.clone());
        io.write_all(b"one").await.unwrap();
        assert!(writes(&socket).is_empty(), "held until flushed");
        // The first poll of the flush yields; the flush completes on the next.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(writes(&socket), vec![b"one".to_vec()]);
        // Nothing buffered: a flush is the socket's own.
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        io.write_all(b"two").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(writes(&socket), vec![b"one".to_vec(), b"two".to_vec()]);
        // Past the high-water mark, what is buffered is written before taking more.
        let mut io = Coalesce::new(Writes::default());
        io.write_all(&vec![0; HIGH_WATER]).await.unwrap();
        io.write_all(b"x").await.unwrap();
        assert_eq!(writes(&io.inner).len(), 1);
        assert_eq!(io.buf, b"x");
    }
}
