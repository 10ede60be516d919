//! Failover: which failed dispatch may go to another group ([`is_retryable`], the
//! policy), and the one loop that applies it within a budget ([`with_failover`]), used by
//! the embedding batcher for batches and by generation for streams.

use std::future::Future;
use std::sync::Arc;

use super::{DispatchError, Group, Lease};
use crate::error::ApiError;
use crate::metrics::Metrics;

/// Whether a dispatch that failed may be sent to another group: nothing of it reached the
/// caller and the group never ran it (it refused it, or could not be reached; see
/// [`DispatchError::not_started`]), and the failure is the group's, not the request's.
pub fn is_retryable(e: &DispatchError) -> bool {
    e.not_started && matches!(e.error, ApiError::Unavailable(_))
}

/// Where a dispatch goes: a lease on a group's slot (a batch), or a group (a stream).
pub trait Target {
    fn group(&self) -> &Group;
}

impl Target for Lease {
    fn group(&self) -> &Group {
        Lease::group(self)
    }
}

impl Target for Arc<Group> {
    fn group(&self) -> &Group {
        self
    }
}

/// How one request or batch is dispatched, for [`with_failover`] to retry.
pub trait Attempts {
    type Target: Target + Send;
    type Answer: Send;

    /// Sends the request to `target`.
    fn attempt(
        &mut self,
        target: &Self::Target,
    ) -> impl Future<Output = Result<Self::Answer, DispatchError>> + Send;

    /// Finds another target among the groups not named in `tried`.
    fn next(&mut self, tried: &[String]) -> impl Future<Output = Result<Self::Target, ApiError>> + Send;
}

/// Sends `attempts`'s request to `target`; while it fails in a way [`is_retryable`]
/// allows, and at most `budget` times more, to the next target it finds among the groups
/// not yet tried. Each retry is logged and counted as a rejection with reason `retried`.
/// Returns the outcome with the target it came from: the answer, or the last failure
/// (also when no other group is found).
pub async fn with_failover<A: Attempts + Send>(
    model: &str,
    budget: usize,
    metrics: &Metrics,
    mut target: A::Target,
    attempts: &mut A,
) -> (Result<A::Answer, ApiError>, A::Target) {
    let mut tried: Vec<String> = Vec::new();
    loop {
        let e = match attempts.attempt(&target).await {
            Ok(answer) => return (Ok(answer), target),
            Err(e) => e,
        };
        if !is_retryable(&e) || tried.len() >= budget {
            return (Err(e.error), target);
        }
        let group = target.group().name().to_owned();
        tracing::info!(model, %group, error = %e.error, "group did not start the request; retrying on another");
        metrics.rejection(model, "retried");
        tried.push(group);
        // The refused target is held until another is found (it is excluded anyway).
        match attempts.next(&tried).await {
            Ok(found) => target = found,
            Err(_) => return (Err(e.error), target),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::tests::ready_pool;

    fn unavailable(not_started: bool) -> DispatchError {
        DispatchError {
            error: ApiError::Unavailable("refused".into()),
            not_started,
        }
    }

    #[test]
    fn only_a_group_fault_before_the_request_ran_is_retryable() {
        let cases = [
            ("refused before it ran", unavailable(true), true),
            ("lost while it ran", unavailable(false), false),
            (
                "the request's own fault",
                DispatchError {
                    error: ApiError::InvalidInput("bad".into()),
                    not_started: true,
                },
                false,
            ),
            (
                "out of time",
                DispatchError {
                    error: ApiError::DeadlineExceeded("late".into()),
                    not_started: false,
                },
                false,
            ),
        ];
        for (name, e, want) in cases {
            assert_eq!(is_retryable(&e), want, "case {name:?}");
        }
    }

    /// Tries on the pool's groups, each failing as `outcome` says for its try number.
    struct Scripted<F> {
        pool: crate::pool::Pool,
        outcome: F,
        seen: Vec<String>,
    }

    impl<F: Fn(usize) -> Result<(), DispatchError> + Send> Attempts for Scripted<F> {
        type Target = Arc<Group>;
        type Answer = ();

        fn attempt(&mut self, g: &Arc<Group>) -> impl Future<Output = Result<(), DispatchError>> + Send {
            self.seen.push(g.name().to_owned());
            std::future::ready((self.outcome)(self.seen.len() - 1))
        }

        fn next(&mut self, tried: &[String]) -> impl Future<Output = Result<Arc<Group>, ApiError>> + Send {
            std::future::ready(self.pool.choose_generative("m", tried))
        }
    }

    /// Runs [`with_failover`] over three groups: which were tried, the result, and the
    /// retries counted.
    async fn run(
        budget: usize,
        outcome: impl Fn(usize) -> Result<(), DispatchError> + Send,
    ) -> (Vec<String>, Result<(), ApiError>, u64) {
        let pool = ready_pool(&["a", "b", "c"], "m");
        let metrics = Metrics::new();
        let first = pool.choose_generative("m", &[]).unwrap();
        let mut attempts = Scripted {
            pool,
            outcome,
            seen: Vec::new(),
        };
        let (result, _) = with_failover("m", budget, &metrics, first, &mut attempts).await;
        (attempts.seen, result, metrics.rejections("m", "retried"))
    }

    #[tokio::test]
    async fn a_refusal_goes_to_groups_not_yet_tried_within_the_budget() {
        let (seen, result, retried) = run(1, |i| if i == 0 { Err(unavailable(true)) } else { Ok(()) }).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(seen.len(), 2);
        assert_ne!(seen[0], seen[1], "a tried group is not tried again");
        assert_eq!(retried, 1);

        let (seen, result, retried) = run(1, |_| Err(unavailable(true))).await;
        assert!(matches!(result, Err(ApiError::Unavailable(_))), "{result:?}");
        assert_eq!(seen.len(), 2, "one try and one retry");
        assert_eq!(retried, 1);

        let (seen, _, _) = run(5, |_| Err(unavailable(true))).await;
        let mut distinct = seen.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            (seen.len(), distinct.len()),
            (3, 3),
            "every group once, then no group is left: {seen:?}"
        );
    }

    #[tokio::test]
    async fn a_failure_after_the_request_ran_is_never_retried() {
        let (seen, result, retried) = run(3, |_| Err(unavailable(false))).await;
        assert!(result.is_err());
        assert_eq!((seen.len(), retried), (1, 0));
    }
}
