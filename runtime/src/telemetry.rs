//! Logs and traces, the same way in both binaries.
//!
//! Logs: `tracing` to stderr as text or JSON (`--log-format`), filtered by `RUST_LOG`.
//! Traces: OpenTelemetry over OTLP/gRPC when `--otlp-endpoint` (`OTEL_EXPORTER_OTLP_ENDPOINT`)
//! is set, off otherwise; spans are `tracing` spans bridged by `tracing-opentelemetry`.
//! Trace context crosses processes as W3C `traceparent`: HTTP headers and gRPC metadata
//! ([`extract`], [`inject`]), and the group's step header between ranks ([`TraceParent`]).

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Args, ValueEnum};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Target of the spans that only traces use: the gateway's `queue`, `batch` and
/// `worker.Infer`, a rank's `forward` and `collective`. Without `--otlp-endpoint` they
/// are off ([`init`] turns this target off), so a process that exports no traces does not
/// make them on every request. No log line needs them: the lines written inside carry
/// their own fields.
pub const TRACE_ONLY: &str = "rankway::trace";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Which traces are recorded, as OpenTelemetry's `OTEL_TRACES_SAMPLER`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum SamplerKind {
    AlwaysOn,
    AlwaysOff,
    Traceidratio,
    ParentbasedAlwaysOn,
    ParentbasedAlwaysOff,
    ParentbasedTraceidratio,
}

/// Log and trace flags, shared by both binaries.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format.
    #[arg(long, env = "RANKWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// OTLP/gRPC collector for traces, e.g. http://otel-collector:4317; tracing is off
    /// when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// service.name of this process's spans (default: the binary's name).
    #[arg(long, env = "OTEL_SERVICE_NAME", global = true)]
    pub service_name: Option<String>,
    /// Which traces to record; parentbased_* follow the caller's sampled flag.
    #[arg(long, env = "OTEL_TRACES_SAMPLER", value_enum, default_value_t = SamplerKind::ParentbasedAlwaysOn, global = true)]
    pub traces_sampler: SamplerKind,
    /// Ratio of traces recorded by the *traceidratio samplers, 0 to 1.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0, global = true)]
    pub traces_sampler_arg: f64,
}

impl TelemetryArgs {
    fn sampler(&self) -> Sampler {
        let ratio = self.traces_sampler_arg.clamp(0.0, 1.0);
        match self.traces_sampler {
            SamplerKind::AlwaysOn => Sampler::AlwaysOn,
            SamplerKind::AlwaysOff => Sampler::AlwaysOff,
            SamplerKind::Traceidratio => Sampler::TraceIdRatioBased(ratio),
            SamplerKind::ParentbasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            SamplerKind::ParentbasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            SamplerKind::ParentbasedTraceidratio => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter { endpoint: String, message: String },
}

/// The installed logging and tracing; [`Telemetry::shutdown`] flushes pending spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global `tracing` subscriber (and, with an endpoint, the OTLP pipeline).
/// Call from inside the Tokio runtime: the exporter's gRPC channel lives on it.
pub fn init(args: &TelemetryArgs, default_service: &str) -> Result<Telemetry, TelemetryError> {
    let filter = log_filter(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        args.otlp_endpoint.is_some(),
    );
    let provider = match &args.otlp_endpoint {
        Some(endpoint) => Some(provider(args, endpoint, default_service)?),
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing_opentelemetry::layer().with_tracer(p.tracer("rankway"))
    });
    // Colour only on a terminal: escape codes in a log file or `kubectl logs` are noise.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match args.log_format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    if let Some(endpoint) = &args.otlp_endpoint {
        tracing::info!(%endpoint, sampler = ?args.traces_sampler, "exporting traces over OTLP/gRPC");
    }
    Ok(Telemetry { provider })
}

/// `base` (`RUST_LOG`), with the [`TRACE_ONLY`] spans off unless traces are `exported`.
fn log_filter(base: EnvFilter, exported: bool) -> EnvFilter {
    if exported {
        return base;
    }
    base.add_directive(format!("{TRACE_ONLY}=off").parse().expect("a valid directive"))
}

fn provider(
    args: &TelemetryArgs,
    endpoint: &str,
    default_service: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let service = args
        .service_name
        .clone()
        .unwrap_or_else(|| default_service.to_owned());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        })?;
    exporter.set_resource(&resource);
    let exporter = OnRuntime {
        inner: std::sync::Arc::new(exporter),
        runtime: tokio::runtime::Handle::current(),
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(args.sampler())
        .with_resource(resource)
        .build())
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter; call after the drain, so
    /// the spans of the last requests go out too.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The batch processor's flush blocks on its own thread while the export runs on
        // this runtime: wait for it off the runtime's threads.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match flushed {
            Ok(Ok(())) => tracing::info!("trace exporter flushed and stopped"),
            Ok(Err(e)) => tracing::warn!(error = %e, "trace exporter shutdown"),
            Err(e) => tracing::warn!(error = %e, "trace exporter shutdown panicked"),
        }
    }
}

/// The SDK's batch processor exports from a thread of its own, where the tonic client,
/// which needs a Tokio reactor, cannot run; each export is therefore spawned on the
/// runtime the exporter was built on and awaited from the processor's thread.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: std::sync::Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        match self.runtime.spawn(async move { inner.export(batch).await }).await {
            Ok(result) => result,
            Err(e) => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                e.to_string(),
            )),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// The W3C trace context a request carries in its headers (gRPC metadata are headers too).
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `span`'s context into `headers` as `traceparent` (nothing when not traced).
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// Makes `cx` the parent of `span` if it carries a trace; call before entering `span`.
pub fn set_parent(span: &tracing::Span, cx: Context) {
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Makes `parent` (a span of this process) the parent of `span`, even when `span` was
/// created elsewhere in the tree; call before entering `span`.
pub fn set_parent_span(span: &tracing::Span, parent: &tracing::Span) {
    set_parent(span, parent.context());
}

/// Links `span` to the span `other` (e.g. a batch to each of its requests).
pub fn add_link(span: &tracing::Span, other: &tracing::Span) {
    let cx = other.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The trace id of `span`, as 32 hex digits, when it is traced.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    context_trace_id(&span.context())
}

/// The trace id `cx` carries, as 32 hex digits.
pub fn context_trace_id(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// A span's context in plain numbers, for the group's step header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// `span`'s context, when it is traced.
    pub fn of(span: &tracing::Span) -> Option<Self> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| Self {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            sampled: sc.is_sampled(),
        })
    }

    /// A remote parent context for spans of another process.
    pub fn context(&self) -> Context {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let sc = SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            flags,
            true,
            TraceState::default(),
        );
        Context::new().with_remote_span_context(sc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_headers_round_trip() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = extract(&headers);
        let sc = cx.span().span_context().clone();
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(sc.is_sampled() && sc.is_remote());
        let tp = TraceParent {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            sampled: true,
        };
        let back = tp.context();
        assert_eq!(back.span().span_context(), &sc);
        assert!(!extract(&http::HeaderMap::new()).span().span_context().is_valid());
    }

    #[test]
    fn trace_only_spans_are_made_only_when_traces_are_exported() {
        // (trace-only span made, ordinary info span made) under each filter.
        let made = |base: &str, exported: bool| {
            let subscriber = tracing_subscriber::registry().with(log_filter(EnvFilter::new(base), exported));
            tracing::subscriber::with_default(subscriber, || {
                let trace_only = tracing::info_span!(target: TRACE_ONLY, "batch");
                let logged = tracing::info_span!("request");
                (!trace_only.is_disabled(), !logged.is_disabled())
            })
        };
        assert_eq!(made("info", false), (false, true));
        assert_eq!(made("debug", false), (false, true), "not even at debug");
        assert_eq!(made("info", true), (true, true));
        assert_eq!(made("warn", true), (false, false), "RUST_LOG still filters them");
    }

    #[test]
    fn samplers_follow_the_otel_names() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            t: TelemetryArgs,
        }
        let cli = Cli::try_parse_from([
            "x",
            "--traces-sampler",
            "parentbased_traceidratio",
            "--traces-sampler-arg",
            "0.25",
        ])
        .unwrap();
        assert!(matches!(cli.t.sampler(), Sampler::ParentBased(_)));
        assert!(Cli::try_parse_from(["x", "--traces-sampler", "sometimes"]).is_err());
    }
}
