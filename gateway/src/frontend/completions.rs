//! OpenAI-compatible generation: `POST /v1/chat/completions`, `POST /v1/completions`
//! (non-streaming, and `stream: true` as Server-Sent Events) and `GET /v1/models`, so
//! the official SDKs and langchain-openai's `ChatOpenAI` work unchanged.
//!
//! Fields that would change the answer's meaning and are not supported (tools, a JSON
//! response format, log probabilities, penalties, `n` other than 1, ...) are refused with
//! a 400 naming the field; the same fields at their neutral value are accepted, and so
//! are the informational ones (`user`, `metadata`, `store`, ...). Any other field is
//! refused by name, as OpenAI itself does, rather than silently ignored.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::http::{AppState, Fields, JsonRequest, Strings, field, required};
use super::openai::OpenAiError;
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::state::generate::{Delta, GenerateCall, Generation, Prompt, Usage};

/// OpenAI's default sampling temperature.
const OPENAI_TEMPERATURE: f32 = 1.0;

/// A message's content: a string, or a list of parts of which only text parts are
/// taken. Read as it streams by (an untagged enum would first hold it all as a tree).
#[derive(Debug)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One part of a message's content; its other fields are skipped unread.
#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: Option<String>,
    text: Option<String>,
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of content parts")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Content, E> {
                Ok(Content::Text(s.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Content, A::Error> {
                let mut parts = Vec::new();
                while let Some(p) = seq.next_element::<Part>()? {
                    parts.push(p);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}

/// One chat message; a field other than these is refused by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InMessage {
    role: String,
    content: Option<Content>,
    /// A participant's name: accepted, not used.
    #[allow(dead_code)]
    name: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What chat and completions requests share.
#[derive(Debug)]
struct Common {
    model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Strings>,
    n: Option<u32>,
    stream: bool,
    stream_options: Option<StreamOptions>,
}

impl Common {
    /// The shared fields, taken out of `body` (what is left is checked by [`check_rest`]).
    fn take(body: &mut Body) -> Result<Self, ApiError> {
        Ok(Self {
            model: required(body, "model")?,
            max_tokens: field(body, "max_tokens")?,
            max_completion_tokens: field(body, "max_completion_tokens")?,
            temperature: field(body, "temperature")?,
            top_p: field(body, "top_p")?,
            seed: field(body, "seed")?,
            stop: field(body, "stop")?,
            n: field(body, "n")?,
            stream: field(body, "stream")?.unwrap_or(false),
            stream_options: field(body, "stream_options")?,
        })
    }
}

fn invalid(m: String) -> ApiError {
    ApiError::InvalidInput(m)
}

/// `response_format`'s type; its other fields are skipped unread.
#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

/// Whether `raw`, the value of the unsupported field `name`, leaves the answer as it
/// would be without it; `None` for fields this gateway does not know. Each value is read
/// as the one type its neutral value has, so none is held in memory as a tree.
fn neutral(name: &str, raw: &RawValue) -> Option<bool> {
    let is = |want: &str| raw.get().split_whitespace().collect::<String>() == want;
    let typed = |check: fn(&str) -> bool| check(raw.get());
    Some(match name {
        // Informational: they never change the answer.
        "user" | "metadata" | "store" | "service_tier" | "parallel_tool_calls" => true,
        "frequency_penalty" | "presence_penalty" | "top_logprobs" => {
            typed(|r| serde_json::from_str::<Option<f64>>(r).is_ok_and(|v| v.is_none_or(|x| x == 0.0)))
        }
        "logprobs" | "echo" => is("null") || is("false") || is("0"),
        "tools" | "functions" | "logit_bias" => is("null") || is("[]") || is("{}"),
        "tool_choice" | "function_call" => {
            typed(|r| serde_json::from_str::<Option<String>>(r).is_ok_and(|v| v.is_none_or(|s| s == "none")))
        }
        "response_format" => typed(|r| {
            serde_json::from_str::<Option<ResponseFormat>>(r)
                .is_ok_and(|v| v.is_none_or(|f| f.kind == "text"))
        }),
        "best_of" => {
            typed(|r| serde_json::from_str::<Option<u64>>(r).is_ok_and(|v| v.is_none_or(|n| n == 1)))
        }
        "suffix" => {
            typed(|r| serde_json::from_str::<Option<String>>(r).is_ok_and(|v| v.is_none_or(|s| s.is_empty())))
        }
        _ => return None,
    })
}

fn check_rest(rest: &Body) -> Result<(), ApiError> {
    for (name, value) in rest {
        let shown: String = name.chars().take(64).collect();
        match neutral(name, value) {
            Some(true) => {}
            Some(false) => {
                return Err(invalid(format!(
                    "'{shown}' is not supported (only its neutral value is)"
                )));
            }
            None => return Err(invalid(format!("unrecognized field '{shown}'"))),
        }
    }
    Ok(())
}

impl Common {
    fn call(
        self,
        prompt: Prompt,
        timeout: Option<std::time::Duration>,
        request_id: RequestId,
    ) -> Result<GenerateCall, ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(invalid(format!(
                "'n' {n} is not supported: only 1 answer per request"
            )));
        }
        if self.stream_options.is_some() && !self.stream {
            return Err(invalid(
                "'stream_options' is only allowed with 'stream': true".into(),
            ));
        }
        let stop = self.stop.map_or_else(Vec::new, |s| s.0);
        Ok(GenerateCall {
            model: self.model,
            prompt,
            // langchain-openai sends max_completion_tokens, older clients max_tokens.
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature.unwrap_or(OPENAI_TEMPERATURE),
            top_p: self.top_p,
            seed: self.seed,
            stop,
            timeout,
            request_id,
        })
    }
}

fn messages(input: Vec<InMessage>) -> Result<Prompt, ApiError> {
    let mut out = Vec::with_capacity(input.len());
    for (i, m) in input.into_iter().enumerate() {
        let content = match m.content {
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.iter().enumerate() {
                    match (part.kind.as_deref(), part.text.as_deref()) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(invalid(format!(
                                "messages[{i}].content[{j}] must be a text part ({{\"type\": \"text\", \"text\": ...}})"
                            )));
                        }
                    }
                }
                text
            }
            None => return Err(invalid(format!("messages[{i}].content is missing"))),
        };
        // OpenAI's newer name for the system role.
        let role = if m.role == "developer" {
            "system".to_owned()
        } else {
            m.role
        };
        out.push((role, content));
    }
    Ok(Prompt::Chat(out))
}

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

/// Which of the two APIs an answer is shaped for.
#[derive(Clone, Copy)]
pub(crate) enum Api {
    Chat,
    Completion,
}

/// How one answer's chunks and body are written.
struct Shape {
    api: Api,
    id: String,
    model: String,
    created: u64,
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Completion, _) => "text_completion",
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
        match (self.api, chunk) {
            (Api::Chat, false) => json!({
                "index": 0, "message": {"role": "assistant", "content": text},
                "finish_reason": finish, "logprobs": null,
            }),
            (Api::Chat, true) => {
                json!({"index": 0, "delta": {"content": text}, "finish_reason": finish, "logprobs": null})
            }
            (Api::Completion, _) => {
                json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
            }
        }
    }
}

async fn answer(shape: Shape, generation: Generation) -> Result<Response, OpenAiError> {
    let (text, _, finish, usage) = generation.collect().await?;
    let mut body = shape.envelope(false, json!([shape.choice(&text, Some(finish.as_str()), false)]));
    body.insert("usage".into(), usage_json(usage));
    Ok(Json(Value::Object(body)).into_response())
}

fn error_event(e: &ApiError) -> Event {
    let err =
        json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": e.kind()}});
    Event::default().data(err.to_string())
}

/// The answer as SSE chunks: a first chunk with the role (chat), one per delta, a last
/// one with the finish reason, the usage chunk when asked, then `[DONE]`. An error after
/// the stream started arrives as an `{"error": ...}` event, and the stream ends. The
/// events are written by a task; when the client goes, the body (and with it the
/// channel) is dropped, the task stops, and the generation is cancelled.
fn stream(
    shape: Shape,
    generation: Generation,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    tokio::spawn(async move {
        let chunk = |choices: Value, usage: Option<Usage>| {
            let mut m = shape.envelope(true, choices);
            if include_usage {
                m.insert("usage".into(), usage.map_or(Value::Null, usage_json));
            }
            Event::default().data(Value::Object(m).to_string())
        };
        let mut events = Vec::new();
        if let Api::Chat = shape.api {
            events.push(chunk(
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}]),
                None,
            ));
        }
        let mut deltas = generation.deltas;
        loop {
            let mut end = true;
            match deltas.recv().await {
                Some(Ok(Delta { text, finish, .. })) => {
                    // A token with no text of its own (end of text) sends nothing.
                    if !text.is_empty() {
                        events.push(chunk(json!([shape.choice(&text, None, true)]), None));
                    }
                    match finish {
                        None => end = false,
                        Some((finish, usage)) => {
                            events.push(chunk(
                                json!([shape.choice("", Some(finish.as_str()), true)]),
                                None,
                            ));
                            if include_usage {
                                events.push(chunk(json!([]), Some(usage)));
                            }
                            events.push(Event::default().data("[DONE]"));
                        }
                    }
                }
                Some(Err(e)) => events.push(error_event(&e)),
                None => events.push(error_event(&ApiError::Internal(
                    "the generation ended early".into(),
                ))),
            }
            for event in events.drain(..) {
                if tx.send(event).await.is_err() {
                    return; // the client went away; dropping `deltas` cancels the sequence
                }
            }
            if end {
                return;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) })
}

/// Runs `call` and answers in the shape of `api`, streamed or whole.
async fn respond(
    state: AppState,
    api: Api,
    call: GenerateCall,
    stream_it: bool,
    include_usage: bool,
    request_id: &RequestId,
) -> Result<Response, OpenAiError> {
    let shape = Shape {
        api,
        id: match api {
            Api::Chat => format!("chatcmpl-{}", request_id.0),
            Api::Completion => format!("cmpl-{}", request_id.0),
        },
        model: call.model.clone(),
        created: now_secs(),
    };
    let generation = state.generate(call).await?;
    if stream_it {
        Ok(Sse::new(stream(shape, generation, include_usage)).into_response())
    } else {
        answer(shape, generation).await
    }
}

/// The body of a generation request, its fields taken out one by one (see [`field`]).
pub(crate) type Body = Fields;

/// A chat or completions body, checked: the generation to run, and how to answer.
pub(crate) struct Parsed {
    pub call: GenerateCall,
    pub stream: bool,
    pub include_usage: bool,
}

/// Reads a chat (`messages`) or completions (`prompt`) body; every field is checked
/// before anything is queued.
pub(crate) fn parse(
    api: Api,
    mut body: Body,
    timeout: Option<std::time::Duration>,
    request_id: RequestId,
) -> Result<Parsed, ApiError> {
    let prompt = match api {
        Api::Chat => messages(required(&mut body, "messages")?)?,
        Api::Completion => match required::<Strings>(&mut body, "prompt")?.0 {
            mut v if v.len() == 1 => Prompt::Text(v.remove(0)),
            v => {
                return Err(invalid(format!(
                    "'prompt' must be one string, got a list of {}",
                    v.len()
                )));
            }
        },
    };
    let common = Common::take(&mut body)?;
    check_rest(&body)?;
    let (stream, include_usage) = (
        common.stream,
        common.stream_options.as_ref().is_some_and(|o| o.include_usage),
    );
    Ok(Parsed {
        call: common.call(prompt, timeout, request_id)?,
        stream,
        include_usage,
    })
}

async fn handle(
    api: Api,
    state: AppState,
    JsonRequest {
        body,
        timeout,
        request_id,
        ..
    }: JsonRequest<Body, OpenAiError>,
) -> Result<Response, OpenAiError> {
    let p = parse(api, body, timeout, request_id.clone())?;
    respond(state, api, p.call, p.stream, p.include_usage, &request_id).await
}

pub async fn chat_completions(
    State(state): State<AppState>,
    req: JsonRequest<Body, OpenAiError>,
) -> Result<Response, OpenAiError> {
    handle(Api::Chat, state, req).await
}

pub async fn completions(
    State(state): State<AppState>,
    req: JsonRequest<Body, OpenAiError>,
) -> Result<Response, OpenAiError> {
    handle(Api::Completion, state, req).await
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

    /// `v`, an object, as a request body.
    fn body(v: Value) -> Body {
        serde_json::from_str(&v.to_string()).unwrap()
    }

    #[test]
    fn unsupported_fields_are_refused_by_name_and_neutral_ones_accepted() {
        let ok = json!({"user": "u", "tools": [], "logprobs": false, "frequency_penalty": 0,
                        "response_format": {"type": "text"}, "tool_choice": "none", "logit_bias": {},
                        "best_of": 1, "suffix": "", "presence_penalty": null, "metadata": [1, 2]});
        check_rest(&body(ok)).unwrap();
        for (field, value, want) in [
            ("tools", json!([{"type": "function"}]), "'tools' is not supported"),
            (
                "response_format",
                json!({"type": "json_object"}),
                "'response_format' is not supported",
            ),
            ("logprobs", json!(true), "'logprobs' is not supported"),
            (
                "presence_penalty",
                json!(0.5),
                "'presence_penalty' is not supported",
            ),
            (
                "frequency_penalty",
                json!(-1),
                "'frequency_penalty' is not supported",
            ),
            ("mystery", json!(1), "unrecognized field 'mystery'"),
        ] {
            let err = check_rest(&body(json!({ field: value })))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{field}: {err}");
        }
    }

    #[test]
    fn message_contents_are_text_or_text_parts() {
        let parse = |v: Value| messages(serde_json::from_value(v).unwrap());
        let mut fields = body(json!({"model": "m", "max_tokens": "many"}));
        let err = Common::take(&mut fields).unwrap_err().to_string();
        assert!(err.starts_with("'max_tokens': wrong type, expected u32"), "{err}");
        let Prompt::Chat(m) = parse(json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]))
        .unwrap() else {
            panic!("a chat")
        };
        assert_eq!(
            m,
            vec![
                ("system".to_string(), "be brief".to_string()),
                ("user".into(), "ab".into())
            ]
        );
        let err = parse(json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("messages[0].content[0] must be a text part"),
            "{err}"
        );
        let mut fields =
            body(json!({"messages": [{"role": "assistant", "content": null, "tool_calls": []}]}));
        let err = required::<Vec<InMessage>>(&mut fields, "messages").unwrap_err();
        assert!(
            err.to_string()
                .contains(r#"'messages': unknown field "tool_calls""#),
            "{err}"
        );
    }
}
