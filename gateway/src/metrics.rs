//! Prometheus metrics of the gateway, served at `GET /metrics` in the Prometheus text
//! format (version 0.0.4, what `promtool check metrics` lints). Every name starts with
//! `rankway_`; units are in the names; counters end in `_total`. docs/observability.md
//! lists them all.

use std::time::Duration;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
    exponential_buckets,
};

use crate::pool::GroupView;
use crate::pool::breaker::BreakerState;

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// 100 µs .. ~52 s.
fn seconds_buckets() -> Vec<f64> {
    exponential_buckets(1e-4, 2.0, 20).expect("valid buckets")
}

/// 10 µs .. ~10 s in steps of 25 %: fine enough to read a sub-millisecond p99.
fn fine_seconds_buckets() -> Vec<f64> {
    exponential_buckets(1e-5, 1.25, 63).expect("valid buckets")
}

/// 1 .. 1024 rows.
fn rows_buckets() -> Vec<f64> {
    exponential_buckets(1.0, 2.0, 11).expect("valid buckets")
}

/// Registers `metric` in `registry` and returns it (names are fixed, so this cannot clash).
fn registered<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"),
    )
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    registered(
        registry,
        HistogramVec::new(opts, labels).expect("valid histogram"),
    )
}

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    added: HistogramVec,
    worker_call: HistogramVec,
    queue_duration: HistogramVec,
    batch_fill_delay: HistogramVec,
    batch_rows: HistogramVec,
    batches: IntCounterVec,
    queue_depth: IntGaugeVec,
    rejections: IntCounterVec,
    group_ready: IntGaugeVec,
    group_ranks_ready: IntGaugeVec,
    group_world_size: IntGaugeVec,
    group_in_flight: IntGaugeVec,
    group_breaker: IntGaugeVec,
    time_to_first_token: HistogramVec,
    inter_token: HistogramVec,
    generated_tokens: IntCounterVec,
    open_streams: IntGaugeVec,
    group_sequences: IntGaugeVec,
    group_kv_free: IntGaugeVec,
    group_kv_total: IntGaugeVec,
    connections: rankway_runtime::listen::ConnectionMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new_custom(Some("rankway".into()), None).expect("valid prefix");
        Self {
            connections: rankway_runtime::listen::ConnectionMetrics::new(&r, &[]),
            requests: counter(
                &r,
                "requests_total",
                "Requests answered, by route and status code (HTTP status or gRPC code).",
                &["route", "code"],
            ),
            request_duration: histogram(
                &r,
                "request_duration_seconds",
                "Time from request to response, by route and status code.",
                &["route", "code"],
                seconds_buckets(),
            ),
            added: histogram(
                &r,
                "gateway_added_seconds",
                "The gateway's own time per inference: from request to response minus the call to rank 0 that ran its batch, by protocol (rest, grpc).",
                &["protocol"],
                fine_seconds_buckets(),
            ),
            worker_call: histogram(
                &r,
                "worker_call_seconds",
                "Time of one batch's call to a group's rank 0 (network and the group's work), by group.",
                &["group"],
                fine_seconds_buckets(),
            ),
            queue_duration: histogram(
                &r,
                "queue_duration_seconds",
                "Time a request waited in the gateway before its batch was dispatched.",
                &["model"],
                seconds_buckets(),
            ),
            batch_fill_delay: histogram(
                &r,
                "batch_fill_delay_seconds",
                "Time a batch stayed open for more requests once a group could take it.",
                &["model"],
                seconds_buckets(),
            ),
            batch_rows: histogram(
                &r,
                "batch_rows",
                "Rows (texts or samples) per dispatched batch.",
                &["model"],
                rows_buckets(),
            ),
            batches: counter(
                &r,
                "batches_total",
                "Batches dispatched, by model and group (a retried batch counts once per group).",
                &["model", "group"],
            ),
            queue_depth: gauge(
                &r,
                "queue_depth",
                "Requests waiting in the gateway, by model.",
                &["model"],
            ),
            rejections: counter(
                &r,
                "rejections_total",
                "Requests refused or failed, and batches retried, by model and reason.",
                &["model", "reason"],
            ),
            group_ready: gauge(
                &r,
                "group_ready",
                "1 if the group is complete, warm and routable, else 0.",
                &["group"],
            ),
            group_ranks_ready: gauge(
                &r,
                "group_ranks_ready",
                "Ranks of the group that report ready.",
                &["group"],
            ),
            group_world_size: gauge(&r, "group_world_size", "Ranks the group is made of.", &["group"]),
            group_in_flight: gauge(
                &r,
                "group_in_flight_batches",
                "Batches sent to the group and not yet answered.",
                &["group"],
            ),
            group_breaker: gauge(
                &r,
                "group_breaker_state",
                "Circuit breaker of the group: 1 for the state it is in (closed, open, half_open).",
                &["group", "state"],
            ),
            time_to_first_token: histogram(
                &r,
                "time_to_first_token_seconds",
                "Time from a generation's request to its first token, by model.",
                &["model"],
                fine_seconds_buckets(),
            ),
            inter_token: histogram(
                &r,
                "inter_token_seconds",
                "Time between consecutive tokens of a generation, by model.",
                &["model"],
                fine_seconds_buckets(),
            ),
            generated_tokens: counter(
                &r,
                "generated_tokens_total",
                "Tokens generated, by model.",
                &["model"],
            ),
            open_streams: gauge(
                &r,
                "generations_open",
                "Generations under way through this gateway, by model.",
                &["model"],
            ),
            group_sequences: gauge(
                &r,
                "group_sequences",
                "Sequences a generative group's rank 0 reported, by group and state (running, waiting).",
                &["group", "state"],
            ),
            group_kv_free: gauge(
                &r,
                "group_kv_cache_free_tokens",
                "KV cache tokens free on a generative group, as its rank 0 reported.",
                &["group"],
            ),
            group_kv_total: gauge(
                &r,
                "group_kv_cache_tokens",
                "KV cache size of a generative group, in tokens.",
                &["group"],
            ),
            registry: r,
        }
    }

    /// The first token of a generation of `model`, `after` its request arrived.
    pub fn observe_first_token(&self, model: &str, after: Duration) {
        self.time_to_first_token
            .with_label_values(&[model])
            .observe(after.as_secs_f64());
    }

    /// A token of a generation, `gap` after the previous one (`None` for the first).
    pub fn observe_token(&self, model: &str, gap: Option<Duration>) {
        self.generated_tokens.with_label_values(&[model]).inc();
        if let Some(gap) = gap {
            self.inter_token
                .with_label_values(&[model])
                .observe(gap.as_secs_f64());
        }
    }

    /// Generations of `model` under way (the gauge is moved by its holder).
    pub fn open_streams(&self, model: &str) -> IntGauge {
        self.open_streams.with_label_values(&[model])
    }

    pub fn observe_request(&self, route: &str, code: &str, elapsed: Duration) {
        self.requests.with_label_values(&[route, code]).inc();
        self.request_duration
            .with_label_values(&[route, code])
            .observe(elapsed.as_secs_f64());
    }

    /// One inference's own time in the gateway (`protocol`: rest or grpc).
    pub fn observe_added(&self, protocol: &str, added: Duration) {
        self.added
            .with_label_values(&[protocol])
            .observe(added.as_secs_f64());
    }

    pub fn observe_worker_call(&self, group: &str, took: Duration) {
        self.worker_call
            .with_label_values(&[group])
            .observe(took.as_secs_f64());
    }

    pub fn observe_queue_time(&self, model: &str, waited: Duration) {
        self.queue_duration
            .with_label_values(&[model])
            .observe(waited.as_secs_f64());
    }

    pub fn observe_fill_delay(&self, model: &str, open: Duration) {
        self.batch_fill_delay
            .with_label_values(&[model])
            .observe(open.as_secs_f64());
    }

    pub fn observe_batch(&self, model: &str, group: &str, rows: usize) {
        self.batch_rows.with_label_values(&[model]).observe(rows as f64);
        self.batches.with_label_values(&[model, group]).inc();
    }

    pub fn queue_depth(&self, model: &str) -> IntGauge {
        self.queue_depth.with_label_values(&[model])
    }

    pub fn rejection(&self, model: &str, reason: &str) {
        self.rejections.with_label_values(&[model, reason]).inc();
    }

    /// Rejections of `model` counted with `reason`.
    #[cfg(test)]
    pub fn rejections(&self, model: &str, reason: &str) -> u64 {
        self.rejections.with_label_values(&[model, reason]).get()
    }

    /// Connection counts of the REST and gRPC listeners.
    pub fn connections(&self) -> &rankway_runtime::listen::ConnectionMetrics {
        &self.connections
    }

    /// Renders the registry, after refreshing the per-group gauges from `groups` (groups
    /// that left the pool leave the output too).
    pub fn render(&self, groups: &[GroupView]) -> String {
        for family in [
            &self.group_ready,
            &self.group_ranks_ready,
            &self.group_world_size,
            &self.group_in_flight,
            &self.group_breaker,
            &self.group_sequences,
            &self.group_kv_free,
            &self.group_kv_total,
        ] {
            family.reset();
        }
        for g in groups {
            let l = [g.name.as_str()];
            self.group_ready.with_label_values(&l).set(i64::from(g.ready));
            self.group_ranks_ready
                .with_label_values(&l)
                .set(i64::from(g.ranks_ready));
            self.group_world_size
                .with_label_values(&l)
                .set(i64::from(g.world_size));
            self.group_in_flight.with_label_values(&l).set(g.in_flight as i64);
            if let Some(load) = g.load {
                let name = g.name.as_str();
                self.group_sequences
                    .with_label_values(&[name, "running"])
                    .set(i64::from(load.running_sequences));
                self.group_sequences
                    .with_label_values(&[name, "waiting"])
                    .set(i64::from(load.waiting_sequences));
                self.group_kv_free
                    .with_label_values(&l)
                    .set(load.free_kv_tokens as i64);
                self.group_kv_total
                    .with_label_values(&l)
                    .set(load.total_kv_tokens as i64);
            }
            let current = g.breaker.unwrap_or(BreakerState::Closed);
            for (state, name) in [
                (BreakerState::Closed, "closed"),
                (BreakerState::Open, "open"),
                (BreakerState::HalfOpen, "half_open"),
            ] {
                self.group_breaker
                    .with_label_values(&[g.name.as_str(), name])
                    .set(i64::from(current == state));
            }
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .expect("encoding to a String cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_units_and_totals() {
        let m = Metrics::new();
        m.observe_request("/v1/embeddings", "200", Duration::from_millis(3));
        m.rejection("minilm", "queue_full");
        m.observe_fill_delay("minilm", Duration::from_micros(500));
        let text = m.render(&[]);
        assert!(text.contains("# TYPE rankway_requests_total counter"), "{text}");
        assert!(
            text.contains("rankway_requests_total{code=\"200\",route=\"/v1/embeddings\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE rankway_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("rankway_rejections_total{model=\"minilm\",reason=\"queue_full\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rankway_batch_fill_delay_seconds_count{model=\"minilm\"} 1"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "classic text format, not OpenMetrics");
    }
}
