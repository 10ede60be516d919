//! Rank 0's `Generate`: checks and tokenizes the request, submits the sequence, and
//! streams its text as the model thread produces tokens.
//!
//! The deadline is the call's `grpc-timeout`, enforced here for the whole stream (tonic
//! bounds only the time to the response headers). When it passes, or the client goes,
//! the stream task ends and drops the sequence's receiver: rank 0 takes the sequence out
//! at its next step and frees its cache.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rankway_proto::limits::check_generate;
use rankway_proto::worker::{FinishReason, GenerateRequest, GenerateResponse, Generation};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument;

use super::engine::{Event, GenHandle};
use super::sampling::Sampling;
use super::schedule::Finish;
use super::text::TextStream;
use crate::engine::EngineError;
use crate::models::ModelError;
use crate::models::llama::tokenizer::{ChatTokenizer, Message, Role};

pub type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;

pub struct GenService {
    handle: GenHandle,
    tokenizer: Arc<ChatTokenizer>,
    /// Time from a call's arrival to its first token.
    ttft: prometheus::Histogram,
}

fn utf8(field: &str, bytes: bytes::Bytes) -> Result<String, ModelError> {
    std::str::from_utf8(&bytes).map(str::to_owned).map_err(|e| {
        ModelError::InvalidInput(format!("{field} is not valid UTF-8 (byte {})", e.valid_up_to()))
    })
}

impl GenService {
    pub fn new(handle: GenHandle, tokenizer: Arc<ChatTokenizer>, ttft: prometheus::Histogram) -> Self {
        Self {
            handle,
            tokenizer,
            ttft,
        }
    }

    pub fn handle(&self) -> &GenHandle {
        &self.handle
    }

    /// The generation fields of GroupStatus.
    pub fn status(&self) -> Generation {
        let s = self.handle.gen_stats();
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Acquire);
        Generation {
            context_length: load(&s.context) as u32,
            running_sequences: load(&s.running) as u32,
            waiting_sequences: load(&s.waiting) as u32,
            free_kv_tokens: load(&s.free_kv_tokens) as u64,
            total_kv_tokens: load(&s.total_kv_tokens) as u64,
            steps: s.steps.load(Ordering::Acquire),
            shared_steps: s.shared_steps.load(Ordering::Acquire),
        }
    }

    /// The prompt's token ids, from a request [`check_generate`] has passed.
    fn prompt(&self, req: &mut GenerateRequest) -> Result<Vec<u32>, ModelError> {
        if req.messages.is_empty() {
            // A raw prompt is the model's own format: control tokens written are those tokens.
            return self
                .tokenizer
                .encode(&utf8("prompt", std::mem::take(&mut req.prompt))?);
        }
        let messages = std::mem::take(&mut req.messages)
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                Ok(Message {
                    role: Role::parse(&m.role)?,
                    content: utf8(&format!("messages[{i}].content"), m.content)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        self.tokenizer.encode_chat(&messages)
    }

    pub async fn generate(
        &self,
        mut req: GenerateRequest,
        deadline: Option<Duration>,
    ) -> Result<GenerateStream, Status> {
        let arrived = std::time::Instant::now();
        let invalid = |e: ModelError| Status::from(EngineError::Model(e));
        // Zero until the model thread has loaded the model; the scheduler checks again.
        let context = match self.handle.gen_stats().context.load(Ordering::Acquire) {
            0 => u32::MAX,
            n => u32::try_from(n).unwrap_or(u32::MAX),
        };
        check_generate(&req, context).map_err(|e| invalid(ModelError::InvalidInput(e.to_string())))?;
        let prompt = self.prompt(&mut req).map_err(invalid)?;
        let stops = std::mem::take(&mut req.stop)
            .into_iter()
            .enumerate()
            .map(|(i, s)| utf8(&format!("stop[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let sampling = Sampling {
            max_tokens: req.max_tokens as usize,
            temperature: req.temperature,
            top_p: req.top_p.unwrap_or(1.0),
            seed: req.seed,
        };
        let prompt_tokens = prompt.len() as u32;
        let mut events = self.handle.submit(prompt, sampling).await?;
        let (tx, rx) = mpsc::channel(16);
        let tokenizer = self.tokenizer.clone();
        let mut ttft = Some(self.ttft.clone());
        let deadline = deadline.map(|d| tokio::time::Instant::now() + d);
        let span = tracing::Span::current();
        let task = async move {
            let mut text = TextStream::new(&tokenizer, stops);
            let mut completion = 0u32;
            loop {
                let next = match deadline {
                    Some(at) => match tokio::time::timeout_at(at, events.recv()).await {
                        Ok(e) => e,
                        Err(_) => {
                            let _ = tx
                                .send(Err(Status::deadline_exceeded(
                                    "the deadline passed during generation",
                                )))
                                .await;
                            return;
                        }
                    },
                    None => events.recv().await,
                };
                let reply = match next {
                    Some(Event::Token(token)) => {
                        if let Some(h) = ttft.take() {
                            h.observe(arrived.elapsed().as_secs_f64());
                        }
                        completion += 1;
                        match text.push(token) {
                            Ok((delta, false)) => Ok(GenerateResponse {
                                text: delta,
                                token_ids: vec![token],
                                ..Default::default()
                            }),
                            // A stop string: the last message, and the sequence is
                            // dropped with `events` below.
                            Ok((delta, true)) => {
                                Ok(last(delta, vec![token], Finish::Stop, prompt_tokens, completion))
                            }
                            Err(e) => Err(Status::internal(e.to_string())),
                        }
                    }
                    Some(Event::Finished(finish)) => match text.finish() {
                        Ok(rest) => Ok(last(rest, Vec::new(), finish, prompt_tokens, completion)),
                        Err(e) => Err(Status::internal(e.to_string())),
                    },
                    Some(Event::Failed(m)) => Err(Status::unavailable(format!("the group failed: {m}"))),
                    None => Err(Status::unavailable("the group stopped")),
                };
                let end = !matches!(&reply, Ok(r) if r.finish_reason == FinishReason::Unspecified as i32);
                match &reply {
                    Ok(r) if end => tracing::debug!(
                        prompt_tokens,
                        completion_tokens = r.completion_tokens,
                        finish = r.finish_reason().as_str_name(),
                        "generation done"
                    ),
                    Err(status) => {
                        tracing::warn!(completion_tokens = completion, error = %status.message(), "generation failed")
                    }
                    Ok(_) => {}
                }
                if tx.send(reply).await.is_err() || end {
                    return; // the client went away, or the stream is complete
                }
            }
        };
        tokio::spawn(task.instrument(span));
        Ok(ReceiverStream::new(rx))
    }
}

fn last(text: String, token_ids: Vec<u32>, finish: Finish, prompt: u32, completion: u32) -> GenerateResponse {
    GenerateResponse {
        text,
        token_ids,
        finish_reason: match finish {
            Finish::Stop => FinishReason::Stop,
            Finish::Length => FinishReason::Length,
        } as i32,
        prompt_tokens: prompt,
        completion_tokens: completion,
    }
}
