//! The system tests, linked into one test binary (`cargo test -p rankway-system-tests`):
//! one link of the harness and its dependencies instead of one per file, which keeps the
//! build's time and disk down. Each module starts the real binaries on loopback, or
//! checks the deploy manifests against them.

mod access;
mod bad_input;
mod batching;
mod deadlines_and_drain;
mod deploy_manifests;
mod deploy_run;
mod dns_discovery;
mod embeddings;
mod generation_gateway;
mod generation_lifecycle;
mod group_life;
mod hostile_input;
mod latency;
mod observability;
mod pool_failover;
mod request_ids;
mod served_version;
mod slow_clients;
mod tls;
mod tp_equivalence;
