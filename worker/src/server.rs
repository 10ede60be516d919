//! Rank 0's gRPC face: `rankway.worker.v1.Worker`, and `grpc.health.v1` on every rank.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rankway_proto::worker::worker_server::{Worker, WorkerServer};
use rankway_proto::worker::{
    GenerateRequest, GroupStatusRequest, GroupStatusResponse, InferRequest, InferResponse, MAX_MESSAGE_BYTES,
    ModelKind, NOT_STARTED_KEY, RankState,
};
use rankway_runtime::telemetry;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::engine::EngineError;
use crate::engine::embedding::EngineHandle;
use crate::generate::service::{GenService, GenerateStream};
use crate::models::ModelError;
use crate::stats::EngineStats;
use crate::wire;

/// The one place an engine error becomes a gRPC status.
impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::Overloaded(_) => not_started(Status::resource_exhausted(msg)),
            EngineError::NotReady(_) => not_started(Status::unavailable(msg)),
            EngineError::Stopped(_) => Status::unavailable(msg),
            EngineError::Model(ModelError::InvalidInput(_)) => Status::invalid_argument(msg),
            EngineError::Model(ModelError::Busy(_)) => not_started(Status::resource_exhausted(msg)),
            EngineError::Model(ModelError::Collective(_)) => Status::unavailable(msg),
            EngineError::Model(ModelError::Load(_) | ModelError::Torch(_)) => Status::internal(msg),
        }
    }
}

/// Marks an error for a batch refused before it ran, so the gateway may retry it on
/// another group (the key the gateway's pool reads).
fn not_started(mut status: Status) -> Status {
    status
        .metadata_mut()
        .insert(NOT_STARTED_KEY, tonic::metadata::MetadataValue::from_static("1"));
    status
}

/// What rank 0's model thread runs.
pub enum Engine {
    /// One forward per batch (`Infer`).
    Embedding(EngineHandle),
    /// Sequences batched step by step (`Generate`).
    Generative(GenService),
}

impl Engine {
    fn stats(&self) -> &Arc<EngineStats> {
        match self {
            Engine::Embedding(e) => e.stats(),
            Engine::Generative(g) => g.handle().stats(),
        }
    }
}

/// Rank 0's `rankway.worker.v1.Worker`.
pub struct WorkerService {
    engine: Engine,
    group: String,
    world_size: u32,
    generation: u64,
}

impl WorkerService {
    pub fn new(engine: Engine, group: String, world_size: u32) -> Self {
        // Start time in ms: a restarted group reports a new generation.
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            engine,
            group,
            world_size,
            generation,
        }
    }

    pub fn into_server(self) -> WorkerServer<Self> {
        WorkerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// The error for a call the group's kind of model does not serve.
fn wrong_kind(stats: &EngineStats, want: &str) -> Status {
    let name = stats.signature().map_or("this model", |s| s.name.as_str());
    Status::invalid_argument(format!("{name} does not serve {want}"))
}

/// A request id as it may go into a log line: the gateway's (1..=128 visible ASCII
/// characters), else "-". Rank 0 checks again what the gateway checked: a client that
/// reaches the worker port directly must not write a newline or a terminal escape into
/// the log.
fn loggable_id(id: &str) -> &str {
    if (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()) {
        id
    } else {
        "-"
    }
}

/// A batch's request ids for its log lines: each through [`loggable_id`], at most
/// [`LOGGED_IDS`] of them.
fn loggable_ids(ids: &[String]) -> String {
    let mut out: Vec<&str> = ids.iter().take(LOGGED_IDS).map(|id| loggable_id(id)).collect();
    let more = ids.len().saturating_sub(LOGGED_IDS);
    let more = format!("+{more} more");
    if ids.len() > LOGGED_IDS {
        out.push(&more);
    }
    out.join(",")
}

/// Request ids one log line names at most (a batch holds up to `--max-batch-size` rows).
const LOGGED_IDS: usize = 64;

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let Engine::Generative(service) = &self.engine else {
            return Err(wrong_kind(
                self.engine.stats(),
                "Generate: it is an embedding model (use Infer)",
            ));
        };
        let deadline = rankway_proto::grpc_timeout(request.metadata()).map_err(Status::invalid_argument)?;
        let (metadata, _, req) = request.into_parts();
        let request_id = loggable_id(&req.request_id);
        let span = tracing::info_span!("rank0.Generate", otel.kind = "server", group = %self.group, rank = 0, request_id);
        telemetry::set_parent(&span, telemetry::extract(&metadata.into_headers()));
        if let Some(name) = self.engine.stats().signature().map(|s| &s.name)
            && !req.model.is_empty()
            && &req.model != name
        {
            return Err(Status::not_found(format!(
                "this group serves {name}, not the model requested"
            )));
        }
        let stream = service.generate(req, deadline).instrument(span).await?;
        Ok(Response::new(stream))
    }

    async fn infer(&self, request: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        let Engine::Embedding(engine) = &self.engine else {
            return Err(wrong_kind(
                self.engine.stats(),
                "Infer: it is a generative model (use Generate)",
            ));
        };
        let (metadata, _, req) = request.into_parts();
        // The gateway's request ids: every log line of the batch names its requests.
        let request_ids = loggable_ids(&req.request_ids);
        // A child of the gateway's call, through `traceparent` in the metadata.
        let span = tracing::info_span!(
            "rank0.Infer",
            otel.kind = "server",
            group = %self.group,
            rank = 0,
            batch_id = req.batch_id,
            request_ids = %request_ids,
        );
        telemetry::set_parent(&span, telemetry::extract(&metadata.into_headers()));
        let inputs = req
            .inputs
            .into_iter()
            .map(wire::tensor_from_wire)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Status::invalid_argument)?;
        // The batch's deadline is the call's `grpc-timeout`: tonic's server drops this
        // future when it passes, which takes the batch out of the model thread's queue.
        let started = Instant::now();
        let out = engine.infer(req.batch_id, inputs).instrument(span.clone()).await;
        span.in_scope(|| match &out {
            Ok(o) => tracing::debug!(
                rows = o.rows,
                queue_us = o.queue_time.as_micros() as u64,
                compute_us = o.compute_time.as_micros() as u64,
                total_us = started.elapsed().as_micros() as u64,
                "batch done"
            ),
            Err(e) => tracing::warn!(error = %e, "batch failed"),
        });
        let out = out?;
        let stats = engine.stats();
        Ok(Response::new(InferResponse {
            batch_id: req.batch_id,
            model_version: stats.signature().map(|s| s.version.clone()).unwrap_or_default(),
            outputs: out.outputs.into_iter().map(wire::tensor_to_wire).collect(),
            queue_us: out.queue_time.as_micros() as u64,
            compute_us: out.compute_time.as_micros() as u64,
        }))
    }

    async fn group_status(
        &self,
        _request: Request<GroupStatusRequest>,
    ) -> Result<Response<GroupStatusResponse>, Status> {
        let stats = self.engine.stats();
        // Rank 0 sees the followers through the collectives: they are ready once the
        // warm-up ran on all of them, and broken together with the group.
        let phase = stats.phase();
        let ranks = (0..self.world_size)
            .map(|rank| RankState {
                rank,
                phase: wire::phase_to_wire(phase) as i32,
                host: String::new(),
            })
            .collect();
        Ok(Response::new(GroupStatusResponse {
            group: self.group.clone(),
            generation: self.generation,
            world_size: self.world_size,
            ranks,
            model: stats.signature().map(wire::signature_to_wire),
            batches_in_flight: stats.running.load(Ordering::Acquire) as u32,
            queue_depth: stats.queued.load(Ordering::Acquire) as u32,
            ready: stats.is_ready(),
            reason: stats.not_ready_reason(),
            batches_completed: stats.batches.load(Ordering::Acquire) as u64,
            kind: match &self.engine {
                Engine::Embedding(_) => ModelKind::Embedding,
                Engine::Generative(_) => ModelKind::Generative,
            } as i32,
            generation_state: match &self.engine {
                Engine::Embedding(_) => None,
                Engine::Generative(g) => Some(g.status()),
            },
        }))
    }
}

/// Health service name that is SERVING for as long as the process serves gRPC, even
/// while the rank waits for its peers: the liveness probe's, so Kubernetes does not kill
/// a rank merely waiting at rendezvous (a group that breaks ends its processes itself).
pub const LIVENESS_SERVICE: &str = "liveness";

/// Keeps `grpc.health.v1` in step with the engine: SERVING exactly while
/// [`EngineStats::serving`].
pub async fn track_health(
    reporter: tonic_health::server::HealthReporter,
    stats: Arc<EngineStats>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let mut last = None;
    loop {
        let status = if stats.serving(*stop.borrow()) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            for service in ["", rankway_proto::worker::worker_server::SERVICE_NAME] {
                reporter.set_service_status(service, status).await;
            }
            last = Some(status);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = stop.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_cannot_forge_log_lines() {
        assert_eq!(loggable_id("abc-123"), "abc-123");
        for bad in ["", "a\nFAKE LINE", "\u{1b}[31mred", "spa ce", &"x".repeat(129)] {
            assert_eq!(loggable_id(bad), "-", "{bad:?}");
        }
        let ids: Vec<String> = (0..100)
            .map(|i| if i == 1 { "x\ny".into() } else { format!("r{i}") })
            .collect();
        let shown = loggable_ids(&ids);
        assert!(shown.starts_with("r0,-,r2,"), "{shown}");
        assert!(shown.ends_with(",r63,+36 more"), "{shown}");
    }
}
