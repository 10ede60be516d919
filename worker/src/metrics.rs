//! Prometheus metrics of one rank, served at `GET /metrics` on `--metrics-listen` in the
//! Prometheus text format. Names start with `rankway_worker_`; every series carries the
//! rank's `group` and `rank` labels.
//!
//! The same plain-HTTP port answers the probes: `GET /health/live` (200 while the process
//! serves) and `GET /health/ready` (200 while the rank serves, 503 with the reason
//! otherwise), which stay reachable when the gRPC port takes only TLS clients:
//! Kubernetes' gRPC probes do not speak TLS.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder, exponential_buckets,
};

use rankway_runtime::listen::{ConnectionMetrics, Listener};

use crate::stats::{EngineStats, GenStats};

/// 50 µs .. ~26 s.
fn seconds_buckets() -> Vec<f64> {
    exponential_buckets(5e-5, 2.0, 20).expect("valid buckets")
}

fn registered<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

/// A gauge registered in `registry`, its series labelled `values` (group, rank).
fn labelled_gauge(registry: &Registry, values: &[&str], name: &str, help: &str) -> IntGauge {
    registered(
        registry,
        IntGaugeVec::new(Opts::new(name, help), &LABELS).expect("valid gauge"),
    )
    .with_label_values(values)
}

/// A counter registered in `registry`, its series labelled `values` (group, rank).
fn labelled_counter(registry: &Registry, values: &[&str], name: &str, help: &str) -> IntCounter {
    registered(
        registry,
        IntCounterVec::new(Opts::new(name, help), &LABELS).expect("valid counter"),
    )
    .with_label_values(values)
}

pub struct WorkerMetrics {
    registry: Registry,
    /// Connection counts of the gRPC and metrics listeners.
    pub connections: ConnectionMetrics,
    /// This rank's `group` and `rank` label values, first on every series.
    labels: [String; 2],
    forward: Histogram,
    collective: HistogramVec,
    batches: IntCounter,
    abandoned: IntCounter,
    inline: IntCounter,
    ready: IntGauge,
    queue_depth: IntGauge,
    /// Rank 0 of a generative group: its scheduler's figures.
    generation: std::sync::OnceLock<(Arc<GenStats>, GenerationMetrics)>,
}

/// Counters mirror [`GenStats`]' at each scrape (they only grow); gauges copy it.
struct GenerationMetrics {
    running: IntGauge,
    waiting: IntGauge,
    free_kv: IntGauge,
    total_kv: IntGauge,
    steps: IntCounter,
    shared_steps: IntCounter,
    generated: IntCounter,
    prompt: IntCounter,
}

/// Every series is labelled `group` and `rank`, in that order. (Ordinary labels rather
/// than the registry's constant labels, which the encoder writes in hash order.)
const LABELS: [&str; 2] = ["group", "rank"];

impl WorkerMetrics {
    /// The metrics of rank `rank` of `world` ranks in `group`.
    pub fn new(group: &str, rank: usize, world: usize) -> Self {
        let r = Registry::new_custom(Some("rankway_worker".into()), None).expect("valid registry");
        let labels = [group.to_owned(), rank.to_string()];
        let values = [labels[0].as_str(), labels[1].as_str()];
        let gauge = |name: &str, help: &str| labelled_gauge(&r, &values, name, help);
        let counter = |name: &str, help: &str| labelled_counter(&r, &values, name, help);
        gauge("world_size", "Ranks in this rank's group.").set(world as i64);
        let seconds = |name: &str, help: &str, extra: &[&'static str]| {
            let names: Vec<&str> = LABELS.iter().chain(extra).copied().collect();
            let opts = HistogramOpts::new(name, help).buckets(seconds_buckets());
            registered(&r, HistogramVec::new(opts, &names).expect("valid histogram"))
        };
        Self {
            forward: seconds(
                "forward_seconds",
                "Time of this rank's forward pass of one batch, its all-reduces included (not the inputs' broadcast).",
                &[],
            )
            .with_label_values(&values),
            collective: seconds(
                "collective_seconds",
                "Time of one collective on this rank (waiting for the other ranks included), by op.",
                &["op"],
            ),
            batches: counter("batches_total", "Batches this rank ran a forward pass for."),
            abandoned: counter(
                "abandoned_batches_total",
                "Batches rank 0 stopped between sub-batches because their caller had gone (deadline passed or cancelled).",
            ),
            inline: counter(
                "inline_batches_total",
                "Batches rank 0 ran on the gRPC thread that received them instead of its model thread (--inline-max).",
            ),
            ready: gauge(
                "ready",
                "1 while this rank is ready (on rank 0: the whole group is complete and warm).",
            ),
            queue_depth: gauge("queue_depth", "Batches waiting for rank 0's model thread."),
            generation: std::sync::OnceLock::new(),
            connections: ConnectionMetrics::new(&r, &[(LABELS[0], values[0]), (LABELS[1], values[1])]),
            labels,
            registry: r,
        }
    }

    /// Rank 0 of a generative group: adds its scheduler's series. Returns the
    /// time-to-first-token histogram, which the Generate service observes.
    pub fn track_generation(&self, stats: Arc<GenStats>) -> Histogram {
        let values = [self.labels[0].as_str(), self.labels[1].as_str()];
        let r = &self.registry;
        let gauge = |name: &str, help: &str| labelled_gauge(r, &values, name, help);
        let counter = |name: &str, help: &str| labelled_counter(r, &values, name, help);
        let m = GenerationMetrics {
            running: gauge("running_sequences", "Sequences in rank 0's running batch."),
            waiting: gauge(
                "waiting_sequences",
                "Sequences waiting for room in the batch or the KV cache.",
            ),
            free_kv: gauge("kv_cache_free_tokens", "KV cache tokens no sequence holds."),
            total_kv: gauge("kv_cache_tokens", "KV cache size in tokens."),
            steps: counter("generation_steps_total", "Generation steps run by the group."),
            shared_steps: counter(
                "generation_shared_steps_total",
                "Generation steps that computed more than one sequence.",
            ),
            generated: counter("generated_tokens_total", "Tokens generated."),
            prompt: counter("prompt_tokens_total", "Prompt tokens prefilled."),
        };
        let _ = self.generation.set((stats, m));
        let opts = HistogramOpts::new(
            "time_to_first_token_seconds",
            "Time from a Generate call's arrival on rank 0 to its first token (prompt checks, waiting for room, prefill).",
        )
        .buckets(seconds_buckets());
        registered(r, HistogramVec::new(opts, &LABELS).expect("valid histogram")).with_label_values(&values)
    }

    pub fn abandoned_batch(&self) {
        self.abandoned.inc();
    }

    pub fn inline_batch(&self) {
        self.inline.inc();
    }

    /// Times a forward pass.
    pub fn observe_forward(&self, took: Duration) {
        self.forward.observe(took.as_secs_f64());
        self.batches.inc();
    }

    /// Times one collective (`op`: all_reduce, broadcast).
    pub fn observe_collective(&self, op: &str, took: Duration) {
        let [group, rank] = &self.labels;
        self.collective
            .with_label_values(&[group.as_str(), rank.as_str(), op])
            .observe(took.as_secs_f64());
    }

    /// Renders the registry after reading the engine's state into the gauges.
    pub fn render(&self, stats: &EngineStats) -> String {
        self.ready.set(i64::from(stats.is_ready()));
        self.queue_depth.set(stats.queued.load(Ordering::Acquire) as i64);
        if let Some((g, m)) = self.generation.get() {
            let gauge = |metric: &IntGauge, v: &std::sync::atomic::AtomicUsize| {
                metric.set(v.load(Ordering::Acquire) as i64)
            };
            gauge(&m.running, &g.running);
            gauge(&m.waiting, &g.waiting);
            gauge(&m.free_kv, &g.free_kv_tokens);
            gauge(&m.total_kv, &g.total_kv_tokens);
            let counter = |metric: &IntCounter, v: &std::sync::atomic::AtomicU64| {
                metric.inc_by(v.load(Ordering::Acquire).saturating_sub(metric.get()));
            };
            counter(&m.steps, &g.steps);
            counter(&m.shared_steps, &g.shared_steps);
            counter(&m.generated, &g.generated_tokens);
            counter(&m.prompt, &g.prompt_tokens);
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("encoding to a String cannot fail")
    }
}

/// Serves `GET /metrics` and the probes on `listener` (for as long as the process runs,
/// drain included; `stop` is the drain's signal).
pub async fn serve(
    listener: Listener,
    metrics: Arc<WorkerMetrics>,
    stats: Arc<EngineStats>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let ready_stats = stats.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(&stats),
                )
            }),
        )
        .route("/health/live", get(|| async { "live\n" }))
        .route(
            "/health/ready",
            get(move || async move {
                let draining = *stop.borrow();
                if ready_stats.serving(draining) {
                    (StatusCode::OK, "ready\n".to_owned())
                } else if draining {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: draining\n".to_owned(),
                    )
                } else {
                    let reason = ready_stats.not_ready_reason();
                    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n"))
                }
            }),
        );
    listener.serve_http(app, std::future::pending()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_prometheus_text() {
        let m = WorkerMetrics::new("a", 1, 2);
        m.observe_forward(Duration::from_millis(4));
        let text = m.render(&EngineStats::default());
        assert!(
            text.contains("rankway_worker_batches_total{group=\"a\",rank=\"1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE rankway_worker_forward_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("rankway_worker_world_size{group=\"a\",rank=\"1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("rankway_worker_ready{group=\"a\",rank=\"1\"} 0"),
            "{text}"
        );
        assert!(
            !text.contains("generation_steps_total"),
            "only generative groups have them"
        );
        let g = Arc::new(GenStats::default());
        m.track_generation(g.clone()).observe(0.25);
        g.steps.store(7, Ordering::Release);
        g.shared_steps.store(5, Ordering::Release);
        g.free_kv_tokens.store(96, Ordering::Release);
        m.render(&EngineStats::default());
        g.steps.store(9, Ordering::Release);
        let text = m.render(&EngineStats::default());
        for line in [
            "rankway_worker_generation_steps_total{group=\"a\",rank=\"1\"} 9",
            "rankway_worker_generation_shared_steps_total{group=\"a\",rank=\"1\"} 5",
            "rankway_worker_kv_cache_free_tokens{group=\"a\",rank=\"1\"} 96",
            "rankway_worker_time_to_first_token_seconds_count{group=\"a\",rank=\"1\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }
}
