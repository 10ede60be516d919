//! The operator's routes: Prometheus metrics and the worker groups the gateway knows.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::http::AppState;
use crate::metrics::CONTENT_TYPE;

pub async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], state.render_metrics()).into_response()
}

/// Every known group: address, readiness and why, world size, ranks ready, in flight.
pub async fn groups(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "ready": state.is_ready(), "groups": state.groups() }))
}
