//! An accepted socket that holds its listener's slot and times out a silent peer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use super::Listener;
use super::head_timer::Heads;

/// An accepted socket holding its listener slot: reads fail with `TimedOut` once it has
/// sent nothing within the header timeout, or moved nothing for the idle timeout.
pub struct Guarded {
    pub(super) tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
    open: prometheus::IntGauge,
    pub(super) timed_out: prometheus::IntCounter,
    /// When the timer fires: first the header deadline, then the idle deadline.
    timer: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    /// The last time bytes moved; `None` until the first read.
    last_activity: Option<Instant>,
    pub(super) heads: Arc<Heads>,
}

impl Guarded {
    pub(super) fn new(tcp: TcpStream, slot: OwnedSemaphorePermit, listener: &Listener) -> Self {
        listener.open.inc();
        Self {
            tcp,
            _slot: slot,
            open: listener.open.clone(),
            timed_out: listener.timed_out.clone(),
            timer: Box::pin(tokio::time::sleep(listener.limits.header_timeout)),
            idle_timeout: listener.limits.idle_timeout,
            last_activity: None,
            heads: Arc::default(),
        }
    }

    /// Called with a read pending: `Err(TimedOut)` once the connection's deadline has
    /// passed. Activity only moves the deadline when the timer fires, so moving bytes
    /// costs a clock read, not a timer update.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let Some(last) = self.last_activity else {
                return Err(self.time_out("sent nothing within the header timeout"));
            };
            let deadline = last + self.idle_timeout;
            if deadline <= Instant::now() {
                return Err(self.time_out("idle for the idle timeout"));
            }
            self.timer.as_mut().reset(deadline);
        }
        Ok(())
    }

    fn time_out(&self, why: &'static str) -> io::Error {
        self.timed_out.inc();
        io::Error::new(io::ErrorKind::TimedOut, why)
    }

    fn moved(&mut self, first: bool) {
        let now = Instant::now();
        if first && self.last_activity.is_none() {
            // The header deadline has done its job; from now on the idle one counts.
            self.timer.as_mut().reset(now + self.idle_timeout);
        }
        if first || self.last_activity.is_some() {
            self.last_activity = Some(now);
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved(true);
                    self.heads.reads.fetch_add(1, Ordering::Relaxed);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.poll_deadline(cx)?;
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, buf))?;
        if n > 0 {
            self.moved(false);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs))?;
        if n > 0 {
            self.moved(false);
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
