//! Where the groups are: a static list (`--group`), and/or a DNS name whose A records are
//! every group's rank 0 (`--leaders-dns HOST:PORT`; in Kubernetes, a headless Service
//! selecting each group's rank-0 pod). The name is re-resolved every `--dns-interval`;
//! groups appear and leave live (a group that leaves finishes its in-flight batches).
//!
//! With `--dns-server IP:PORT` the A query goes straight to that server over UDP (tests
//! point it at a server on loopback); without it the system resolver answers.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::net::UdpSocket;

use crate::pool::Pool;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("bad DNS name {0:?}: {1}")]
    Name(String, String),
    #[error("DNS query to {server} failed: {message}")]
    Query { server: SocketAddr, message: String },
    #[error("resolving {host}: {source}")]
    System { host: String, source: std::io::Error },
}

/// A DNS name of leaders, and how to resolve it.
#[derive(Debug, Clone)]
pub struct LeadersDns {
    pub host: String,
    pub port: u16,
    pub server: Option<SocketAddr>,
    pub timeout: Duration,
}

impl LeadersDns {
    /// The leaders' addresses, sorted, as `IP:PORT`.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, DiscoveryError> {
        let mut ips = match self.server {
            Some(server) => query_a(&self.host, server, self.timeout).await?,
            None => tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(|source| DiscoveryError::System {
                    host: self.host.clone(),
                    source,
                })?
                .map(|a| a.ip())
                .collect(),
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
                Err(e) => tracing::warn!(error = %e, host = %self.host, "leader discovery failed"),
            }
        }
    }
}

/// One A query over UDP.
async fn query_a(host: &str, server: SocketAddr, timeout: Duration) -> Result<Vec<IpAddr>, DiscoveryError> {
    let fail = |m: String| DiscoveryError::Query { server, message: m };
    let name = Name::from_ascii(host).map_err(|e| DiscoveryError::Name(host.to_owned(), e.to_string()))?;
    let mut msg = Message::query();
    msg.metadata.id = rand::random();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name, RecordType::A));
    let bytes = msg.to_vec().map_err(|e| fail(e.to_string()))?;
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .expect("literal");
    let sock = UdpSocket::bind(bind).await.map_err(|e| fail(e.to_string()))?;
    sock.send_to(&bytes, server)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(timeout, sock.recv(&mut buf))
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    let resp = Message::from_vec(&buf[..n]).map_err(|e| fail(e.to_string()))?;
    if resp.metadata.id != msg.metadata.id {
        return Err(fail("answer to another query".into()));
    }
    Ok(resp
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect())
}
