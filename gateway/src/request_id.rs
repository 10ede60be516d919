//! The request span and request ids, on REST and gRPC alike.
//!
//! `x-request-id` from the client (header or gRPC metadata) is kept when it is a sane
//! token, else a new random one is made. The id is echoed in the response and is a field
//! of the `request` span, which every log line of the request carries along with the
//! trace id. The span continues the client's trace when the request has a W3C
//! `traceparent`. One log line closes the request: debug when it succeeded, warn with the
//! error's message when it failed. Probes (health, readiness, liveness, `/metrics`) log
//! at debug whatever they answer: "not ready" from a readiness probe is an answer, and
//! the kubelet asks every few seconds.
//!
//! The layer is also the one place requests are counted and timed
//! (`rankway_requests_total`, `rankway_request_duration_seconds`): REST by route template
//! and HTTP status, gRPC by method path and gRPC code. Labels take only values the
//! gateway knows: a path no route matches is `unmatched`, a gRPC method it does not serve
//! `unknown`. The path a client sent goes into the span (and so into log lines) cut to
//! [`MAX_LOGGED_PATH`] bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::MatchedPath;
use http::{HeaderValue, Request, Response};
use rankway_runtime::telemetry;
use tracing::Instrument;

use crate::error::ApiError;
use crate::metrics::Metrics;

pub const HEADER: &str = "x-request-id";
/// Longest part of a request path that goes into the span and the log.
const MAX_LOGGED_PATH: usize = 256;
/// The gRPC methods the gateway serves: the only method label values besides `unknown`.
const GRPC_METHODS: &[&str] = &[
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ServerMetadata",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];
/// Longest client-chosen id kept; a longer one is replaced.
const MAX_LEN: usize = 128;

/// How long the call to rank 0 that ran a request's batch took; a front end puts it in
/// the response's extensions so the layer can tell the gateway's own time from it.
#[derive(Clone, Copy, Debug)]
pub struct WorkerTime(pub Duration);

/// The id of the request being served, in its extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// The client's id if it is 1..=128 visible ASCII characters, else a new one.
    pub fn from_header(value: Option<&HeaderValue>) -> Self {
        match value.and_then(|v| v.to_str().ok()) {
            Some(s) if !s.is_empty() && s.len() <= MAX_LEN && s.bytes().all(|b| b.is_ascii_graphic()) => {
                Self(s.to_owned())
            }
            _ => Self(format!("{:032x}", rand::random::<u128>())),
        }
    }
}

/// Which front end a layer wraps: how its requests are labelled in the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// By route template (axum's `MatchedPath`) and HTTP status.
    Rest,
    /// By method path and gRPC code name.
    Grpc,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Rest => "rest",
            Protocol::Grpc => "grpc",
        }
    }
}

/// Wraps a REST router or a tonic server; see the module docs.
#[derive(Clone)]
pub struct RequestIdLayer {
    metrics: Arc<Metrics>,
    protocol: Protocol,
}

impl RequestIdLayer {
    /// For the REST router (added with `Router::layer`, so the matched route is known).
    pub fn rest(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            protocol: Protocol::Rest,
        }
    }

    /// For the gRPC server.
    pub fn grpc(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            protocol: Protocol::Grpc,
        }
    }
}

impl<S> tower::Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestIdService<S> {
    inner: S,
    layer: RequestIdLayer,
}

impl<S, B, R> tower::Service<Request<B>> for RequestIdService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = RequestId::from_header(req.headers().get(HEADER));
        let shown = bounded(req.uri().path(), MAX_LOGGED_PATH);
        let span = tracing::info_span!(
            "request",
            otel.name = %format!("{} {shown}", req.method()),
            otel.kind = "server",
            request_id = %id.0,
            method = %req.method(),
            path = %shown,
            trace_id = tracing::field::Empty,
        );
        // With tracing off the span has no context of its own: log the client's trace id.
        let client = telemetry::extract(req.headers());
        let client_trace = telemetry::context_trace_id(&client);
        telemetry::set_parent(&span, client);
        if let Some(trace_id) = telemetry::trace_id(&span).or(client_trace) {
            span.record("trace_id", trace_id.as_str());
        }
        let path = req.uri().path().to_owned();
        let route = match self.layer.protocol {
            Protocol::Rest => req
                .extensions()
                .get::<MatchedPath>()
                .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned()),
            Protocol::Grpc => GRPC_METHODS
                .iter()
                .find(|m| **m == path)
                .map_or("unknown", |m| *m)
                .to_owned(),
        };
        req.extensions_mut().insert(id.clone());
        let layer = self.layer.clone();
        let started = Instant::now();
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(
            async move {
                let mut resp = fut.await?;
                if let Ok(v) = HeaderValue::from_str(&id.0) {
                    resp.headers_mut().insert(HEADER, v);
                }
                let grpc = log_outcome(&resp, started, is_probe(&path));
                let code = match layer.protocol {
                    Protocol::Rest => resp.status().as_str().to_owned(),
                    Protocol::Grpc => format!("{grpc:?}"),
                };
                let elapsed = started.elapsed();
                layer.metrics.observe_request(&route, &code, elapsed);
                if let Some(WorkerTime(worker)) = resp.extensions().get::<WorkerTime>() {
                    layer
                        .metrics
                        .observe_added(layer.protocol.label(), elapsed.saturating_sub(*worker));
                }
                Ok(resp)
            }
            .instrument(span),
        )
    }
}

/// Health, readiness and liveness checks and the metrics scrape, over REST or gRPC.
/// The server's health probes, which a kubelet or a load balancer sends without
/// credentials: they pass `crate::auth` without a key.
pub fn is_health_probe(path: &str) -> bool {
    path.starts_with("/v2/health/")
        || path.starts_with("/grpc.health.v1.Health/")
        || path == "/inference.GRPCInferenceService/ServerLive"
        || path == "/inference.GRPCInferenceService/ServerReady"
}

/// Requests logged at debug whatever they answer: the health probes, model readiness and
/// the metrics scrape.
fn is_probe(path: &str) -> bool {
    const GRPC_PROBES: [&str; 3] = ["/ServerLive", "/ServerReady", "/ModelReady"];
    is_health_probe(path)
        || (path.starts_with("/v2/models/") && path.ends_with("/ready"))
        || path == "/metrics"
        || (path.starts_with("/inference.GRPCInferenceService/")
            && GRPC_PROBES.iter().any(|p| path.ends_with(p)))
}

/// The request's closing log line. Returns the gRPC code: a failed call carries it in its
/// headers (a trailers-only answer); a successful one sends OK later, in its trailers.
/// `s` cut to at most `max` bytes (on a character boundary), marked when cut.
fn bounded(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len()).into()
}

fn log_outcome<R>(resp: &Response<R>, started: Instant, probe: bool) -> tonic::Code {
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let status = resp.status().as_u16();
    let grpc = tonic::Status::from_header_map(resp.headers());
    let code = grpc.as_ref().map_or(tonic::Code::Ok, |s| s.code());
    if probe {
        tracing::debug!(status, grpc_code = ?code, elapsed_ms, "probe");
    } else if let Some(err) = resp.extensions().get::<ApiError>() {
        tracing::warn!(status, kind = err.kind(), error = %err, elapsed_ms, "request failed");
    } else if let Some(g) = grpc.filter(|s| s.code() != tonic::Code::Ok) {
        tracing::warn!(status, grpc_code = ?g.code(), error = g.message(), elapsed_ms, "request failed");
    } else if resp.status().is_client_error() || resp.status().is_server_error() {
        tracing::warn!(status, elapsed_ms, "request failed");
    } else {
        tracing::debug!(status, elapsed_ms, "request");
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_the_inference_service_is_a_known_label() {
        let proto = include_str!("../../proto/proto/grpc_predict_v2.proto");
        let rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap().trim())
            .collect();
        assert_eq!(rpcs.len(), 7, "{rpcs:?}");
        for rpc in rpcs {
            let path = format!("/inference.GRPCInferenceService/{rpc}");
            assert!(
                GRPC_METHODS.contains(&path.as_str()),
                "{path} is not in GRPC_METHODS"
            );
        }
    }

    #[test]
    fn long_paths_are_cut_for_the_log() {
        assert_eq!(bounded("/v2/models/m/infer", 256), "/v2/models/m/infer");
        let long = format!("/v2/models/{}/infer", "é".repeat(4000));
        let shown = bounded(&long, 256);
        assert!(shown.len() < 300, "{}", shown.len());
        assert!(shown.ends_with(&format!("… ({} bytes)", long.len())), "{shown}");
    }

    #[test]
    fn probes_are_told_from_requests() {
        for probe in [
            "/v2/health/ready",
            "/v2/health/live",
            "/v2/models/minilm/ready",
            "/metrics",
            "/grpc.health.v1.Health/Check",
            "/inference.GRPCInferenceService/ServerReady",
            "/inference.GRPCInferenceService/ModelReady",
        ] {
            assert!(is_probe(probe), "{probe}");
        }
        for request in [
            "/v2/models/minilm/infer",
            "/v2/models/minilm",
            "/v1/embeddings",
            "/admin/groups",
            "/inference.GRPCInferenceService/ModelInfer",
            "/inference.GRPCInferenceService/ModelMetadata",
        ] {
            assert!(!is_probe(request), "{request}");
        }
    }

    #[test]
    fn client_ids_are_kept_when_sane() {
        let id = |s: &str| RequestId::from_header(Some(&HeaderValue::from_str(s).unwrap())).0;
        assert_eq!(id("abc-123_XYZ.7"), "abc-123_XYZ.7");
        for bad in ["", "has space", &"x".repeat(MAX_LEN + 1)] {
            let got = id(bad);
            assert_ne!(got, bad, "{bad:?} is not kept");
            assert_eq!(got.len(), 32, "a new id replaces {bad:?}");
            assert!(
                got.bytes().all(|b| b.is_ascii_hexdigit()),
                "the id that replaces {bad:?}: {got}"
            );
        }
        let fresh = RequestId::from_header(None).0;
        assert_ne!(fresh, RequestId::from_header(None).0, "new ids differ");
    }
}
