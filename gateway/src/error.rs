//! The gateway's one error type, and the one place it becomes an HTTP status or a gRPC
//! code. Its [`ApiError::kind`] labels the rejection metrics.

use std::time::Duration;

/// Longest piece of a client's value an error message quotes.
const SHOWN_CHARS: usize = 64;

/// A client's value as an error message may quote it: at most 64 characters, escaped
/// (no newline or terminal escape reaches a log line), marked when cut.
pub fn shown(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(SHOWN_CHARS)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if value.chars().nth(SHOWN_CHARS).is_some() {
        out.push('…');
    }
    format!("\"{out}\"")
}

/// A client's shape as an error message may quote it: whole up to 8 dimensions, else
/// only their count.
pub fn shown_shape(shape: &[i64]) -> String {
    if shape.len() <= 8 {
        format!("{shape:?}")
    } else {
        format!("[{} dimensions]", shape.len())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("unknown model {0:?}")]
    ModelNotFound(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("queue of model {model:?} is full ({capacity} requests waiting); retry later")]
    QueueFull {
        model: String,
        capacity: usize,
        retry_after: Duration,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The client was too slow sending its request (REST `--body-timeout`).
    #[error("{0}")]
    BodyTimeout(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// A group's rank 0 answered something its model's signature does not allow.
    #[error("invalid reply from a worker group: {0}")]
    BadReply(String),
}

impl ApiError {
    /// A request the client got wrong, as `message` says.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::InvalidInput(message.into())
    }

    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::InvalidInput(_) => "invalid_input",
            ApiError::TooLarge(_) => "too_large",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::DeadlineExceeded(_) => "deadline_exceeded",
            ApiError::BodyTimeout(_) => "body_timeout",
            ApiError::Internal(_) => "internal",
            ApiError::BadReply(_) => "bad_reply",
        }
    }

    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ApiError::ModelNotFound(_) => S::NOT_FOUND,
            ApiError::InvalidInput(_) => S::BAD_REQUEST,
            ApiError::TooLarge(_) => S::PAYLOAD_TOO_LARGE,
            ApiError::QueueFull { .. } => S::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => S::SERVICE_UNAVAILABLE,
            ApiError::DeadlineExceeded(_) => S::GATEWAY_TIMEOUT,
            ApiError::BodyTimeout(_) => S::REQUEST_TIMEOUT,
            ApiError::Internal(_) => S::INTERNAL_SERVER_ERROR,
            ApiError::BadReply(_) => S::BAD_GATEWAY,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code as C;
        match self {
            ApiError::ModelNotFound(_) => C::NotFound,
            ApiError::InvalidInput(_) => C::InvalidArgument,
            ApiError::TooLarge(_) | ApiError::QueueFull { .. } => C::ResourceExhausted,
            ApiError::Unavailable(_) => C::Unavailable,
            ApiError::DeadlineExceeded(_) | ApiError::BodyTimeout(_) => C::DeadlineExceeded,
            ApiError::Internal(_) | ApiError::BadReply(_) => C::Internal,
        }
    }

    /// Seconds a client should wait before retrying, for 429 answers.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::QueueFull { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

/// What a worker's gRPC failure means for the callers of its batch.
pub fn from_worker_status(group: &str, status: &tonic::Status) -> ApiError {
    use tonic::Code as C;
    let msg = format!("group {group:?}: {}", status.message());
    match status.code() {
        C::InvalidArgument => ApiError::InvalidInput(msg),
        C::DeadlineExceeded => ApiError::DeadlineExceeded(msg),
        code if matches!(
            code,
            C::ResourceExhausted | C::Unavailable | C::Cancelled | C::Unknown
        ) || broke_in_transit(status) =>
        {
            ApiError::Unavailable(format!("{msg} (the batch did not complete)"))
        }
        _ => ApiError::Internal(msg),
    }
}

/// Whether tonic made `status` from a transport error (the call's stream or connection
/// broke: a reset, a GOAWAY, a closed socket), which it keeps as the status's source; a
/// status rank 0 sent has none. The gRPC spec maps a stream reset to INTERNAL, but to
/// the gateway a call that broke with its group is a batch that did not complete.
fn broke_in_transit(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_values_are_quoted_escaped_and_bounded() {
        assert_eq!(shown("plain"), "\"plain\"");
        assert_eq!(shown("a\nb\u{1b}[31m"), "\"a\\nb\\u{1b}[31m\"");
        let long = shown(&"z".repeat(10_000));
        assert_eq!(long.len(), 64 + "\"\"…".len(), "{long}");
        assert_eq!(shown_shape(&[2, 16]), "[2, 16]");
        assert_eq!(shown_shape(&vec![1; 100_000]), "[100000 dimensions]");
    }

    #[test]
    fn a_call_broken_in_transit_is_unavailable_and_a_status_from_rank_0_is_not() {
        let sent = tonic::Status::internal("the model failed");
        assert!(matches!(from_worker_status("g", &sent), ApiError::Internal(_)));
        let mut broken = tonic::Status::internal("h2 protocol error: http2 error");
        broken.set_source(std::sync::Arc::new(std::io::Error::other("stream reset")));
        let error = from_worker_status("g", &broken);
        assert!(
            matches!(&error, ApiError::Unavailable(m) if m.contains("did not complete")),
            "{error:?}"
        );
    }

    #[test]
    fn codes_match_statuses() {
        let cases = [
            (ApiError::ModelNotFound("x".into()), 404, tonic::Code::NotFound),
            (
                ApiError::InvalidInput("x".into()),
                400,
                tonic::Code::InvalidArgument,
            ),
            (
                ApiError::TooLarge("x".into()),
                413,
                tonic::Code::ResourceExhausted,
            ),
            (
                ApiError::QueueFull {
                    model: "m".into(),
                    capacity: 1,
                    retry_after: Duration::from_secs(1),
                },
                429,
                tonic::Code::ResourceExhausted,
            ),
            (ApiError::Unavailable("x".into()), 503, tonic::Code::Unavailable),
            (ApiError::BadReply("x".into()), 502, tonic::Code::Internal),
            (
                ApiError::DeadlineExceeded("x".into()),
                504,
                tonic::Code::DeadlineExceeded,
            ),
        ];
        for (err, http, grpc) in cases {
            assert_eq!(err.http_status().as_u16(), http, "{err:?}");
            assert_eq!(err.grpc_code(), grpc, "{err:?}");
        }
    }
}
