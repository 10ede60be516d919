//! The OpenAI API: [`embeddings`] (`POST /v1/embeddings`), [`chat`] (chat and
//! completions, whole or as Server-Sent Events, and `GET /v1/models`), with the
//! requests' fields read and checked by [`request`]. Errors take OpenAI's form.

pub mod chat;
pub mod embeddings;
pub mod request;

use axum::Json;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::ApiError;
use crate::frontend::http::finish_error;

/// An error in OpenAI's form: `{"error": {"message", "type", "param", "code"}}`.
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let kind = match self.0 {
            ApiError::InvalidInput(_) | ApiError::TooLarge(_) => "invalid_request_error",
            ApiError::ModelNotFound(_) => "not_found_error",
            ApiError::QueueFull { .. } => "rate_limit_error",
            _ => "server_error",
        };
        let body = json!({
            "error": { "message": self.0.to_string(), "type": kind, "param": null, "code": self.0.kind() }
        });
        finish_error((self.0.http_status(), Json(body)).into_response(), &self.0)
    }
}
