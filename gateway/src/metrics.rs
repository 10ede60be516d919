//! Prometheus metrics of the gateway, served at `GET /metrics` (OpenMetrics text).
//! Every name starts with `rankway_`; units are in the names; counters end in `_total`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::pool::GroupView;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchLabels {
    pub model: String,
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub model: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~52 s
    Histogram::new(exponential_buckets(1e-4, 2.0, 20))
}

fn rows_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    queue_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    batch_rows: Family<ModelLabels, Histogram, fn() -> Histogram>,
    batches: Family<BatchLabels, Counter>,
    queue_depth: Family<ModelLabels, Gauge>,
    rejections: Family<RejectLabels, Counter>,
    group_ready: Family<GroupLabels, Gauge>,
    group_ranks_ready: Family<GroupLabels, Gauge>,
    group_world_size: Family<GroupLabels, Gauge>,
    group_in_flight: Family<GroupLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rankway");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and status code",
            requests.clone(),
        );
        let request_duration: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time from request to response, by route and status code",
            Unit::Seconds,
            request_duration.clone(),
        );
        let queue_duration: Family<ModelLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "queue_duration",
            "Time a request waited in the gateway before its batch was dispatched",
            Unit::Seconds,
            queue_duration.clone(),
        );
        let batch_rows: Family<ModelLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(rows_histogram);
        registry.register(
            "batch_rows",
            "Rows (texts or samples) per dispatched batch",
            batch_rows.clone(),
        );
        let batches = Family::<BatchLabels, Counter>::default();
        registry.register(
            "batches",
            "Batches dispatched, by model and group",
            batches.clone(),
        );
        let queue_depth = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Requests waiting in the gateway, by model",
            queue_depth.clone(),
        );
        let rejections = Family::<RejectLabels, Counter>::default();
        registry.register(
            "rejections",
            "Requests refused or failed, by model and reason",
            rejections.clone(),
        );
        let group_ready = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "group_ready",
            "1 if the group is complete, warm and routable",
            group_ready.clone(),
        );
        let group_ranks_ready = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "group_ranks_ready",
            "Ranks of the group that report ready",
            group_ranks_ready.clone(),
        );
        let group_world_size = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "group_world_size",
            "Ranks the group is made of",
            group_world_size.clone(),
        );
        let group_in_flight = Family::<GroupLabels, Gauge>::default();
        registry.register(
            "group_in_flight_batches",
            "Batches sent to the group and not yet answered",
            group_in_flight.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            queue_duration,
            batch_rows,
            batches,
            queue_depth,
            rejections,
            group_ready,
            group_ranks_ready,
            group_world_size,
            group_in_flight,
        }
    }

    pub fn observe_request(&self, route: &str, code: &str, elapsed: Duration) {
        let labels = RouteLabels {
            route: route.to_owned(),
            code: code.to_owned(),
        };
        self.requests.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_queue_time(&self, model: &str, waited: Duration) {
        self.queue_duration
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
            })
            .observe(waited.as_secs_f64());
    }

    pub fn observe_batch(&self, model: &str, group: &str, rows: usize) {
        self.batch_rows
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
            })
            .observe(rows as f64);
        self.batches
            .get_or_create(&BatchLabels {
                model: model.to_owned(),
                group: group.to_owned(),
            })
            .inc();
    }

    pub fn queue_depth(&self, model: &str) -> Gauge {
        self.queue_depth
            .get_or_create(&ModelLabels {
                model: model.to_owned(),
            })
            .clone()
    }

    pub fn rejection(&self, model: &str, reason: &str) {
        self.rejections
            .get_or_create(&RejectLabels {
                model: model.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Renders the registry, after refreshing the per-group gauges from `groups`.
    pub fn render(&self, groups: &[GroupView]) -> String {
        for g in groups {
            let l = GroupLabels {
                group: g.name.clone(),
            };
            self.group_ready.get_or_create(&l).set(i64::from(g.ready));
            self.group_ranks_ready
                .get_or_create(&l)
                .set(i64::from(g.ranks_ready));
            self.group_world_size
                .get_or_create(&l)
                .set(i64::from(g.world_size));
            self.group_in_flight.get_or_create(&l).set(g.in_flight as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
