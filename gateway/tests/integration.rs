//! The integration tests, linked into one test binary (`cargo test --test integration`):
//! one link of the harness and its dependencies instead of one per file, which keeps the
//! build's time and disk down. Each module starts the real binaries on loopback.

mod common;

mod bad_input;
mod batching;
mod deadlines_and_drain;
mod deploy_manifests;
mod dns_discovery;
mod embeddings;
mod generation;
mod generation_gateway;
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
