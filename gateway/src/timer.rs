//! A timer with microsecond resolution, for the batcher's queue delay.
//!
//! Tokio's timer wheel works in whole milliseconds and rounds every deadline up to the
//! next tick, so `tokio::time::sleep(50µs)` returns after a millisecond or more, and a
//! sub-millisecond `--max-queue-delay-us` built on it would hold a lone request for a
//! whole tick (measured in docs/gateway/batching.md). This timer is a
//! Linux timerfd armed for the exact wait and watched by the reactor like a socket, so
//! the wait ends when it should (the kernel's hrtimer, not a tick).

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// One re-armable timer. A wait that is dropped before it ends (the select it was in
/// took another branch) leaves it armed; the next wait re-arms it, and a stale expiry is
/// read and ignored.
pub struct PreciseTimer {
    fd: AsyncFd<Fd>,
}

/// The timerfd as the reactor takes it (nix's `TimerFd` lends only `AsFd`).
struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl PreciseTimer {
    /// A disarmed timer on the monotonic clock, registered with the current runtime.
    pub fn new() -> io::Result<Self> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // Tokio 1.54 deprecated the safe constructors for a type whose `as_raw_fd` could
        // change or close its descriptor while registered (tokio#8587). `Fd` owns its
        // timerfd, never replaces it, and closes it only when dropped with the AsyncFd,
        // which is the contract the `unsafe` replacement asks for; the crate forbids
        // `unsafe`.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(Fd(fd), Interest::READABLE)?;
        Ok(Self { fd })
    }

    /// Waits until `at`; at once if it has passed.
    pub async fn sleep_until(&self, at: Instant) -> io::Result<()> {
        let wait = at.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Ok(());
        }
        // Arming resets the count of expiries, so one left from a dropped wait is gone.
        let wait = Expiration::OneShot(TimeSpec::from_duration(wait));
        self.fd.get_ref().0.set(wait, TimerSetTimeFlags::empty())?;
        loop {
            let mut ready = self.fd.readable().await?;
            // `wait` reads the expiry count: EAGAIN (no expiry yet: the readiness was a
            // stale one) clears the readiness and waits again.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;

    use super::*;

    /// The median of `n` waits of `wait` each, as `sleep` measured them.
    async fn median_wait<F: std::future::Future>(n: usize, sleep: impl Fn() -> F) -> Duration {
        let mut took = Vec::with_capacity(n);
        for _ in 0..n {
            let start = std::time::Instant::now();
            sleep().await;
            took.push(start.elapsed());
        }
        took.sort();
        took[n / 2]
    }

    #[tokio::test]
    async fn a_sub_millisecond_wait_is_not_rounded_up_to_tokios_tick() {
        let timer = PreciseTimer::new().unwrap();
        let wait = Duration::from_micros(200);
        let start = std::time::Instant::now();
        timer.sleep_until(Instant::now() + wait).await.unwrap();
        assert!(start.elapsed() >= wait, "never early: {:?}", start.elapsed());
        // Medians of the two timers in one run: tokio's ends at a tick, at least 1 ms
        // away; this one after the 200 µs asked, plus a wake-up.
        let precise = median_wait(21, || timer.sleep_until(Instant::now() + wait)).await;
        let tokio = median_wait(21, || tokio::time::sleep(wait)).await;
        assert!(
            precise * 2 < tokio,
            "timerfd median {precise:?}, tokio's {tokio:?}"
        );
    }

    #[tokio::test]
    async fn a_dropped_wait_leaves_no_expiry_for_the_next() {
        let timer = PreciseTimer::new().unwrap();
        // Armed for 1 ms by one poll, then dropped; it expires unread.
        let first = timer.sleep_until(Instant::now() + Duration::from_millis(1));
        assert!(first.now_or_never().is_none(), "the first wait was cut short");
        std::thread::sleep(Duration::from_millis(3));
        // The stale expiry must not end a fresh 20 ms wait early.
        let start = std::time::Instant::now();
        timer
            .sleep_until(Instant::now() + Duration::from_millis(20))
            .await
            .unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(20),
            "{:?}",
            start.elapsed()
        );
    }
}
