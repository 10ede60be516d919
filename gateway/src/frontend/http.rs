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

use crate::error::{ApiError, shown};
use crate::inference::Gateway;
use crate::request_id::RequestId;

pub type AppState = Arc<Gateway>;

/// Limits of the REST front ends, an extension of every route.
#[derive(Debug, Clone, Copy)]
pub struct RestLimits {
    pub max_request_bytes: usize,
    /// How long the body may take to arrive (`--body-timeout`).
    pub body_timeout: Duration,
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
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::InvalidInput(format!("invalid JSON body: {}", json_error(&e))))
}

/// What is wrong with a JSON body, without the values it holds: serde_json quotes the
/// offending value ("invalid type: string \"...\", expected f32"), which would send a
/// client's data back in the answer and into the log. An unknown field's name is quoted
/// through [`shown`]; the schema's own words (expected types, missing fields) are kept.
pub fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    // Parsed from a `Value` there is no position.
    let at = match e.line() {
        0 => String::new(),
        line => format!(" at line {line} column {}", e.column()),
    };
    match e.classify() {
        Category::Syntax => format!("malformed JSON{at}"),
        Category::Eof => format!("the JSON ends early{at}"),
        Category::Io => format!("unreadable body{at}"),
        Category::Data => {
            let text = e.to_string();
            let text = text.strip_suffix(at.as_str()).unwrap_or(&text);
            let expected = text.split_once(", expected ").map(|(_, x)| x);
            let named = |prefix: &str| {
                let rest = text.strip_prefix(prefix)?.strip_prefix('`')?;
                Some(rest.split_once('`')?.0.to_owned())
            };
            let what = if text.starts_with("invalid type: ") {
                format!("wrong type, expected {}", expected.unwrap_or("another type"))
            } else if text.starts_with("invalid value: ") {
                format!("wrong value, expected {}", expected.unwrap_or("another value"))
            } else if let Some(name) = named("unknown field ") {
                format!("unknown field {}", shown(&name))
            } else if text.starts_with("unknown variant ") {
                format!("unknown value, expected {}", expected.unwrap_or("another"))
            } else if text.starts_with("missing field ") || text.starts_with("invalid length ") {
                text.to_owned()
            } else {
                "a value does not fit the request's schema".to_owned()
            };
            format!("{what}{at}")
        }
    }
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
        let body = tokio::time::timeout(limits.body_timeout, Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::BodyTimeout(format!(
                    "the request body did not arrive within {:?}",
                    limits.body_timeout
                ))
            })?;
        let body = parse_json(body, limits.max_request_bytes)?;
        Ok(Self {
            body,
            timeout,
            request_id,
            error: PhantomData,
        })
    }
}

/// A JSON object body whose fields are kept as their raw text until each is read, typed,
/// with [`field`]: no `serde_json::Value` tree, which takes about 20 times the size of a
/// long array of numbers, is ever built from what a client sent.
pub type Fields = std::collections::BTreeMap<String, Box<serde_json::value::RawValue>>;

/// Takes field `name` out of a JSON body, typed; a wrong type is an error naming it.
/// (Typed structs with `#[serde(flatten)]` lose the field's name in their errors.)
pub fn field<T: serde::de::DeserializeOwned>(body: &mut Fields, name: &str) -> Result<Option<T>, ApiError> {
    match body.remove(name) {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|e| ApiError::InvalidInput(format!("'{name}': {}", json_error(&e)))),
    }
}

/// One string or a list of strings (`stop`, `prompt`, the embeddings' `input`), read as
/// it streams by: an untagged enum or a `Value` would first hold the whole value in memory
/// as a tree (a list of numbers as about 20 times its text).
#[derive(Debug)]
pub struct Strings(pub Vec<String>);

/// One string of [`Strings`]' list; anything else is refused with words for the token
/// arrays OpenAI also allows in `prompt` and `input`.
struct ListedString(String);

impl<'de> serde::Deserialize<'de> for ListedString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ListedString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of strings (token arrays are not supported)")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ListedString, E> {
                Ok(ListedString(s.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> serde::Deserialize<'de> for Strings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Strings;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Strings, E> {
                Ok(Strings(vec![s.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strings, A::Error> {
                let mut out = Vec::new();
                while let Some(ListedString(s)) = seq.next_element()? {
                    out.push(s);
                }
                Ok(Strings(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Like [`field`], for a field the request must have.
pub fn required<T: serde::de::DeserializeOwned>(body: &mut Fields, name: &str) -> Result<T, ApiError> {
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
                "Request-Timeout must be a positive number of seconds, got {}",
                shown(&String::from_utf8_lossy(v.as_bytes()))
            ))
        })?;
    Ok(Some(Duration::from_secs_f64(secs.min(1e9))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        model: String,
        dims: Vec<f32>,
        mode: Option<Mode>,
    }

    #[derive(Debug, serde::Deserialize)]
    enum Mode {
        Fast,
    }

    fn error_of(json: &str) -> String {
        json_error(&serde_json::from_str::<Body>(json).unwrap_err())
    }

    #[test]
    fn json_errors_say_what_is_wrong_without_the_values() {
        let secret = "SSN 123-45-6789";
        let cases = [
            (
                format!(r#"{{"model": "m", "dims": ["{secret}"]}}"#),
                "wrong type, expected f32 at line 1 column",
            ),
            (
                format!(r#"{{"model": 5, "dims": [], "x": "{secret}"}}"#),
                "wrong type, expected a string",
            ),
            (
                format!(r#"{{"model": "m", "dims": [], "mode": "{secret}"}}"#),
                "unknown value, expected `Fast`",
            ),
            (
                r#"{"model": "m", "dims": [], "extra\n\u001b[31m": 1}"#.to_owned(),
                r#"unknown field "extra\n\u{1b}[31m""#,
            ),
            (r#"{"dims": []}"#.to_owned(), "missing field `model`"),
            (format!(r#"{{"model": "{secret}""#), "the JSON ends early"),
            (format!(r#"{{"model": "{secret}" x"#), "malformed JSON at line 1"),
        ];
        for (json, want) in cases {
            let got = error_of(&json);
            assert!(got.contains(want), "{json}: {got:?} lacks {want:?}");
            assert!(!got.contains("123-45"), "{json}: {got:?} repeats the value");
        }
        let long = format!(r#"{{"model": "m", "dims": [], "{}": 1}}"#, "k".repeat(10_000));
        assert!(error_of(&long).len() < 120, "{}", error_of(&long));
    }

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
