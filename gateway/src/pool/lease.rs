//! A lease: one of a group's in-flight slots, held while its batch is out.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rankway_proto::worker::{InferRequest, InferResponse};
use rankway_runtime::sync;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::PoolInner;
use super::connect::call_request;
use super::group::{DispatchError, Group};

/// A slot on one group; the batch it carries is sent with [`Lease::infer`].
pub struct Lease {
    pub(super) group: Arc<Group>,
    pub(super) pool: Arc<PoolInner>,
    pub(super) _permit: OwnedSemaphorePermit,
}

impl Lease {
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Runs `request` on the group by `deadline`, which goes to rank 0 as the call's
    /// `grpc-timeout` (its server enforces it); `trace` is the call's span, whose context
    /// goes along as `traceparent`. A failure says whether the group never started the
    /// batch (safe to retry elsewhere) or lost it (its callers must be told). An answer
    /// comes with how long the call took.
    pub async fn infer(
        &self,
        request: InferRequest,
        deadline: Instant,
        trace: &tracing::Span,
    ) -> Result<(InferResponse, Duration), DispatchError> {
        self.group.batches.fetch_add(1, Ordering::Relaxed);
        let mut client = self.group.client.clone();
        let req = call_request(request, deadline, trace, self.group.token.as_deref());
        let started = Instant::now();
        let result = client.infer(req).await;
        match result {
            Ok(resp) => {
                sync::lock(&self.group.breaker).on_success();
                let resp = resp.into_inner();
                let took = started.elapsed();
                self.group
                    .observe_call(took.as_micros() as u64, resp.compute_us, resp.queue_us);
                Ok((resp, took))
            }
            Err(status) => Err(self.group.failed(&status, deadline)),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The permit is released after this; wake batchers to look again.
        self.pool.changed.notify_waiters();
    }
}
