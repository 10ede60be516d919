//! A generation under way, as a [`Stream`] of text deltas read straight from the group's
//! gRPC stream: no task and no channel between rank 0 and the front end. Dropping it
//! (the client went away, or its deadline passed) drops the group's stream, and rank 0
//! takes the sequence out at its next step.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::{Stream, StreamExt};
use prometheus::IntGauge;
use rankway_proto::worker::{FinishReason, GenerateResponse};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::pool::{Opened, StreamGuard};

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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish: Option<(Finish, Usage)>,
}

/// Times a generation's tokens as they arrive: time to first token from the request's
/// arrival, then the gap between tokens.
struct TokenClock {
    model: String,
    metrics: Arc<Metrics>,
    started: Instant,
    last: Option<Instant>,
}

impl TokenClock {
    fn tokens(&mut self, n: usize) {
        let now = Instant::now();
        for _ in 0..n {
            if self.last.is_none() {
                self.metrics.observe_first_token(&self.model, now - self.started);
            }
            self.metrics
                .observe_token(&self.model, self.last.map(|t| now - t));
            self.last = Some(now);
        }
    }
}

/// An accepted generation: its deltas, the last with the finish reason; or an error,
/// which ends it. After either, the stream is over.
pub struct Generation {
    pub model_version: String,
    first: Option<GenerateResponse>,
    stream: tonic::Streaming<GenerateResponse>,
    guard: StreamGuard,
    deadline: Instant,
    clock: TokenClock,
    /// Generations of the model under way; this one counts until it is dropped.
    open: IntGauge,
    over: bool,
}

impl Generation {
    /// Follows `stream`, whose first message, `first`, has already come.
    pub(super) fn new(
        model: &str,
        model_version: String,
        metrics: Arc<Metrics>,
        (first, stream, guard): Opened,
        started: Instant,
        deadline: Instant,
    ) -> Self {
        let open = metrics.open_streams(model);
        open.inc();
        Self {
            model_version,
            first: Some(first),
            stream,
            guard,
            deadline,
            clock: TokenClock {
                model: model.to_owned(),
                metrics,
                started,
                last: None,
            },
            open,
            over: false,
        }
    }

    /// Reads the whole generation: its text, token ids, finish reason and usage.
    pub async fn collect(mut self) -> Result<(String, Vec<u32>, Finish, Usage), ApiError> {
        let (mut text, mut ids) = (String::new(), Vec::new());
        while let Some(delta) = self.next().await {
            let delta = delta?;
            text.push_str(&delta.text);
            ids.extend(delta.token_ids);
            if let Some((finish, usage)) = delta.finish {
                return Ok((text, ids, finish, usage));
            }
        }
        unreachable!("a generation ends with a finish reason or an error")
    }
}

impl Stream for Generation {
    type Item = Result<Delta, ApiError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.over {
            return Poll::Ready(None);
        }
        let next = match self.first.take() {
            Some(first) => Some(Ok(first)),
            None => ready!(self.stream.poll_next_unpin(cx)),
        };
        let delta = match next {
            Some(Ok(msg)) => {
                self.clock.tokens(msg.token_ids.len());
                Ok(to_delta(msg))
            }
            None => Err(ApiError::Unavailable(format!(
                "group {:?} ended the stream without finishing it",
                self.guard.group().name()
            ))),
            Some(Err(status)) => Err(self.guard.group().failed(&status, self.deadline).error),
        };
        self.over = !matches!(&delta, Ok(d) if d.finish.is_none());
        Poll::Ready(Some(delta))
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.open.dec();
    }
}

pub(super) fn to_delta(msg: GenerateResponse) -> Delta {
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
