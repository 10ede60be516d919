//! A [`Collective`] wrapper that measures: every collective is timed into the rank's
//! metrics and, inside a traced step, gets a span of its own (only when traces are
//! exported: `telemetry::TRACE_ONLY`).

use std::sync::Arc;
use std::time::Instant;

use rankway_runtime::telemetry::TRACE_ONLY;
use tracing::Span;

use super::{Collective, CollectiveError, Shard};
use crate::metrics::WorkerMetrics;

/// A [`Collective`] that times every operation into the metrics and, inside a traced
/// step, opens a span for it. Idle heartbeats run outside any span and make none.
pub struct Observed<C> {
    inner: C,
    metrics: Arc<WorkerMetrics>,
}

impl<C: Collective> Observed<C> {
    pub fn new(inner: C, metrics: Arc<WorkerMetrics>) -> Self {
        Self { inner, metrics }
    }

    fn timed(
        &self,
        op: &'static str,
        f: impl FnOnce() -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        let span = if Span::current().is_none() {
            Span::none()
        } else {
            tracing::info_span!(target: TRACE_ONLY, "collective", op, rank = self.inner.shard().rank)
        };
        let _entered = span.enter();
        let started = Instant::now();
        let result = f();
        self.metrics.observe_collective(op, started.elapsed());
        result
    }
}

impl<C: Collective> Collective for Observed<C> {
    fn shard(&self) -> Shard {
        self.inner.shard()
    }

    fn device(&self) -> tch::Device {
        self.inner.device()
    }

    fn all_reduce_sum(&self, tensor: &mut tch::Tensor) -> Result<(), CollectiveError> {
        self.timed("all_reduce", || self.inner.all_reduce_sum(tensor))
    }

    fn broadcast(&self, tensor: &mut tch::Tensor, root: usize) -> Result<(), CollectiveError> {
        self.timed("broadcast", || self.inner.broadcast(tensor, root))
    }
}
