//! OpenAI-compatible generation: `POST /v1/chat/completions`, `POST /v1/completions`
//! (whole, and with `stream: true` as Server-Sent Events shaped by [`ChatState`]) and
//! `GET /v1/models`, so the official SDKs and langchain-openai's `ChatOpenAI` work
//! unchanged. The requests are read by [`super::request`].

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde_json::{Map, Value, json};

use super::OpenAiError;
use super::request::{Body, Endpoint, parse};
use crate::error::ApiError;
use crate::frontend::http::{AppState, JsonRequest};
use crate::inference::generate::GenerateCall;
use crate::inference::generation::{Delta, Finish, Generation, Usage};
use crate::request_id::RequestId;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// One answer's chunks, shaped from what the generation sends: a pure function of each
/// delta, so the shaping is tested without a runtime. Chat streams open with the
/// assistant's role; every delta with text is a chunk; the last delta adds a chunk with
/// the finish reason, the usage chunk when asked, and `[DONE]`; an error is an
/// `{"error": ...}` event, after which nothing follows.
pub(crate) struct ChatState {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl ChatState {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Map<String, Value> {
        let Value::Object(m) = json!({
            "id": self.id, "object": self.object(chunk), "created": self.created,
            "model": self.model, "choices": choices,
        }) else {
            unreachable!("a literal object")
        };
        m
    }

    fn choice(&self, text: &str, finish: Option<&str>, chunk: bool) -> Value {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => json!({
                "index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish, "logprobs": null,
            }),
            (Endpoint::Chat, true) => {
                json!({"index": 0, "delta": {"content": text}, "finish_reason": finish, "logprobs": null})
            }
            (Endpoint::Completions, _) => {
                json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
            }
        }
    }

    /// The non-streamed answer.
    fn whole(&self, text: &str, finish: Finish, usage: Usage) -> Value {
        let mut body = self.envelope(false, json!([self.choice(text, Some(finish.as_str()), false)]));
        body.insert("usage".into(), usage_json(usage));
        Value::Object(body)
    }

    fn chunk(&self, choices: Value, usage: Option<Usage>) -> String {
        let mut m = self.envelope(true, choices);
        if self.include_usage {
            m.insert("usage".into(), usage.map_or(Value::Null, usage_json));
        }
        Value::Object(m).to_string()
    }

    /// The events before the first delta.
    fn opening(&self) -> Vec<String> {
        match self.endpoint {
            Endpoint::Chat => vec![self.chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}]),
                None,
            )],
            Endpoint::Completions => Vec::new(),
        }
    }

    /// The events one delta (or the error that ended the generation) makes.
    fn on_delta(&self, delta: Result<Delta, ApiError>) -> Vec<String> {
        let Delta { text, finish, .. } = match delta {
            Ok(d) => d,
            Err(e) => return vec![error_event(&e)],
        };
        let mut events = Vec::new();
        // A token with no text of its own (end of text) sends nothing.
        if !text.is_empty() {
            events.push(self.chunk(json!([self.choice(&text, None, true)]), None));
        }
        if let Some((finish, usage)) = finish {
            events.push(self.chunk(json!([self.choice("", Some(finish.as_str()), true)]), None));
            if self.include_usage {
                events.push(self.chunk(json!([]), Some(usage)));
            }
            events.push("[DONE]".to_owned());
        }
        events
    }
}

fn error_event(e: &ApiError) -> String {
    json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": e.kind()}})
        .to_string()
}

/// The answer as Server-Sent Events, read from the generation as the client reads them.
/// When the client goes, the body drops, and with it the generation, which cancels it.
fn stream(state: ChatState, generation: Generation) -> impl Stream<Item = Result<Event, Infallible>> {
    let opening = futures_util::stream::iter(state.opening());
    let deltas = generation.flat_map(move |delta| futures_util::stream::iter(state.on_delta(delta)));
    opening.chain(deltas).map(|data| Ok(Event::default().data(data)))
}

/// Runs `call` and answers for `endpoint`, streamed or whole.
async fn respond(
    gateway: AppState,
    endpoint: Endpoint,
    call: GenerateCall,
    stream_it: bool,
    include_usage: bool,
    request_id: &RequestId,
) -> Result<Response, OpenAiError> {
    let state = ChatState {
        endpoint,
        id: match endpoint {
            Endpoint::Chat => format!("chatcmpl-{}", request_id.0),
            Endpoint::Completions => format!("cmpl-{}", request_id.0),
        },
        model: call.model.clone(),
        created: now_secs(),
        include_usage,
    };
    let generation = gateway.generate(call).await?;
    if stream_it {
        Ok(Sse::new(stream(state, generation)).into_response())
    } else {
        let (text, _, finish, usage) = generation.collect().await?;
        Ok(Json(state.whole(&text, finish, usage)).into_response())
    }
}

async fn handle(
    endpoint: Endpoint,
    state: AppState,
    JsonRequest {
        body,
        timeout,
        request_id,
        ..
    }: JsonRequest<Body, OpenAiError>,
) -> Result<Response, OpenAiError> {
    let p = parse(endpoint, body, timeout, request_id.clone())?;
    respond(state, endpoint, p.call, p.stream, p.include_usage, &request_id).await
}

pub async fn chat_completions(
    State(state): State<AppState>,
    req: JsonRequest<Body, OpenAiError>,
) -> Result<Response, OpenAiError> {
    handle(Endpoint::Chat, state, req).await
}

pub async fn completions(
    State(state): State<AppState>,
    req: JsonRequest<Body, OpenAiError>,
) -> Result<Response, OpenAiError> {
    handle(Endpoint::Completions, state, req).await
}

/// `GET /v1/models`: every model a ready group serves, embedding and generative.
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .ready_models()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "rankway"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(endpoint: Endpoint, include_usage: bool) -> ChatState {
        ChatState {
            endpoint,
            id: "chatcmpl-1".into(),
            model: "m".into(),
            created: 7,
            include_usage,
        }
    }

    fn delta(text: &str, finish: Option<Finish>) -> Result<Delta, ApiError> {
        Ok(Delta {
            text: text.into(),
            token_ids: vec![1],
            finish: finish.map(|f| {
                (
                    f,
                    Usage {
                        prompt_tokens: 3,
                        completion_tokens: 2,
                    },
                )
            }),
        })
    }

    fn parsed(events: Vec<String>) -> Vec<Value> {
        events
            .into_iter()
            .map(|e| {
                if e == "[DONE]" {
                    json!("[DONE]")
                } else {
                    serde_json::from_str(&e).unwrap()
                }
            })
            .collect()
    }

    #[test]
    fn a_chat_stream_opens_with_the_role_sends_text_then_the_finish_usage_and_done() {
        let s = state(Endpoint::Chat, true);
        let opening = parsed(s.opening());
        assert_eq!(opening.len(), 1);
        assert_eq!(opening[0]["object"], "chat.completion.chunk");
        assert_eq!(
            opening[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(opening[0]["usage"], Value::Null, "usage comes last, once");

        let text = parsed(s.on_delta(delta("Hel", None)));
        assert_eq!(text.len(), 1);
        assert_eq!(text[0]["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(text[0]["choices"][0]["finish_reason"], Value::Null);

        let last = parsed(s.on_delta(delta("lo", Some(Finish::Stop))));
        assert_eq!(last.len(), 4, "{last:?}");
        assert_eq!(last[0]["choices"][0]["delta"]["content"], "lo");
        assert_eq!(last[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(last[2]["choices"], json!([]));
        assert_eq!(
            last[2]["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
        );
        assert_eq!(last[3], "[DONE]");
    }

    #[test]
    fn a_completions_stream_has_no_role_chunk_and_no_usage_unless_asked() {
        let s = state(Endpoint::Completions, false);
        assert!(s.opening().is_empty());
        let events = parsed(s.on_delta(delta("", Some(Finish::Length))));
        // No text of its own: only the finish chunk and [DONE].
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0]["object"], "text_completion");
        assert_eq!(events[0]["choices"][0]["finish_reason"], "length");
        assert!(events[0].get("usage").is_none());
        assert_eq!(events[1], "[DONE]");
    }

    #[test]
    fn an_error_is_one_error_event() {
        let s = state(Endpoint::Chat, true);
        let events = parsed(s.on_delta(Err(ApiError::Unavailable("group \"g\" broke".into()))));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["error"]["code"], "unavailable");
        assert!(events[0]["error"]["message"].as_str().unwrap().contains("broke"));
    }

    #[test]
    fn a_whole_answer_carries_the_text_finish_and_usage() {
        let body = state(Endpoint::Chat, false).whole(
            "Hello",
            Finish::Stop,
            Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
            },
        );
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(
            body["choices"][0]["message"],
            json!({"role": "assistant", "content": "Hello"})
        );
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["total_tokens"], 5);
    }
}
