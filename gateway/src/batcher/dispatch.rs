//! A batch's way to a group and back: its spans, the call (with failover to another
//! group), the reply checked against the signature and cut into each caller's share.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rankway_proto::worker::{InferRequest, InferResponse};
use rankway_runtime::telemetry::{self, TRACE_ONLY};
use tokio::time::Instant;
use tracing::Instrument;

use super::rows::{concat_inputs, split_outputs};
use super::{BATCH_IDS, Entry, Served};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::pool::failover::{Attempts, with_failover};
use crate::pool::{DispatchError, Lease, Pool};
use crate::validation::check_reply;

pub(super) struct Dispatch {
    pub(super) model: String,
    pub(super) metrics: Arc<Metrics>,
    pub(super) pool: Pool,
    pub(super) retry_budget: usize,
    pub(super) batch: Vec<Entry>,
    pub(super) rows: usize,
}

impl Dispatch {
    pub(super) async fn run(mut self, lease: Lease) {
        let now = Instant::now();
        let batch_id = BATCH_IDS.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            target: TRACE_ONLY,
            "batch",
            model = %self.model,
            batch_id,
            batch_size = self.rows,
            requests = self.batch.len(),
            group = tracing::field::Empty,
        );
        telemetry::set_parent_span(&span, &self.batch[0].span);
        for e in &mut self.batch {
            self.metrics.observe_queue_time(&self.model, now - e.enqueued);
            telemetry::add_link(&span, &e.span);
            e.queue_span = None;
        }
        self.dispatch(lease, batch_id, now).instrument(span).await;
    }

    async fn dispatch(self, lease: Lease, batch_id: u64, now: Instant) {
        // The batch is worth running while any of its callers still waits.
        let deadline = self.batch.iter().map(|e| e.deadline).max().unwrap_or(now);
        let request = InferRequest {
            batch_id,
            model: self.model.clone(),
            inputs: concat_inputs(&self.batch),
            request_ids: self.batch.iter().map(|e| e.request_id.0.clone()).collect(),
        };
        let mut attempts = BatchAttempts {
            pool: &self.pool,
            metrics: &self.metrics,
            model: &self.model,
            request,
            deadline,
            rows: self.rows,
            batch_id,
        };
        let (result, lease) = with_failover(
            &self.model,
            self.retry_budget,
            &self.metrics,
            lease,
            &mut attempts,
        )
        .await;
        let group = lease.group().name().to_owned();
        drop(lease);
        let answered = result.and_then(|(resp, worker_time)| {
            let sizes: Vec<usize> = self.batch.iter().map(|e| e.request.rows).collect();
            let info = self
                .pool
                .known_model_info(&self.model)
                .ok_or_else(|| ApiError::BadReply(format!("no signature is known for {:?}", self.model)))?;
            check_reply(&info, &resp.outputs, self.rows)?;
            let parts = split_outputs(resp.outputs, &sizes)?;
            Ok((parts, resp.model_version, worker_time))
        });
        match answered {
            Ok((parts, model_version, worker_time)) => {
                for (e, outputs) in self.batch.into_iter().zip(parts) {
                    let _ = e.reply.send(Ok(Served {
                        outputs,
                        model_version: model_version.clone(),
                        worker_time,
                    }));
                }
            }
            Err(err) => {
                // Its own fields name the batch: the `batch` span exists only with traces.
                tracing::warn!(model = %self.model, batch_id, %group, error = %err, "batch failed");
                self.fail(err);
            }
        }
    }

    fn fail(self, err: ApiError) {
        for e in self.batch {
            let _ = e.reply.send(Err(err.clone()));
        }
    }
}

/// A batch's calls: to the group of each lease, the next lease from the pool.
struct BatchAttempts<'a> {
    pool: &'a Pool,
    metrics: &'a Metrics,
    model: &'a str,
    request: InferRequest,
    deadline: Instant,
    rows: usize,
    batch_id: u64,
}

impl Attempts for BatchAttempts<'_> {
    type Target = Lease;
    type Answer = (InferResponse, Duration);

    fn attempt(&mut self, lease: &Lease) -> impl Future<Output = Result<Self::Answer, DispatchError>> + Send {
        let group = lease.group().name();
        tracing::Span::current().record("group", group);
        self.metrics.observe_batch(self.model, group, self.rows);
        let call = tracing::info_span!(target: TRACE_ONLY, "worker.Infer", otel.kind = "client", group = %group, batch_id = self.batch_id);
        let (metrics, request, deadline) = (self.metrics, self.request.clone(), self.deadline);
        async move {
            let (resp, took) = lease
                .infer(request, deadline, &call)
                .instrument(call.clone())
                .await?;
            metrics.observe_worker_call(group, took);
            Ok((resp, took))
        }
    }

    fn next(&mut self, tried: &[String]) -> impl Future<Output = Result<Lease, ApiError>> + Send {
        let acquire = tokio::time::timeout_at(self.deadline, self.pool.acquire(self.model, tried));
        async move {
            acquire.await.unwrap_or_else(|_| {
                Err(ApiError::DeadlineExceeded(
                    "no group freed before the deadline".into(),
                ))
            })
        }
    }
}
