//! A circuit breaker per group: after `threshold` consecutive failed dispatches the group
//! is skipped for `cooldown`; then one probe batch may go (half-open), and its outcome
//! closes the breaker or opens it again. Time is tokio's, so tests can pause it.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            open_until: None,
            probing: false,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a batch may be sent now; in half-open, only one probe at a time.
    pub fn allows(&self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => !self.probing,
        }
    }

    /// Records that a batch was sent (marks the half-open probe as taken).
    pub fn on_dispatch(&mut self, now: Instant) {
        if self.state(now) == BreakerState::HalfOpen {
            self.probing = true;
        }
    }

    pub fn on_success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    pub fn on_failure(&mut self, now: Instant) {
        self.failures += 1;
        self.probing = false;
        if self.failures >= self.threshold || self.open_until.is_some() {
            self.open_until = Some(now + self.cooldown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_then_probes_then_closes() {
        let mut b = Breaker::new(3, Duration::from_secs(5));
        let now = Instant::now();
        b.on_failure(now);
        b.on_failure(now);
        assert_eq!(
            b.state(now),
            BreakerState::Closed,
            "two failures are under the threshold"
        );
        b.on_failure(now);
        assert_eq!(b.state(Instant::now()), BreakerState::Open);
        assert!(!b.allows(Instant::now()));

        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        assert_eq!(b.state(now), BreakerState::HalfOpen);
        assert!(b.allows(now));
        b.on_dispatch(now);
        assert!(!b.allows(now), "one probe at a time");
        b.on_success();
        assert_eq!(b.state(now), BreakerState::Closed);
        assert!(b.allows(now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again() {
        let mut b = Breaker::new(1, Duration::from_secs(2));
        b.on_failure(Instant::now());
        tokio::time::advance(Duration::from_secs(2)).await;
        b.on_dispatch(Instant::now());
        b.on_failure(Instant::now());
        assert_eq!(b.state(Instant::now()), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert_eq!(b.state(Instant::now()), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(Instant::now()), BreakerState::HalfOpen);
    }
}
