//! Generation through the core: checks a request, admits it, opens a stream on a
//! generative group chosen by load, and relays the group's text deltas to the front end.
//!
//! The stream is relayed by its own task through a small channel: when the front end
//! drops the receiver (the client went away, or stopped reading), the task drops the
//! group's stream, and rank 0 takes the sequence out at its next step. A group that
//! refuses a request before starting it (unreachable, its queue full) is skipped for
//! another, up to the retry budget; once tokens flowed, a failure ends the stream with
//! the error.

use rankway_runtime::sync;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rankway_proto::worker::{
    ChatMessage, FinishReason, GenerateRequest, GenerateResponse, MAX_MESSAGES, MAX_PROMPT_BYTES,
    MAX_STOP_BYTES, MAX_STOPS,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Gateway;
use crate::error::ApiError;
use crate::pool::{DispatchError, StreamGuard};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    /// OpenAI's and Triton's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// New text of a generation; the last one has the finish reason and the usage.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish: Option<(Finish, Usage)>,
}

/// An accepted generation: its deltas, then the end of the channel. An error ends it.
pub struct Generation {
    pub model_version: String,
    pub deltas: mpsc::Receiver<Result<Delta, ApiError>>,
}

impl Generation {
    /// Reads the whole generation: its text, finish reason and usage.
    pub async fn collect(mut self) -> Result<(String, Vec<u32>, Finish, Usage), ApiError> {
        let (mut text, mut ids) = (String::new(), Vec::new());
        while let Some(delta) = self.deltas.recv().await {
            let delta = delta?;
            text.push_str(&delta.text);
            ids.extend(delta.token_ids);
            if let Some((finish, usage)) = delta.finish {
                return Ok((text, ids, finish, usage));
            }
        }
        Err(ApiError::Internal(
            "the generation ended without a finish reason".into(),
        ))
    }
}

fn invalid(m: String) -> ApiError {
    ApiError::InvalidInput(m)
}

impl GenerateCall {
    /// The limits rank 0 also enforces, checked before the request costs a group
    /// anything; `context` is the group's context length.
    fn check(&self, context: u32) -> Result<(), ApiError> {
        let bytes = match &self.prompt {
            Prompt::Chat(messages) => {
                if messages.len() > MAX_MESSAGES {
                    return Err(invalid(format!(
                        "{} messages: at most {MAX_MESSAGES}",
                        messages.len()
                    )));
                }
                if messages.is_empty() {
                    return Err(invalid("'messages' must not be empty".into()));
                }
                for (i, (role, _)) in messages.iter().enumerate() {
                    if !matches!(role.as_str(), "system" | "user" | "assistant") {
                        let shown: String = role.chars().take(32).collect();
                        return Err(invalid(format!(
                            "messages[{i}].role {shown:?} is not one of system, user, assistant"
                        )));
                    }
                }
                messages.iter().map(|(_, c)| c.len()).sum()
            }
            Prompt::Text(text) => text.len(),
        };
        if bytes > MAX_PROMPT_BYTES {
            return Err(invalid(format!(
                "the prompt is {bytes} bytes: at most {MAX_PROMPT_BYTES}"
            )));
        }
        let empty = match &self.prompt {
            Prompt::Chat(m) => m.iter().all(|(_, c)| c.trim().is_empty()),
            Prompt::Text(t) => t.is_empty(),
        };
        if empty {
            return Err(invalid("the prompt is empty".into()));
        }
        if let Some(n) = self.max_tokens
            && (n == 0 || n > context)
        {
            return Err(invalid(format!(
                "max_tokens {n} must be between 1 and the context length {context}"
            )));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(invalid(format!(
                "temperature {} must be 0 (greedy) or positive",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(invalid(format!("top_p {p} must be in (0, 1]")));
        }
        if self.stop.len() > MAX_STOPS {
            return Err(invalid(format!(
                "{} stop strings: at most {MAX_STOPS}",
                self.stop.len()
            )));
        }
        if self.stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
            return Err(invalid(format!(
                "a stop string must be 1 to {MAX_STOP_BYTES} bytes"
            )));
        }
        Ok(())
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
        let result = self.start_generation(&call).await;
        if let Err(e) = &result {
            self.metrics.rejection(self.model_label(&call.model), e.kind());
        }
        result
    }

    async fn start_generation(&self, call: &GenerateCall) -> Result<Generation, ApiError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable(
                "gateway is shutting down; retry on another replica".into(),
            ));
        }
        let info = self.ready_model(&call.model)?;
        if !self.pool.is_generative(&call.model) {
            return Err(invalid(format!(
                "model {:?} does not generate text (it is an embedding model)",
                call.model
            )));
        }
        let context = self.pool.context_length(&call.model).unwrap_or(u32::MAX);
        call.check(context)?;
        let _admitted = self.admission.admit(&call.model, self.max_waiting_generations)?;
        let timeout = call
            .timeout
            .map_or(self.request_timeout, |t| t.min(self.request_timeout));
        let started = Instant::now();
        let deadline = started + timeout;
        let request = call.to_request(context);
        let span = tracing::info_span!("worker.Generate", otel.kind = "client", model = %call.model);
        let mut tried = Vec::new();
        // Open a stream and wait for its first message: until then nothing has reached
        // the client, so a group that refuses the request or breaks before its first
        // token (its rank 0's model thread failed) is skipped for another.
        let (stream, guard, first) = loop {
            let group = self.pool.choose_generative(&call.model, &tried)?;
            let opened = match group.generate(request.clone(), deadline, &span).await {
                Ok((mut stream, guard)) => match tokio::time::timeout_at(deadline, stream.message()).await {
                    Ok(Ok(Some(first))) => Ok((stream, guard, first)),
                    Ok(Ok(None)) => Err(DispatchError {
                        error: ApiError::Unavailable(format!(
                            "group {:?} ended the stream at once",
                            group.name()
                        )),
                        not_started: true,
                    }),
                    Ok(Err(status)) => Err(DispatchError {
                        not_started: true,
                        ..group.failed(&status, deadline)
                    }),
                    Err(_) => Err(DispatchError {
                        error: ApiError::DeadlineExceeded("no first token before the deadline".into()),
                        not_started: false,
                    }),
                },
                Err(e) => Err(e),
            };
            match opened {
                Ok(opened) => break opened,
                Err(e)
                    if e.not_started
                        && matches!(e.error, ApiError::Unavailable(_))
                        && tried.len() < self.retry_budget =>
                {
                    tracing::info!(group = %group.name(), error = %e.error, "group did not start the generation; trying another");
                    self.metrics.rejection(&call.model, "retried");
                    tried.push(group.name().to_owned());
                }
                Err(e) => return Err(e.error),
            }
        };
        let (tx, deltas) = mpsc::channel(16);
        let relay = Relay {
            model: call.model.clone(),
            metrics: self.metrics.clone(),
            started,
            deadline,
        };
        tokio::spawn(relay.run(first, stream, guard, tx));
        Ok(Generation {
            model_version: info.version.clone(),
            deltas,
        })
    }
}

/// Copies one group stream's messages to a front end, timing its tokens.
struct Relay {
    model: String,
    metrics: Arc<crate::metrics::Metrics>,
    started: Instant,
    deadline: Instant,
}

impl Relay {
    async fn run(
        self,
        first: GenerateResponse,
        mut stream: tonic::Streaming<GenerateResponse>,
        guard: StreamGuard,
        tx: mpsc::Sender<Result<Delta, ApiError>>,
    ) {
        let open = self.metrics.open_streams(&self.model);
        open.inc();
        let mut last: Option<Instant> = None;
        let mut first = Some(first);
        loop {
            let next = tokio::select! {
                next = async { match first.take() { Some(m) => Ok(Some(m)), None => stream.message().await } } => next,
                // The client went away: dropping the stream cancels the sequence.
                _ = tx.closed() => break,
            };
            let delta = match next {
                Ok(Some(msg)) => {
                    let now = Instant::now();
                    for _ in &msg.token_ids {
                        if last.is_none() {
                            self.metrics.observe_first_token(&self.model, now - self.started);
                        }
                        self.metrics.observe_token(&self.model, last.map(|t| now - t));
                        last = Some(now);
                    }
                    Ok(to_delta(msg))
                }
                Ok(None) => Err(ApiError::Unavailable(format!(
                    "group {:?} ended the stream without finishing it",
                    guard.group().name()
                ))),
                Err(status) => Err(guard.group().failed(&status, self.deadline).error),
            };
            let end = !matches!(&delta, Ok(d) if d.finish.is_none());
            if tx.send(delta).await.is_err() || end {
                break;
            }
        }
        open.dec();
    }
}

fn to_delta(msg: GenerateResponse) -> Delta {
    let finish = match FinishReason::try_from(msg.finish_reason) {
        Ok(FinishReason::Stop) => Some(Finish::Stop),
        Ok(FinishReason::Length) => Some(Finish::Length),
        _ => None,
    };
    Delta {
        text: msg.text,
        token_ids: msg.token_ids,
        finish: finish.map(|f| {
            (
                f,
                Usage {
                    prompt_tokens: msg.prompt_tokens,
                    completion_tokens: msg.completion_tokens,
                },
            )
        }),
    }
}
