//! OIP v2 over REST, plus `/metrics` and the router that also mounts OpenAI's routes.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::json_tensor::{JsonInput, JsonOutput, input_to_tensor, tensor_to_output};
use crate::error::ApiError;
use crate::metrics::CONTENT_TYPE;
use crate::request_id::RequestId;
use crate::state::Gateway;

pub type AppState = Arc<Gateway>;

/// An error in OIP's REST form: `{"error": "..."}` with the matching status.
pub struct OipError(pub ApiError);

impl From<ApiError> for OipError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

/// Adds `Retry-After` to answers that ask the client to come back later.
/// Finishes an error answer: `Retry-After` when the error has one, and the error itself in
/// the response's extensions for the request's log line (crate::request_id).
pub fn finish_error(mut resp: Response, err: &ApiError) -> Response {
    resp.extensions_mut().insert(err.clone());
    if let Some(after) = err.retry_after() {
        let secs = after.as_secs().max(1).to_string();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_str(&secs).expect("digits"));
    }
    resp
}

impl IntoResponse for OipError {
    fn into_response(self) -> Response {
        let resp = (self.0.http_status(), Json(json!({ "error": self.0.to_string() }))).into_response();
        finish_error(resp, &self.0)
    }
}

/// Reads a JSON body, telling an over-limit body (413) from a malformed one (400).
pub fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("request body is over the limit of {limit} bytes"))
        } else {
            ApiError::InvalidInput(rej.body_text())
        }
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::InvalidInput(format!("invalid JSON body: {e}")))
}

/// OIP's inference request; `parameters` are accepted and ignored.
#[derive(Debug, Deserialize)]
struct InferRequestJson {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<JsonInput>,
    #[serde(default)]
    outputs: Vec<RequestedOutput>,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
}

#[derive(Debug, Serialize)]
struct InferResponseJson {
    model_name: String,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<JsonOutput>,
}

pub struct RestLimits {
    pub max_request_bytes: usize,
}

/// The REST router: OIP v2, OpenAI embeddings, metrics.
pub fn router(state: AppState, max_request_bytes: usize) -> Router {
    let limits = Arc::new(RestLimits { max_request_bytes });
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v1/embeddings", post(super::openai::embeddings))
        .route("/metrics", get(metrics))
        .route("/admin/groups", get(admin_groups))
        .fallback(not_found)
        .layer(axum::Extension(limits))
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), track_request))
        .layer(crate::request_id::RequestIdLayer::rest())
        .with_state(state)
}

/// Counts and times every request by its route template and status code.
async fn track_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .observe_request(&route, resp.status().as_str(), started.elapsed());
    resp
}

async fn not_found(req: Request) -> Response {
    let msg = format!("no route for {} {}", req.method(), req.uri().path());
    (StatusCode::NOT_FOUND, Json(json!({ "error": msg }))).into_response()
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready }))).into_response()
}

async fn server_metadata(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "name": "rankway",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
        "models": state.pool.ready_models(),
    }))
}

async fn model_metadata(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, OipError> {
    let info = state
        .pool
        .known_model_info(&model)
        .ok_or(ApiError::ModelNotFound(model))?;
    let tensors = |specs: &[rankway_proto::worker::TensorSpec]| {
        specs
            .iter()
            .map(|s| json!({ "name": s.name, "datatype": s.datatype().oip_name(), "shape": s.shape }))
            .collect::<Vec<_>>()
    };
    Ok(Json(json!({
        "name": info.name,
        "versions": [info.version],
        "platform": info.platform,
        "inputs": tensors(&info.inputs),
        "outputs": tensors(&info.outputs),
    }))
    .into_response())
}

async fn model_ready(State(state): State<AppState>, Path(model): Path<String>) -> Result<Response, OipError> {
    let ready = match state.ready_model(&model) {
        Ok(_) => true,
        Err(ApiError::Unavailable(_)) => false,
        Err(e) => return Err(e.into()),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(json!({ "name": model, "ready": ready }))).into_response())
}

async fn infer(
    State(state): State<AppState>,
    axum::Extension(limits): axum::Extension<Arc<RestLimits>>,
    axum::Extension(request_id): axum::Extension<RequestId>,
    Path(model): Path<String>,
    headers: http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OipError> {
    let deadline = state.deadline(super::rest_timeout(&headers)?);
    let req: InferRequestJson = parse_json(body, limits.max_request_bytes)?;
    let inputs = req
        .inputs
        .into_iter()
        .map(input_to_tensor)
        .collect::<Result<Vec<_>, _>>()?;
    let requested: Vec<String> = req.outputs.into_iter().map(|o| o.name).collect();
    let outputs = state.infer(&model, inputs, deadline, request_id).await?;
    let outputs = super::select_outputs(outputs, &requested)?;
    let model_version = state
        .pool
        .known_model_info(&model)
        .map(|i| i.version)
        .unwrap_or_default();
    let body = InferResponseJson {
        model_name: model,
        model_version,
        id: req.id,
        outputs: outputs.iter().map(tensor_to_output).collect::<Result<_, _>>()?,
    };
    Ok(Json(body).into_response())
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.render(&state.pool.views());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

/// Every known group: address, readiness and why, world size, ranks ready, in flight.
async fn admin_groups(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "ready": state.is_ready(), "groups": state.pool.views() }))
}
