//! Where the groups are: a static list (`--group`), and/or a DNS name whose A records are
//! every group's rank 0 (`--leaders-dns HOST:PORT`; in Kubernetes, a headless Service
//! selecting each group's rank-0 pod). The name is re-resolved every `--dns-interval`;
//! groups appear and leave live (a group that leaves finishes its in-flight batches).
//!
//! Lookups go through hickory-resolver, a maintained DNS stub resolver: over UDP with
//! the TCP fallback for truncated answers (a headless Service of many groups), from
//! `/etc/resolv.conf` and `/etc/hosts`, or from `--dns-server IP:PORT` alone (tests
//! point it at a server on loopback). Its cache is off: the name is asked afresh every
//! interval. This module only finds addresses; routing stays in the pool.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use crate::pool::Pool;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
    #[error("resolving {host}: {message}")]
    Lookup { host: String, message: String },
}

/// A DNS name of leaders, and the resolver that answers for it.
pub struct LeadersDns {
    host: String,
    port: u16,
    resolver: TokioResolver,
}

impl LeadersDns {
    /// `host:port` resolved by the system's configuration, or by `server` alone.
    pub fn new(
        host: String,
        port: u16,
        server: Option<SocketAddr>,
        timeout: Duration,
    ) -> Result<Self, DiscoveryError> {
        let setup = |e: &dyn std::fmt::Display| DiscoveryError::Setup(e.to_string());
        let mut builder = match server {
            Some(server) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                let ns = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => TokioResolver::builder_tokio().map_err(|e| setup(&e))?,
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = timeout;
        // Every lookup asks the server: a group that left must leave the pool at once.
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        let resolver = builder.build().map_err(|e| setup(&e))?;
        Ok(Self { host, port, resolver })
    }

    /// The leaders' addresses, sorted, as `IP:PORT`. A name with no addresses (a headless
    /// Service without ready endpoints) is an empty list, not an error.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, DiscoveryError> {
        let mut ips: Vec<_> = match self.resolver.lookup_ip(self.host.as_str()).await {
            Ok(found) => found.iter().collect(),
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => {
                return Err(DiscoveryError::Lookup {
                    host: self.host.clone(),
                    message: e.to_string(),
                });
            }
        };
        ips.sort();
        ips.dedup();
        Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, self.port)).collect())
    }

    /// Re-resolves every `interval` and hands the result to the pool, until `stop`.
    pub async fn run(self, pool: Pool, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.resolve().await {
                Ok(addrs) => pool.sync_discovered(&addrs),
                // Keep the groups we know: a DNS hiccup is not a reason to drop them.
                Err(e) => tracing::warn!(error = %e, "leader discovery failed"),
            }
        }
    }
}
