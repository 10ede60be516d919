//! The connection metrics every listener reports.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// Connection counts of every listener, by its name (a fixed set: `rest`, `grpc`,
/// `metrics`), registered once per process in its registry (whose prefix names them:
/// `rankway_connections_open`, `rankway_worker_connections_open`, ...), with the
/// registry's constant labels (a rank's `group` and `rank`).
#[derive(Clone)]
pub struct ConnectionMetrics {
    pub(super) open: IntGaugeVec,
    pub(super) refused: IntCounterVec,
    pub(super) timed_out: IntCounterVec,
}

impl ConnectionMetrics {
    pub fn new(registry: &Registry, const_labels: &[(&str, &str)]) -> Self {
        let opts = |name: &str, help: &str| {
            let labels = const_labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Opts::new(name, help).const_labels(labels)
        };
        let open = IntGaugeVec::new(
            opts("connections_open", "Connections open, per listener."),
            &["listener"],
        )
        .expect("valid gauge");
        let refused = IntCounterVec::new(
            opts(
                "connections_refused_total",
                "Connections closed on accept because the listener had --max-connections open.",
            ),
            &["listener"],
        )
        .expect("valid counter");
        let timed_out = IntCounterVec::new(
            opts(
                "connections_timed_out_total",
                "Connections closed for sending nothing within --header-timeout (first bytes), a request head slower than it, or --idle-timeout.",
            ),
            &["listener"],
        )
        .expect("valid counter");
        for m in [
            Box::new(open.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(refused.clone()),
            Box::new(timed_out.clone()),
        ] {
            registry.register(m).expect("metric names are unique");
        }
        Self {
            open,
            refused,
            timed_out,
        }
    }
}
