//! The gateway's core, the one way in to the pool: model lookup and metadata, readiness,
//! the groups' views, validation, batching. Front ends translate protocols into these
//! calls; none of them holds the pool.

use rankway_runtime::sync;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rankway_proto::worker::{ModelInfo, Tensor};
use tokio::time::Instant;

use crate::batcher::{BatchConfig, Batcher, Served};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::pool::{GroupView, Pool};
use crate::request_id::RequestId;
use crate::validation::validate;

/// One inference as a front end hands it over.
#[derive(Debug)]
pub struct InferCall {
    pub model: String,
    pub inputs: Vec<Tensor>,
    /// Outputs the client asked for (all when empty).
    pub outputs: Vec<String>,
    /// The client's own timeout (`Request-Timeout`, `grpc-timeout`), capped by the
    /// gateway's `--request-timeout`.
    pub timeout: Option<Duration>,
    pub request_id: RequestId,
}

pub mod generate;
pub mod generation;

pub struct Gateway {
    pool: Pool,
    metrics: Arc<Metrics>,
    batch: BatchConfig,
    request_timeout: Duration,
    batchers: Mutex<HashMap<String, Batcher>>,
    draining: AtomicBool,
    admission: generate::Admission,
    /// Generations admitted and not yet streaming, per model, at most.
    max_waiting_generations: usize,
    /// Other groups a generation may go to when one refused it before starting it.
    retry_budget: usize,
    /// Longest text of an embedding request, in bytes.
    max_text_bytes: usize,
}

impl Gateway {
    pub fn new(pool: Pool, metrics: Arc<Metrics>, batch: BatchConfig, request_timeout: Duration) -> Self {
        Self {
            pool,
            metrics,
            batch,
            request_timeout,
            batchers: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            admission: generate::Admission::default(),
            max_waiting_generations: 256,
            max_text_bytes: rankway_proto::limits::DEFAULT_MAX_TEXT_BYTES,
            retry_budget: batch.retry_budget,
        }
    }

    /// Bounds generations admitted and not yet streaming, per model.
    pub fn with_max_text_bytes(mut self, n: usize) -> Self {
        self.max_text_bytes = n;
        self
    }

    pub fn with_max_waiting_generations(mut self, n: usize) -> Self {
        self.max_waiting_generations = n;
        self
    }

    /// From now on: not ready, and new requests are refused; accepted ones finish.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Ready = not draining and at least one group routable.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && self.pool.any_ready()
    }

    /// The model's signature if a ready group serves it; otherwise why not.
    pub fn ready_model(&self, name: &str) -> Result<Arc<ModelInfo>, ApiError> {
        check_model_name(name)?;
        if let Some(info) = self.pool.model_info(name) {
            return Ok(info);
        }
        if self.pool.known_model_info(name).is_some() {
            Err(ApiError::Unavailable(format!(
                "model {name:?} has no ready worker group"
            )))
        } else {
            Err(ApiError::ModelNotFound(name.to_owned()))
        }
    }

    /// Whether `name` can take requests now; an error only when no group knows it.
    pub fn model_ready(&self, name: &str) -> Result<bool, ApiError> {
        match self.ready_model(name) {
            Ok(_) => Ok(true),
            Err(ApiError::Unavailable(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The model's signature from any group that reported it, ready or not.
    pub fn model_metadata(&self, name: &str) -> Result<Arc<ModelInfo>, ApiError> {
        self.pool
            .known_model_info(name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_owned()))
    }

    /// Whether `model` is served by generative groups (text in, text out, streamed).
    pub fn is_generative(&self, model: &str) -> bool {
        self.pool.is_generative(model)
    }

    /// Names of the models some ready group serves.
    pub fn ready_models(&self) -> Vec<String> {
        self.pool.ready_models()
    }

    /// Every known group as `/admin/groups` shows it.
    pub fn groups(&self) -> Vec<GroupView> {
        self.pool.views()
    }

    /// The Prometheus text of `/metrics`, group gauges read now.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.pool.views())
    }

    /// Validates the call's inputs, queues them and waits for their rows of a batch. The
    /// answer names the version of the group that ran that batch.
    pub async fn infer(&self, call: InferCall) -> Result<Served, ApiError> {
        let model = call.model.clone();
        let result = async {
            if self.draining.load(Ordering::Acquire) {
                return Err(ApiError::Unavailable(
                    "gateway is shutting down; retry on another replica".into(),
                ));
            }
            let timeout = call
                .timeout
                .map_or(self.request_timeout, |t| t.min(self.request_timeout));
            let deadline = Instant::now() + timeout;
            let info = self.ready_model(&call.model)?;
            let request = validate(&info, call.inputs, self.max_text_bytes)?;
            let served = self
                .batcher(&call.model)
                .submit(request, deadline, call.request_id)
                .await?;
            served.select_outputs(&call.outputs)
        }
        .await;
        if let Err(e) = &result {
            self.metrics.rejection(self.model_label(&model), e.kind());
        }
        result
    }

    /// `model` as a metric label: a name some group serves or once served, else
    /// "unknown", so that names a client makes up never become series.
    pub(crate) fn model_label<'a>(&self, model: &'a str) -> &'a str {
        if self.pool.known_model_info(model).is_some() {
            model
        } else {
            "unknown"
        }
    }

    fn batcher(&self, model: &str) -> Batcher {
        let mut map = sync::lock(&self.batchers);
        map.entry(model.to_owned())
            .or_insert_with(|| {
                Batcher::spawn(
                    model.to_owned(),
                    self.batch,
                    self.pool.clone(),
                    self.metrics.clone(),
                )
            })
            .clone()
    }
}

/// Longest model name accepted, in bytes (served names are short; Kubernetes names are at
/// most 253). A longer one is refused before anything looks it up, logs or echoes it.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// Refuses an empty or overlong model name, without repeating it.
pub fn check_model_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::InvalidInput("the model name is empty".into()));
    }
    if name.len() > MAX_MODEL_NAME_BYTES {
        return Err(ApiError::InvalidInput(format!(
            "the model name is {} bytes long; at most {MAX_MODEL_NAME_BYTES} are accepted",
            name.len()
        )));
    }
    Ok(())
}
