//! API keys: with `--api-key-file`, every request on both front ends must carry one of
//! the file's keys as a bearer token (`Authorization: Bearer KEY` on REST, the
//! `authorization` metadata on gRPC), except the probes a kubelet or a load balancer
//! sends without credentials: `/v2/health/*`, gRPC `ServerLive`, `ServerReady` and
//! `grpc.health.v1.Health`. `/metrics` and `/admin/*` need a key like everything else,
//! unless `--admin-listen` moves them to a listener of their own, which takes no keys.
//!
//! The file is a key file (`rankway_runtime::keys`: one key per line), checked for
//! changes every `--api-key-reload-interval`.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use rankway_runtime::keys::GrpcAuthLayer;
pub use rankway_runtime::keys::KeyFile as ApiKeys;

/// Requests that pass without a key: the health probes.
fn open(path: &str) -> bool {
    crate::request_id::is_health_probe(path)
}

const REFUSED: &str = "a valid API key is required: send `Authorization: Bearer KEY`";

/// The REST middleware (`axum::middleware::from_fn_with_state`).
pub async fn rest(keys: axum::extract::State<Option<Arc<ApiKeys>>>, req: Request, next: Next) -> Response {
    match keys.0 {
        Some(keys) if !open(req.uri().path()) && !keys.allows(req.headers().get(header::AUTHORIZATION)) => {
            // In the shape of the front end the client is talking to.
            let body = if req.uri().path().starts_with("/v1/") {
                json!({"error": {"message": REFUSED, "type": "authentication_error", "param": null, "code": "invalid_api_key"}})
            } else {
                json!({ "error": REFUSED })
            };
            let mut resp = (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            resp
        }
        _ => next.run(req).await,
    }
}

/// The gRPC layer: UNAUTHENTICATED without a key, the probes open.
pub fn grpc_layer(keys: Option<Arc<ApiKeys>>) -> GrpcAuthLayer {
    GrpcAuthLayer::new(keys, open, GRPC_REFUSED)
}

const GRPC_REFUSED: &str = "a valid API key is required: send `authorization: Bearer KEY`";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_open() {
        assert!(open("/v2/health/ready"));
        assert!(open("/grpc.health.v1.Health/Check"));
        assert!(!open("/v2/models/m/infer"));
        assert!(!open("/metrics"));
        assert!(!open("/inference.GRPCInferenceService/ModelInfer"));
    }
}
