//! Generation through the core: a request checked into a [`ValidGenerate`], admitted,
//! and opened as a stream on a generative group chosen by load. A group that does not
//! start it (unreachable, its queue full, broken before its first token) is skipped for
//! another within the retry budget ([`with_failover`]); once tokens flowed, a failure
//! ends the [`Generation`] with the error.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rankway_proto::limits::check_generate;
use rankway_proto::worker::{ChatMessage, GenerateRequest};
use rankway_runtime::sync;
use tokio::time::Instant;

use super::Gateway;
use super::generation::Generation;
use crate::error::ApiError;
use crate::pool::failover::{Attempts, with_failover};
use crate::pool::{DispatchError, Group, Opened, Pool};
use crate::request_id::RequestId;

/// `max_tokens` when the client sets none.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// What to continue: chat messages (the model's chat template renders them) or text.
#[derive(Debug, Clone)]
pub enum Prompt {
    Chat(Vec<(String, String)>),
    Text(String),
}

/// One generation as a front end hands it over. Field names are the protocols' own
/// where the checks name them.
#[derive(Debug, Clone)]
pub struct GenerateCall {
    pub model: String,
    pub prompt: Prompt,
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub timeout: Option<Duration>,
    pub request_id: RequestId,
}

impl GenerateCall {
    /// The request for rank 0, checked by the rules rank 0 also enforces
    /// ([`check_generate`]) before it costs a group anything; `context` is the model's
    /// context length.
    pub fn validate(self, context: u32) -> Result<ValidGenerate, ApiError> {
        let request = self.to_request(context);
        check_generate(&request, context).map_err(|e| ApiError::InvalidInput(e.to_string()))?;
        Ok(ValidGenerate {
            request,
            timeout: self.timeout,
        })
    }

    fn to_request(&self, context: u32) -> GenerateRequest {
        let (messages, prompt) = match &self.prompt {
            Prompt::Chat(m) => (
                m.iter()
                    .map(|(role, content)| ChatMessage {
                        role: role.clone(),
                        content: content.clone().into_bytes().into(),
                    })
                    .collect(),
                Default::default(),
            ),
            Prompt::Text(t) => (Vec::new(), t.clone().into_bytes().into()),
        };
        GenerateRequest {
            model: self.model.clone(),
            messages,
            prompt,
            max_tokens: self.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS.min(context)),
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop: self.stop.iter().map(|s| s.clone().into_bytes().into()).collect(),
            request_id: self.request_id.0.clone(),
        }
    }
}

/// A generation whose every field has been checked: what goes to rank 0.
#[derive(Debug, Clone)]
pub struct ValidGenerate {
    pub request: GenerateRequest,
    pub timeout: Option<Duration>,
}

/// Requests admitted but not yet streaming, per model: bounded by `--max-waiting-generations`.
#[derive(Default)]
pub struct Admission {
    waiting: std::sync::Mutex<std::collections::HashMap<String, Arc<AtomicUsize>>>,
}

/// Holds one admitted request's place until it streams or fails.
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    fn admit(&self, model: &str, capacity: usize) -> Result<Admitted, ApiError> {
        let counter = {
            let mut map = sync::lock(&self.waiting);
            map.entry(model.to_owned()).or_default().clone()
        };
        if counter.fetch_add(1, Ordering::AcqRel) >= capacity {
            counter.fetch_sub(1, Ordering::AcqRel);
            return Err(ApiError::QueueFull {
                model: model.to_owned(),
                capacity,
                retry_after: Duration::from_secs(1),
            });
        }
        Ok(Admitted(counter))
    }
}

impl Gateway {
    /// Starts a generation on a ready generative group serving the call's model.
    pub async fn generate(&self, call: GenerateCall) -> Result<Generation, ApiError> {
        let model = call.model.clone();
        let result = self.start_generation(call).await;
        if let Err(e) = &result {
            self.metrics.rejection(self.model_label(&model), e.kind());
        }
        result
    }

    async fn start_generation(&self, call: GenerateCall) -> Result<Generation, ApiError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable(
                "gateway is shutting down; retry on another replica".into(),
            ));
        }
        let info = self.ready_model(&call.model)?;
        if !self.pool.is_generative(&call.model) {
            return Err(ApiError::InvalidInput(format!(
                "model {:?} does not generate text (it is an embedding model)",
                call.model
            )));
        }
        let context = self.pool.context_length(&call.model).unwrap_or(u32::MAX);
        let model = call.model.clone();
        let valid = call.validate(context)?;
        let _admitted = self.admission.admit(&model, self.max_waiting_generations)?;
        let timeout = valid
            .timeout
            .map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let started = Instant::now();
        let deadline = started + timeout;
        let span = tracing::info_span!("worker.Generate", otel.kind = "client", model = %model);
        let first = self.pool.choose_generative(&model, &[])?;
        // A stream counts as started once its first message has come: until then nothing
        // has reached the client, so a group that refuses the request or breaks before
        // its first token is skipped for another.
        let mut attempts = OpenStream {
            pool: &self.pool,
            model: &model,
            request: valid.request,
            deadline,
            span,
        };
        let (opened, _) = with_failover(&model, self.retry_budget, &self.metrics, first, &mut attempts).await;
        Ok(Generation::new(
            &model,
            info.version.clone(),
            self.metrics.clone(),
            opened?,
            started,
            deadline,
        ))
    }
}

/// A generation's opening: on each group chosen, a stream up to its first message.
struct OpenStream<'a> {
    pool: &'a Pool,
    model: &'a str,
    request: GenerateRequest,
    deadline: Instant,
    span: tracing::Span,
}

impl Attempts for OpenStream<'_> {
    type Target = Arc<Group>;
    type Answer = Opened;

    fn attempt(&mut self, group: &Arc<Group>) -> impl Future<Output = Result<Opened, DispatchError>> + Send {
        group.open_generation(self.request.clone(), self.deadline, &self.span)
    }

    fn next(&mut self, tried: &[String]) -> impl Future<Output = Result<Arc<Group>, ApiError>> + Send {
        std::future::ready(self.pool.choose_generative(self.model, tried))
    }
}
