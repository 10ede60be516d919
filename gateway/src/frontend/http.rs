//! What the REST front ends share: the state they are handed, the JSON request with its
//! body limit, timeout header and request id ([`JsonRequest`]), and how an error answer
//! is finished.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::state::Gateway;

pub type AppState = Arc<Gateway>;

/// Limits of the REST front ends, an extension of every route.
#[derive(Debug, Clone, Copy)]
pub struct RestLimits {
    pub max_request_bytes: usize,
}

/// Finishes an error answer: `Retry-After` when the error has one, and the error itself
/// in the response's extensions for the request's log line (crate::request_id).
pub fn finish_error(mut resp: Response, err: &ApiError) -> Response {
    resp.extensions_mut().insert(err.clone());
    if let Some(after) = err.retry_after() {
        let secs = after.as_secs().max(1).to_string();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_str(&secs).expect("digits"));
    }
    resp
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

/// What every JSON route takes: the body as `T` (within `--max-request-bytes`), the
/// client's `Request-Timeout` and the request's id (set by the request layer). A failure
/// answers in the front end's own error shape `E`.
pub struct JsonRequest<T, E> {
    pub body: T,
    pub timeout: Option<Duration>,
    pub request_id: RequestId,
    error: PhantomData<fn() -> E>,
}

impl<T, E> FromRequest<AppState> for JsonRequest<T, E>
where
    T: serde::de::DeserializeOwned,
    E: From<ApiError> + IntoResponse,
{
    type Rejection = E;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, E> {
        let missing =
            |what: &str| ApiError::Internal(format!("no {what} on the request (the router sets it)"));
        let limits = *req
            .extensions()
            .get::<RestLimits>()
            .ok_or_else(|| missing("limits"))?;
        let request_id = req
            .extensions()
            .get::<RequestId>()
            .cloned()
            .ok_or_else(|| missing("request id"))?;
        let timeout = rest_timeout(req.headers())?;
        let body = parse_json(Bytes::from_request(req, state).await, limits.max_request_bytes)?;
        Ok(Self {
            body,
            timeout,
            request_id,
            error: PhantomData,
        })
    }
}

/// Takes field `name` out of a JSON body, typed; a wrong type is an error naming it.
/// (Typed structs with `#[serde(flatten)]` lose the field's name in their errors.)
pub fn field<T: serde::de::DeserializeOwned>(
    body: &mut serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    match body.remove(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| ApiError::InvalidInput(format!("'{name}': {e}"))),
    }
}

/// Like [`field`], for a field the request must have.
pub fn required<T: serde::de::DeserializeOwned>(
    body: &mut serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<T, ApiError> {
    field(body, name)?.ok_or_else(|| ApiError::InvalidInput(format!("'{name}' is required")))
}

/// REST header carrying the client's timeout in seconds (fractions allowed).
pub const REQUEST_TIMEOUT_HEADER: &str = "request-timeout";

/// The client's timeout from `Request-Timeout: <seconds>`, if it sent one.
pub fn rest_timeout(headers: &http::HeaderMap) -> Result<Option<Duration>, ApiError> {
    let Some(v) = headers.get(REQUEST_TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let secs = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .ok_or_else(|| {
            ApiError::InvalidInput(format!(
                "Request-Timeout must be a positive number of seconds, got {v:?}"
            ))
        })?;
    Ok(Some(Duration::from_secs_f64(secs.min(1e9))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeout_parses() {
        let mut h = http::HeaderMap::new();
        assert_eq!(rest_timeout(&h).unwrap(), None);
        h.insert(REQUEST_TIMEOUT_HEADER, "1.5".parse().unwrap());
        assert_eq!(rest_timeout(&h).unwrap(), Some(Duration::from_millis(1500)));
        h.insert(REQUEST_TIMEOUT_HEADER, "-2".parse().unwrap());
        assert!(rest_timeout(&h).is_err());
    }
}
