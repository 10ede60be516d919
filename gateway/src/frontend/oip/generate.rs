//! The generate extension of OIP v2, as Triton and KServe define it:
//! `POST /v2/models/{model}/generate` answers `{model_name, model_version, text_output}`
//! with the whole text; `POST /v2/models/{model}/generate_stream` answers Server-Sent
//! Events, one `data: {model_name, model_version, text_output}` per text delta, the last
//! with `finish_reason`. The request is `{text_input, parameters: {max_tokens,
//! temperature, top_p, stop, seed}}` (`stream` also accepted, as Triton's clients send
//! it). With no `temperature` the answer is greedy. An error after the stream started
//! arrives as `data: {"error": ...}`.

use std::convert::Infallible;

use axum::Json;
use axum::extract::{Path, State};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;

use super::rest::OipError;
use crate::error::{ApiError, shown};
use crate::frontend::http::{AppState, Fields, JsonRequest, Strings, field, required};
use crate::inference::generate::{GenerateCall, Prompt};
use crate::inference::generation::Generation;
use crate::request_id::RequestId;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Parameters {
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop: Option<Strings>,
    seed: Option<u64>,
    stream: Option<bool>,
}

/// The call, for `/generate` (`streamed` false) or `/generate_stream`, from the body
/// `{text_input, parameters}` (Triton's request `id` is accepted and not used; any other
/// input is refused by name).
fn call(
    model: String,
    mut body: Fields,
    streamed: bool,
    timeout: Option<std::time::Duration>,
    request_id: RequestId,
) -> Result<GenerateCall, ApiError> {
    let text_input: String = required(&mut body, "text_input")?;
    let params: Parameters = field(&mut body, "parameters")?.unwrap_or_default();
    if let Some(name) = body.keys().find(|k| k.as_str() != "id") {
        return Err(ApiError::InvalidInput(format!(
            "unknown input {}: this model takes text_input (sampling goes in 'parameters')",
            shown(name)
        )));
    }
    if params.stream == Some(!streamed) {
        return Err(ApiError::InvalidInput(format!(
            "'parameters.stream' {} does not match the route: use generate{}",
            !streamed,
            if streamed { "" } else { "_stream" }
        )));
    }
    Ok(GenerateCall {
        model,
        prompt: Prompt::Text(text_input),
        max_tokens: params.max_tokens,
        temperature: params.temperature.unwrap_or(0.0),
        top_p: params.top_p,
        seed: params.seed,
        stop: params.stop.map_or_else(Vec::new, |s| s.0),
        timeout,
        request_id,
    })
}

type Request = JsonRequest<Fields, OipError>;

async fn start(state: &AppState, model: &str, req: Request, streamed: bool) -> Result<Generation, OipError> {
    let call = call(model.to_owned(), req.body, streamed, req.timeout, req.request_id)?;
    Ok(state.generate(call).await?)
}

pub async fn generate(
    State(state): State<AppState>,
    Path(model): Path<String>,
    req: Request,
) -> Result<Response, OipError> {
    let generation = start(&state, &model, req, false).await?;
    let version = generation.model_version.clone();
    let (text, _, finish, usage) = generation.collect().await?;
    Ok(Json(json!({
        "model_name": model, "model_version": version, "text_output": text,
        "finish_reason": finish.as_str(),
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
    }))
    .into_response())
}

pub async fn generate_stream(
    State(state): State<AppState>,
    Path(model): Path<String>,
    req: Request,
) -> Result<Response, OipError> {
    let generation = start(&state, &model, req, true).await?;
    Ok(Sse::new(events(model, generation)).into_response())
}

/// One event per delta; the stream ends after the finish or an error. Dropping the
/// stream (the client went away) drops the generation, which cancels it.
fn events(model: String, generation: Generation) -> impl Stream<Item = Result<Event, Infallible>> {
    let version = generation.model_version.clone();
    generation.map(move |delta| {
        let event = match delta {
            Ok(d) => {
                let mut v = json!({"model_name": model, "model_version": version, "text_output": d.text});
                if let Some((finish, usage)) = d.finish {
                    v["finish_reason"] = json!(finish.as_str());
                    v["usage"] = json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens});
                }
                v
            }
            Err(e) => json!({"error": e.to_string()}),
        };
        Ok(Event::default().data(event.to_string()))
    })
}
