//! OIP v2 over REST: health, metadata, readiness and inference.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::json_tensor::{JsonInput, JsonOutput, input_to_tensor, tensor_to_output};
use crate::error::ApiError;
use crate::frontend::http::{AppState, JsonRequest, finish_error};
use crate::inference::InferCall;
use crate::request_id::WorkerTime;

/// An error in OIP's REST form: `{"error": "..."}` with the matching status.
pub struct OipError(pub ApiError);

impl From<ApiError> for OipError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OipError {
    fn into_response(self) -> Response {
        let resp = (self.0.http_status(), Json(json!({ "error": self.0.to_string() }))).into_response();
        finish_error(resp, &self.0)
    }
}

/// OIP's inference request; `parameters` are accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct InferRequestJson {
    #[serde(default)]
    id: Option<String>,
    pub(crate) inputs: Vec<JsonInput>,
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

fn ready_status(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

pub async fn live() -> Json<serde_json::Value> {
    Json(json!({ "live": true }))
}

pub async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.is_ready();
    (ready_status(ready), Json(json!({ "ready": ready }))).into_response()
}

pub async fn server_metadata(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "name": "rankway",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
        "models": state.ready_models(),
    }))
}

pub async fn model_metadata(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, OipError> {
    let info = state.model_metadata(&model)?;
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

pub async fn model_ready(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Response, OipError> {
    let ready = state.model_ready(&model)?;
    Ok((
        ready_status(ready),
        Json(json!({ "name": model, "ready": ready })),
    )
        .into_response())
}

pub async fn infer(
    State(state): State<AppState>,
    Path(model): Path<String>,
    JsonRequest {
        body: req,
        timeout,
        request_id,
        ..
    }: JsonRequest<InferRequestJson, OipError>,
) -> Result<Response, OipError> {
    let inputs = req
        .inputs
        .into_iter()
        .map(input_to_tensor)
        .collect::<Result<Vec<_>, _>>()?;
    let served = state
        .infer(InferCall {
            model: model.clone(),
            inputs,
            outputs: req.outputs.into_iter().map(|o| o.name).collect(),
            timeout,
            request_id,
        })
        .await?;
    let worker_time = WorkerTime(served.worker_time);
    let body = InferResponseJson {
        model_name: model,
        model_version: served.model_version,
        id: req.id,
        outputs: served
            .outputs
            .iter()
            .map(tensor_to_output)
            .collect::<Result<_, _>>()?,
    };
    let mut resp = Json(body).into_response();
    resp.extensions_mut().insert(worker_time);
    Ok(resp)
}
