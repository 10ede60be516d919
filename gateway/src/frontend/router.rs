//! The REST router: OIP v2, OpenAI embeddings, and the operator's routes, behind the
//! body limit and the request layer (id, span, log line, request metrics).

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::http::{AppState, RestLimits};
use super::{admin, completions, oip_generate, openai, rest};
use crate::auth::ApiKeys;
use crate::metrics::Metrics;
use crate::request_id::RequestIdLayer;

pub fn router(
    state: AppState,
    limits: RestLimits,
    metrics: Arc<Metrics>,
    api_keys: Option<Arc<ApiKeys>>,
) -> axum::Router {
    axum::Router::new()
        .route("/v2/health/live", get(rest::live))
        .route("/v2/health/ready", get(rest::ready))
        .route("/v2", get(rest::server_metadata))
        .route("/v2/models/{model}", get(rest::model_metadata))
        .route("/v2/models/{model}/ready", get(rest::model_ready))
        .route("/v2/models/{model}/infer", post(rest::infer))
        .route("/v2/models/{model}/generate", post(oip_generate::generate))
        .route(
            "/v2/models/{model}/generate_stream",
            post(oip_generate::generate_stream),
        )
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/chat/completions", post(completions::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(completions::models))
        .route("/metrics", get(admin::metrics))
        .route("/admin/groups", get(admin::groups))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(api_keys, crate::auth::rest))
        .layer(axum::Extension(limits))
        .layer(DefaultBodyLimit::max(limits.max_request_bytes))
        .layer(RequestIdLayer::rest(metrics))
        .with_state(state)
}

async fn not_found(req: Request) -> Response {
    let msg = format!("no route for {} {}", req.method(), req.uri().path());
    (StatusCode::NOT_FOUND, Json(json!({ "error": msg }))).into_response()
}
