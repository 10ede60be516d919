//! Rank 0's gRPC face: `rankway.worker.v1.Worker` and `grpc.health.v1.Health`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rankway_proto::worker::worker_server::{Worker, WorkerServer};
use rankway_proto::worker::{
    GroupStatusRequest, GroupStatusResponse, InferRequest, InferResponse, RankPhase, RankState,
};
use tonic::{Request, Response, Status};

use crate::engine::{EngineError, EngineHandle};
use crate::models::ModelError;

/// Largest gRPC message the worker accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The one place an engine error becomes a gRPC status.
impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::Overloaded(_) => Status::resource_exhausted(msg),
            EngineError::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            EngineError::NotReady(_) | EngineError::Stopped => Status::unavailable(msg),
            EngineError::Model(ModelError::InvalidInput(_)) => Status::invalid_argument(msg),
            EngineError::Model(ModelError::Collective(_)) => Status::unavailable(msg),
            EngineError::Model(ModelError::Load(_) | ModelError::Torch(_)) => Status::internal(msg),
        }
    }
}

pub struct WorkerService {
    engine: EngineHandle,
    group: String,
    generation: u64,
    host: String,
}

impl WorkerService {
    pub fn new(engine: EngineHandle, group: String) -> Self {
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        Self {
            engine,
            group,
            generation,
            host,
        }
    }

    pub fn into_server(self) -> WorkerServer<Self> {
        WorkerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn infer(&self, request: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        let req = request.into_inner();
        let deadline = (req.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(req.timeout_ms));
        let started = Instant::now();
        let out = self.engine.infer(req.inputs, deadline).await;
        match &out {
            Ok(o) => tracing::debug!(
                batch_id = req.batch_id,
                rows = o.rows,
                queue_us = o.queue_time.as_micros() as u64,
                compute_us = o.compute_time.as_micros() as u64,
                total_us = started.elapsed().as_micros() as u64,
                "batch done"
            ),
            Err(e) => tracing::warn!(batch_id = req.batch_id, error = %e, "batch failed"),
        }
        let out = out?;
        Ok(Response::new(InferResponse {
            batch_id: req.batch_id,
            outputs: out.outputs,
            queue_us: out.queue_time.as_micros() as u64,
            compute_us: out.compute_time.as_micros() as u64,
        }))
    }

    async fn group_status(
        &self,
        _request: Request<GroupStatusRequest>,
    ) -> Result<Response<GroupStatusResponse>, Status> {
        let stats = self.engine.stats();
        let ready = stats.is_ready();
        let (phase, reason) = match (ready, stats.failure()) {
            (true, _) => (RankPhase::Ready, String::new()),
            (false, Some(why)) => (RankPhase::Broken, format!("model thread failed: {why}")),
            (false, None) => (RankPhase::Warming, "loading the model and warming up".into()),
        };
        Ok(Response::new(GroupStatusResponse {
            group: self.group.clone(),
            generation: self.generation,
            world_size: 1,
            ranks: vec![RankState {
                rank: 0,
                phase: phase as i32,
                host: self.host.clone(),
            }],
            model: stats.info().cloned(),
            batches_in_flight: stats.running.load(Ordering::Acquire) as u32,
            queue_depth: stats.queued.load(Ordering::Acquire) as u32,
            ready,
            reason,
            batches_completed: stats.batches.load(Ordering::Acquire) as u64,
        }))
    }
}

/// Keeps `grpc.health.v1` in step with the engine: SERVING exactly while it is ready.
pub async fn track_health(
    reporter: tonic_health::server::HealthReporter,
    stats: Arc<crate::engine::EngineStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let mut last = None;
    loop {
        let status = if stats.is_ready() && !*stop.borrow() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status("rankway.worker.v1.Worker", status)
                .await;
            last = Some(status);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.changed() => {}
        }
    }
}
