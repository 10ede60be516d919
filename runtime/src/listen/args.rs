//! The connection limits every listener is given, as both binaries' command lines take them.

use std::time::Duration;

/// Connection limits of every listener, flattened into each binary's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Open connections per listener at most; a connection over the cap is closed at
    /// once (counted in the connections_refused_total metric).
    #[arg(long, env = "RANKWAY_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// How long a new connection may take to send its first bytes, and an HTTP/1.1
    /// client to send a request's head once its first byte has come.
    #[arg(long, env = "RANKWAY_HEADER_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub header_timeout: Duration,
    /// How long an HTTP/1.1 keep-alive connection waits for its next request before it
    /// is closed.
    #[arg(long, env = "RANKWAY_KEEP_ALIVE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "75s")]
    pub keep_alive_timeout: Duration,
    /// A connection that moves no bytes either way for this long while the server
    /// waits to read from it is closed.
    #[arg(long, env = "RANKWAY_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5m")]
    pub idle_timeout: Duration,
    /// HTTP/2 streams a client may have open at once on one connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "RANKWAY_HTTP2_MAX_STREAMS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub http2_max_streams: u32,
    /// How often an HTTP/2 connection is pinged.
    #[arg(long, env = "RANKWAY_HTTP2_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub http2_keepalive_interval: Duration,
    /// How long a ping may go unanswered before its connection is closed.
    #[arg(long, env = "RANKWAY_HTTP2_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "20s")]
    pub http2_keepalive_timeout: Duration,
}

impl ConnectionArgs {
    /// A tonic server with this listener's HTTP/2 limits.
    pub fn grpc_server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(self.http2_max_streams)
            .http2_keepalive_interval(Some(self.http2_keepalive_interval))
            .http2_keepalive_timeout(Some(self.http2_keepalive_timeout))
    }
}
