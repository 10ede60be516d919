//! Prometheus metrics of one rank, served at `GET /metrics` on `--metrics-listen` in the
//! Prometheus text format. Names start with `rankway_worker_`; every series carries the
//! rank's `group` and `rank` labels.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder, exponential_buckets,
};
use tracing::Span;

use crate::dist::{Collective, CollectiveError, Shard};
use crate::engine::EngineStats;

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

pub struct WorkerMetrics {
    registry: Registry,
    /// This rank's `group` and `rank` label values, first on every series.
    labels: [String; 2],
    forward: Histogram,
    collective: HistogramVec,
    batches: IntCounter,
    ready: IntGauge,
    queue_depth: IntGauge,
}

/// Every series is labelled `group` and `rank`, in that order. (Ordinary labels rather
/// than the registry's constant labels, which the encoder writes in hash order.)
const LABELS: [&str; 2] = ["group", "rank"];

impl WorkerMetrics {
    pub fn new(group: &str, shard: Shard) -> Self {
        let r = Registry::new_custom(Some("rankway_worker".into()), None).expect("valid registry");
        let labels = [group.to_owned(), shard.rank.to_string()];
        let values = [labels[0].as_str(), labels[1].as_str()];
        let gauge = |name: &str, help: &str| {
            registered(
                &r,
                IntGaugeVec::new(Opts::new(name, help), &LABELS).expect("valid gauge"),
            )
            .with_label_values(&values)
        };
        gauge("world_size", "Ranks in this rank's group.").set(shard.world as i64);
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
            batches: registered(
                &r,
                IntCounterVec::new(
                    Opts::new("batches_total", "Batches this rank ran a forward pass for."),
                    &LABELS,
                )
                .expect("valid counter"),
            )
            .with_label_values(&values),
            ready: gauge(
                "ready",
                "1 while this rank is ready (on rank 0: the whole group is complete and warm).",
            ),
            queue_depth: gauge("queue_depth", "Batches waiting for rank 0's model thread."),
            labels,
            registry: r,
        }
    }

    /// Times a forward pass.
    pub fn observe_forward(&self, took: Duration) {
        self.forward.observe(took.as_secs_f64());
        self.batches.inc();
    }

    /// Renders the registry after reading the engine's state into the gauges.
    pub fn render(&self, stats: &EngineStats) -> String {
        self.ready.set(i64::from(stats.is_ready()));
        self.queue_depth.set(stats.queued.load(Ordering::Acquire) as i64);
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("encoding to a String cannot fail")
    }
}

/// A [`Collective`] that times every operation into the metrics and, inside a traced
/// step, opens a span for it. Idle heartbeats run outside any span and make none.
pub struct Observed<C> {
    inner: C,
    metrics: Arc<WorkerMetrics>,
}

impl<C: Collective> Observed<C> {
    pub fn new(inner: C, metrics: Arc<WorkerMetrics>) -> Self {
        Self { inner, metrics }
    }

    fn timed(
        &self,
        op: &'static str,
        f: impl FnOnce() -> Result<(), CollectiveError>,
    ) -> Result<(), CollectiveError> {
        let span = if Span::current().is_none() {
            Span::none()
        } else {
            tracing::info_span!("collective", op, rank = self.inner.shard().rank)
        };
        let _entered = span.enter();
        let started = Instant::now();
        let result = f();
        let [group, rank] = &self.metrics.labels;
        self.metrics
            .collective
            .with_label_values(&[group.as_str(), rank.as_str(), op])
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

impl<C: Collective> Collective for Observed<C> {
    fn shard(&self) -> Shard {
        self.inner.shard()
    }

    fn device(&self) -> tch::Device {
        self.inner.device()
    }

    fn all_reduce_sum(&self, tensor: &mut tch::Tensor) -> Result<(), CollectiveError> {
        self.timed("all_reduce", || self.inner.all_reduce_sum(tensor))
    }

    fn broadcast(&self, tensor: &mut tch::Tensor, root: usize) -> Result<(), CollectiveError> {
        self.timed("broadcast", || self.inner.broadcast(tensor, root))
    }
}

/// Serves `GET /metrics` on `listener` (for as long as the process runs, drain included).
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<WorkerMetrics>,
    stats: Arc<EngineStats>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
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
    );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_prometheus_text() {
        let m = WorkerMetrics::new("a", Shard { rank: 1, world: 2 });
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
    }
}
