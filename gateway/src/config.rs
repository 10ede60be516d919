//! Command line of `rankway-gateway`: every flag has an environment fallback.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::batcher::BatchConfig;

/// Rankway gateway: Open Inference Protocol v2 over REST and gRPC, and OpenAI-compatible
/// embeddings, batched over a pool of tensor-parallel worker groups.
#[derive(Debug, Clone, Parser)]
#[command(name = "rankway-gateway", version, about)]
pub struct Config {
    /// Address of the REST server (OIP v2, OpenAI, and /metrics and /admin/* unless
    /// --admin-listen is set).
    #[arg(long, env = "RANKWAY_HTTP_LISTEN", default_value = "0.0.0.0:8000")]
    pub http_listen: SocketAddr,
    /// Address of the gRPC server (inference.GRPCInferenceService, grpc.health.v1).
    #[arg(long, env = "RANKWAY_GRPC_LISTEN", default_value = "0.0.0.0:8001")]
    pub grpc_listen: SocketAddr,
    /// Address of a separate operator listener (plain HTTP): `/metrics` and `/admin/*`
    /// move there from the REST server and need no API key, so bind it where only
    /// operators and Prometheus reach it (loopback, or a pod IP behind a NetworkPolicy).
    /// Unset: they stay on the REST server, behind --api-key-file when that is set.
    #[arg(long, env = "RANKWAY_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// A worker group as NAME=HOST:PORT of its rank 0; repeat for more groups
    /// (comma-separated in the environment variable).
    #[arg(long = "group", env = "RANKWAY_GROUPS", value_delimiter = ',', value_parser = parse_group,
          required_unless_present = "leaders_dns")]
    pub groups: Vec<GroupAddr>,
    /// HOST:PORT of a DNS name whose A records are every group's rank 0 (in Kubernetes a
    /// headless Service selecting each group's rank-0 pod); re-resolved every --dns-interval.
    #[arg(long, env = "RANKWAY_LEADERS_DNS", value_parser = parse_host_port)]
    pub leaders_dns: Option<(String, u16)>,
    /// DNS server (IP:PORT) to ask for --leaders-dns (default: the system resolver).
    #[arg(long, env = "RANKWAY_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
    /// How often --leaders-dns is resolved again.
    #[arg(long, env = "RANKWAY_DNS_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub dns_interval: Duration,
    /// Most rows (texts or samples) in one batch; a larger single request goes alone.
    #[arg(long, env = "RANKWAY_MAX_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch_size: u32,
    /// Upper bound on how long the first request of a batch waits for more once a group
    /// can take it, in microseconds, kept to the microsecond (a timerfd: Tokio's timer
    /// rounds up to whole milliseconds). 0: a batch takes what is queued and goes at once
    /// (requests still accumulate while every group is busy).
    #[arg(long, env = "RANKWAY_MAX_QUEUE_DELAY_US", default_value_t = 0)]
    pub max_queue_delay_us: u64,
    /// Requests that may wait per model; more are refused at once (429 / RESOURCE_EXHAUSTED).
    #[arg(long, env = "RANKWAY_QUEUE_CAPACITY", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub queue_capacity: u32,
    /// Generations per model admitted but not yet streaming (a generative group's rank 0
    /// queues them); more are refused at once (429 / RESOURCE_EXHAUSTED).
    #[arg(long, env = "RANKWAY_MAX_WAITING_GENERATIONS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waiting_generations: u32,
    /// Batches in flight per group at most. A group takes two (one running, one staged);
    /// more only while its batches compute in less time than their way to rank 0 and back
    /// takes, so it is not idle while answers travel (docs/gateway/batching.md).
    #[arg(long, env = "RANKWAY_MAX_IN_FLIGHT", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Consecutive failed dispatches after which a group's circuit breaker opens.
    #[arg(long, env = "RANKWAY_BREAKER_FAILURES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub breaker_failures: u32,
    /// How long an open breaker keeps a group out before one probe batch.
    #[arg(long, env = "RANKWAY_BREAKER_COOLDOWN", value_parser = humantime::parse_duration, default_value = "5s")]
    pub breaker_cooldown: Duration,
    /// Other groups a batch may be retried on when a group refused it before running it.
    #[arg(long, env = "RANKWAY_RETRY_BUDGET", default_value_t = 2)]
    pub retry_budget: u32,
    /// Seed of the load balancer's random choices (default: from the OS); for tests.
    #[arg(long, env = "RANKWAY_P2C_SEED")]
    pub p2c_seed: Option<u64>,
    /// Largest request body (REST) or message (gRPC), in bytes (413 / RESOURCE_EXHAUSTED).
    #[arg(long, env = "RANKWAY_MAX_REQUEST_BYTES", default_value_t = 8 << 20)]
    pub max_request_bytes: usize,
    /// Longest text of an embedding request, in bytes (413 / RESOURCE_EXHAUSTED), checked
    /// before it is queued. MiniLM reads a text's first 256 tokens (about 1 KiB of
    /// English): the default leaves room for any such text and bounds what a rank
    /// tokenizes. Rank 0 has the same limit (`rankway-worker serve --max-text-bytes`).
    #[arg(long, env = "RANKWAY_MAX_TEXT_BYTES", default_value_t = rankway_proto::limits::DEFAULT_MAX_TEXT_BYTES)]
    pub max_text_bytes: usize,
    /// How long a REST client may take to send a request's body once its head has come;
    /// a slower one gets 408. (The request's deadline starts once the body is read.)
    #[arg(long, env = "RANKWAY_BODY_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub body_timeout: Duration,
    /// Deadline of a request that does not set one.
    #[arg(long, env = "RANKWAY_REQUEST_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub request_timeout: Duration,
    /// How often each group's rank 0 is asked for its GroupStatus.
    #[arg(long, env = "RANKWAY_HEALTH_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub health_interval: Duration,
    /// Timeout of one GroupStatus call (and of connecting to a group).
    #[arg(long, env = "RANKWAY_HEALTH_TIMEOUT", value_parser = humantime::parse_duration, default_value = "1s")]
    pub health_timeout: Duration,
    /// Threads of the async runtime that serves every request (default: half the cores
    /// this process may use, its CPU limit included, at least one). A request's work is
    /// mostly socket reads and writes, whose TCP processing the kernel does on the same
    /// cores; the fewer threads a request's tasks are spread over, the fewer cross-thread
    /// wake-ups it costs. One thread runs Tokio's current-thread scheduler
    /// (docs/gateway/batching.md).
    #[arg(long, env = "RANKWAY_IO_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub io_threads: Option<u16>,
    /// File of API keys, one per line: every request but the health probes must then
    /// carry one as `Authorization: Bearer KEY` (REST) or `authorization` metadata
    /// (gRPC). Read again when it changes (see --api-key-reload-interval).
    #[arg(long, env = "RANKWAY_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// File whose first line is the token sent to every group's rank 0 as
    /// `authorization: Bearer TOKEN` (the ranks' `--token-file`); read again when it
    /// changes, like --api-key-file.
    #[arg(long, env = "RANKWAY_WORKER_TOKEN_FILE")]
    pub worker_token_file: Option<std::path::PathBuf>,
    /// PEM bundle of the CAs that sign the ranks' certificates: with it, the gateway
    /// reaches every rank 0 over TLS (the ranks' --tls-cert) and verifies it.
    #[arg(long, env = "RANKWAY_WORKER_TLS_CA")]
    pub worker_tls_ca: Option<std::path::PathBuf>,
    /// Client certificate chain (PEM) the gateway presents to the ranks, for mutual TLS
    /// (the ranks' --tls-client-ca); with --worker-tls-key.
    #[arg(long, env = "RANKWAY_WORKER_TLS_CERT", requires_all = ["worker_tls_key", "worker_tls_ca"])]
    pub worker_tls_cert: Option<std::path::PathBuf>,
    /// Key of --worker-tls-cert (PEM).
    #[arg(long, env = "RANKWAY_WORKER_TLS_KEY", requires = "worker_tls_cert")]
    pub worker_tls_key: Option<std::path::PathBuf>,
    /// Name the ranks' certificates are checked against (default: the host of each
    /// group's address).
    #[arg(long, env = "RANKWAY_WORKER_TLS_SERVER_NAME", requires = "worker_tls_ca")]
    pub worker_tls_server_name: Option<String>,
    /// How often the API key file and the worker token file are checked for changes.
    #[arg(long, env = "RANKWAY_API_KEY_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub api_key_reload_interval: Duration,
    /// How long a graceful shutdown waits for accepted requests to finish.
    #[arg(long, env = "RANKWAY_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub connections: rankway_runtime::listen::ConnectionArgs,
    #[command(flatten)]
    pub tls: rankway_runtime::tls::TlsArgs,
    #[command(flatten)]
    pub telemetry: rankway_runtime::telemetry::TelemetryArgs,
}

fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Ok((
            host.to_owned(),
            port.parse().map_err(|_| format!("bad port in {s:?}"))?,
        )),
        _ => Err(format!("expected HOST:PORT, got {s:?}")),
    }
}

/// `NAME=HOST:PORT` of one group's rank 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupAddr {
    pub name: String,
    pub address: String,
}

fn parse_group(s: &str) -> Result<GroupAddr, String> {
    let (name, address) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=HOST:PORT, got {s:?}"))?;
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !valid_name {
        return Err(format!("group name {name:?} must be non-empty [A-Za-z0-9._-]"));
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(format!("group {name}: expected HOST:PORT, got {address:?}")),
    }
    Ok(GroupAddr {
        name: name.to_owned(),
        address: address.to_owned(),
    })
}

impl Config {
    pub fn batch(&self) -> BatchConfig {
        BatchConfig {
            max_batch_size: self.max_batch_size as usize,
            max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
            queue_capacity: self.queue_capacity as usize,
            retry_budget: self.retry_budget as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_groups_and_defaults() {
        let c = Config::try_parse_from([
            "rankway-gateway",
            "--group",
            "a=127.0.0.1:9000",
            "--group",
            "b=worker-b-0.workers:9000",
        ])
        .unwrap();
        assert_eq!(c.groups.len(), 2);
        assert_eq!(c.groups[1].address, "worker-b-0.workers:9000");
        assert_eq!(c.http_listen.port(), 8000);
        assert_eq!(c.grpc_listen.port(), 8001);
        assert_eq!(c.admin_listen, None);
        assert_eq!(c.max_batch_size, 32);
        assert_eq!(c.batch().max_queue_delay, Duration::ZERO);
    }

    #[test]
    fn rejects_bad_groups() {
        for bad in ["a", "=h:1", "a=h", "a=h:port", "a b=h:1"] {
            assert!(
                Config::try_parse_from(["rankway-gateway", "--group", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(
            Config::try_parse_from(["rankway-gateway"]).is_err(),
            "a group is required"
        );
    }
}
