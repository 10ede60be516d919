//! The gateway's core, shared by every front end: model lookup, validation, batching.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rankway_proto::worker::{ModelInfo, Tensor};
use tokio::time::Instant;

use crate::batcher::{BatchConfig, Batcher};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::model::validate;
use crate::pool::Pool;
use crate::request_id::RequestId;

pub struct Gateway {
    pub pool: Pool,
    pub metrics: Arc<Metrics>,
    batch: BatchConfig,
    request_timeout: Duration,
    batchers: Mutex<HashMap<String, Batcher>>,
    draining: AtomicBool,
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
        }
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
    pub fn ready_model(&self, name: &str) -> Result<ModelInfo, ApiError> {
        if let Some(info) = self.pool.model_info(name) {
            return Ok(info);
        }
        let known = self.pool.views().iter().any(|v| v.model.as_deref() == Some(name));
        if known {
            Err(ApiError::Unavailable(format!(
                "model {name:?} has no ready worker group"
            )))
        } else {
            Err(ApiError::ModelNotFound(name.to_owned()))
        }
    }

    /// A deadline from an optional client timeout, capped by the default.
    pub fn deadline(&self, client_timeout: Option<Duration>) -> Instant {
        let t = client_timeout.map_or(self.request_timeout, |t| t.min(self.request_timeout));
        Instant::now() + t
    }

    /// Validates `inputs` for `model`, queues them and waits for their rows of the batch.
    pub async fn infer(
        &self,
        model: &str,
        inputs: Vec<Tensor>,
        deadline: Instant,
        request_id: RequestId,
    ) -> Result<Vec<Tensor>, ApiError> {
        let result = async {
            if self.draining.load(Ordering::Acquire) {
                return Err(ApiError::Unavailable(
                    "gateway is shutting down; retry on another replica".into(),
                ));
            }
            let info = self.ready_model(model)?;
            let request = validate(&info, inputs)?;
            self.batcher(model).submit(request, deadline, request_id).await
        }
        .await;
        if let Err(e) = &result {
            self.metrics.rejection(model, e.kind());
        }
        result
    }

    fn batcher(&self, model: &str) -> Batcher {
        let mut map = self.batchers.lock().expect("batchers lock");
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
