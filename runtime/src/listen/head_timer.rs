//! hyper's HTTP/1.1 header timer, cut to the header timeout once a head has begun.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Shared by a connection's socket and its [`HeadTimer`].
#[derive(Default)]
pub(super) struct Heads {
    /// Reads that brought bytes.
    pub(super) reads: AtomicU64,
    /// A request head took longer than the header timeout (rather than the connection
    /// having waited out the keep-alive timeout).
    pub(super) too_slow: AtomicBool,
}

/// hyper's HTTP/1.1 header timer for one connection. hyper starts it when it begins
/// waiting for a request head, with the keep-alive timeout; once a read brings bytes (the
/// head's first), the deadline becomes the header timeout from then.
pub(super) struct HeadTimer {
    pub(super) heads: Arc<Heads>,
    pub(super) header_timeout: Duration,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            heads: self.heads.clone(),
            seen: self.heads.reads.load(Ordering::Relaxed),
            header_timeout: self.header_timeout,
            head_started: false,
            sleep: Box::pin(tokio::time::sleep_until(Instant::from_std(deadline))),
        })
    }

    /// hyper resets the timer for every request after the first: in place, as Tokio's
    /// own timer does, rather than with a new allocation and timer entry each time.
    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(head) => {
                let head = head.get_mut();
                head.seen = self.heads.reads.load(Ordering::Relaxed);
                head.head_started = false;
                head.sleep.as_mut().reset(Instant::from_std(new_deadline));
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

struct HeadSleep {
    heads: Arc<Heads>,
    /// The read count when the wait began.
    seen: u64,
    header_timeout: Duration,
    head_started: bool,
    sleep: Pin<Box<Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this after each read of the head, so a read's bytes are seen here
        // in the same turn that read them.
        if !self.head_started && self.heads.reads.load(Ordering::Relaxed) != self.seen {
            self.head_started = true;
            let deadline = Instant::now() + self.header_timeout;
            self.sleep.as_mut().reset(deadline);
        }
        ready!(self.sleep.as_mut().poll(cx));
        if self.head_started {
            self.heads.too_slow.store(true, Ordering::Relaxed);
        }
        Poll::Ready(())
    }
}

impl hyper::rt::Sleep for HeadSleep {}
