//! The REST routers: OIP v2, OpenAI, and the operator's routes (`/metrics`, `/admin/*`),
//! on the REST server or on a listener of their own (`--admin-listen`), behind the body
//! limit and the request layer (id, span, log line, request metrics).

use std::sync::Arc;

use axum::Json;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::admin;
use super::http::{AppState, RestLimits};
use super::oip::{generate, rest};
use super::openai::{chat, embeddings};
use crate::auth::ApiKeys;
use crate::metrics::Metrics;
use crate::request_id::RequestIdLayer;

/// The REST server's router. With `operator_routes`, it also serves `/metrics` and
/// `/admin/*` (no `--admin-listen`); either way, behind the API keys when there are any.
pub fn router(
    state: AppState,
    limits: RestLimits,
    metrics: Arc<Metrics>,
    api_keys: Option<Arc<ApiKeys>>,
    operator_routes: bool,
) -> axum::Router {
    let api = axum::Router::new()
        .route("/v2/health/live", get(rest::live))
        .route("/v2/health/ready", get(rest::ready))
        .route("/v2", get(rest::server_metadata))
        .route("/v2/models/{model}", get(rest::model_metadata))
        .route("/v2/models/{model}/ready", get(rest::model_ready))
        .route("/v2/models/{model}/infer", post(rest::infer))
        .route("/v2/models/{model}/generate", post(generate::generate))
        .route(
            "/v2/models/{model}/generate_stream",
            post(generate::generate_stream),
        )
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/v1/models", get(chat::models));
    let api = if operator_routes {
        api.merge(operator())
    } else {
        api
    };
    api.fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(api_keys, crate::auth::rest))
        .layer(axum::Extension(limits))
        .layer(DefaultBodyLimit::max(limits.max_request_bytes))
        .layer(RequestIdLayer::rest(metrics))
        .with_state(state)
}

/// The router of `--admin-listen`: `/metrics` and `/admin/*` alone, without API keys (the
/// listener's address is what keeps clients out), with the same request layer.
pub fn admin_router(state: AppState, metrics: Arc<Metrics>) -> axum::Router {
    operator()
        .fallback(not_found)
        .layer(RequestIdLayer::rest(metrics))
        .with_state(state)
}

/// The operator's routes.
fn operator() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/metrics", get(admin::metrics))
        .route("/admin/groups", get(admin::groups))
}

async fn not_found(req: Request) -> Response {
    let msg = format!("no route for {} {}", req.method(), req.uri().path());
    (StatusCode::NOT_FOUND, Json(json!({ "error": msg }))).into_response()
}
