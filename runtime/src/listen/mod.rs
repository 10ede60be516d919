//! How every listener of both binaries accepts connections (gateway REST and gRPC, worker
//! gRPC, worker metrics), so a slow, silent or numerous client costs a bounded amount:
//!
//! - at most `--max-connections` open connections per listener; one more is closed at
//!   once and counted, rather than left waiting in the kernel's backlog;
//! - a new connection must send its first bytes within `--header-timeout`, and HTTP/1.1
//!   must finish each request head within it of the head's first byte;
//! - an HTTP/1.1 keep-alive connection waits `--keep-alive-timeout` for its next request
//!   (longer than the header timeout, and than the idle timeout of load balancers such as
//!   AWS ALB's 60 s, so that the gateway is not the side that closes a pooled connection
//!   just as the balancer reuses it);
//! - a connection that moves no bytes either way for `--idle-timeout` while the server
//!   waits to read from it is closed (a response being computed is not idle: the timer
//!   is only looked at while a read is pending);
//! - HTTP/2 advertises `--http2-max-streams` concurrent streams and pings every
//!   `--http2-keepalive-interval`, dropping a peer that does not answer within
//!   `--http2-keepalive-timeout`.
//!
//! With TLS (the gateway's `--tls-cert`), the handshake runs on its own task within
//! `--header-timeout`, over the guarded socket, so its bytes count as the first bytes.
//!
//! Every accepted socket gets TCP_NODELAY: a small answer must not wait for the delayed
//! ACK of the one before it (Nagle's algorithm meeting delayed ACKs costs up to 40 ms).

mod args;
mod conn;
mod guarded;
mod head_timer;
mod metrics;

pub use args::ConnectionArgs;
pub use conn::Conn;
pub use guarded::Guarded;
pub use metrics::ConnectionMetrics;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::coalesce::Coalesce;
use head_timer::HeadTimer;

/// A bound listener with its limits: its sockets are [`Guarded`], served as [`Conn`]s.
pub struct Listener {
    tcp: TcpListener,
    name: &'static str,
    limits: ConnectionArgs,
    slots: Arc<Semaphore>,
    /// This listener's series, looked up once rather than on every connection.
    open: prometheus::IntGauge,
    refused: prometheus::IntCounter,
    timed_out: prometheus::IntCounter,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Listener {
    pub fn new(
        tcp: TcpListener,
        name: &'static str,
        limits: &ConnectionArgs,
        metrics: &ConnectionMetrics,
    ) -> Self {
        Self {
            tcp,
            name,
            limits: limits.clone(),
            slots: Arc::new(Semaphore::new(limits.max_connections as usize)),
            open: metrics.open.with_label_values(&[name]),
            refused: metrics.refused.with_label_values(&[name]),
            timed_out: metrics.timed_out.with_label_values(&[name]),
            tls: None,
        }
    }

    /// Serves TLS only, with `config`.
    pub fn with_tls(mut self, config: Option<Arc<rustls::ServerConfig>>) -> Self {
        self.tls = config.map(tokio_rustls::TlsAcceptor::from);
        self
    }

    /// The next connection, its TLS handshake (if any) left to [`Pending::establish`].
    async fn next(&self) -> Pending {
        Pending {
            socket: self.accept().await,
            tls: self.tls.clone(),
            within: self.limits.header_timeout,
        }
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp.local_addr()
    }

    /// The next connection within the cap. Connections over the cap are closed and
    /// counted; accept errors (out of file descriptors) are logged and retried after a
    /// pause, so neither ends the server.
    async fn accept(&self) -> Guarded {
        loop {
            let tcp = match self.tcp.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(listener = self.name, error = %e, "accept failed; pausing");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                self.refused.inc();
                tracing::debug!(
                    listener = self.name,
                    max_connections = self.limits.max_connections,
                    "connection refused: at the cap"
                );
                continue;
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            return Guarded::new(tcp, permit, self);
        }
    }

    /// The established connections as the stream tonic serves. Handshakes run on their
    /// own tasks, so a slow one holds up no other; the listener closes once tonic drops
    /// the stream.
    pub fn into_incoming(self) -> impl futures_core::Stream<Item = io::Result<Conn>> + Send + 'static {
        let (tx, rx) = tokio::sync::mpsc::channel::<Conn>(64);
        tokio::spawn(async move {
            loop {
                let pending = tokio::select! {
                    p = self.next() => p,
                    () = tx.closed() => return,
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(conn) = pending.establish().await {
                        let _ = tx.send(conn).await;
                    }
                });
            }
        });
        futures_util::stream::unfold(rx, |mut rx| async move {
            let conn = rx.recv().await?;
            Some((Ok(conn), rx))
        })
    }

    /// [`Self::into_incoming`] with each connection's writes coalesced (a reply's
    /// HEADERS, DATA and trailers in one write; see [`Coalesce`]).
    pub fn into_coalesced_incoming(
        self,
    ) -> impl futures_core::Stream<Item = io::Result<Coalesce<Conn>>> + Send + 'static {
        futures_util::StreamExt::map(self.into_incoming(), |conn| conn.map(Coalesce::new))
    }

    /// Serves HTTP/1.1 and HTTP/2 with `router` until `shutdown` resolves, then waits for
    /// the open connections to finish their requests (the caller bounds that wait).
    ///
    /// Shutting down, the listener closes at once; then for up to [`CLOSE_NOTICE`] (or
    /// until every connection has gone) the open ones are still served, each HTTP/1.1
    /// answer saying `Connection: close`, before idle connections are closed. Closing an
    /// idle keep-alive connection at once races a client that is just then sending its
    /// next request on it: the request meets a reset, and the client cannot tell whether
    /// it ran. A client that is sending gets an answer (and the notice) instead.
    pub async fn serve_http(self, router: axum::Router, shutdown: impl Future<Output = ()>) {
        use tower::ServiceExt;
        let closing = Arc::new(AtomicBool::new(false));
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's header timer runs from when it starts waiting for a head, idle time
        // included: given the keep-alive timeout, with each connection's own HeadTimer
        // (below) cutting it to the header timeout once a head's first byte has come.
        builder
            .http1()
            .header_read_timeout(self.limits.keep_alive_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.limits.http2_max_streams)
            .keep_alive_interval(self.limits.http2_keepalive_interval)
            .keep_alive_timeout(self.limits.http2_keepalive_timeout);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let builder = Arc::new(builder);
        loop {
            let pending = tokio::select! {
                p = self.next() => p,
                () = &mut shutdown => break,
            };
            let (router, closing) = (router.clone(), closing.clone());
            let service = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let http1 = req.version() <= http::Version::HTTP_11;
                let (answer, closing) = (
                    router.clone().oneshot(req.map(axum::body::Body::new)),
                    closing.clone(),
                );
                async move {
                    let mut resp = answer.await?;
                    // Draining: this HTTP/1.1 connection's last answer (see above).
                    if http1 && closing.load(Ordering::Acquire) {
                        resp.headers_mut()
                            .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let service = hyper_util::service::TowerToHyperService::new(service);
            let (builder, watcher) = (builder.clone(), graceful.watcher());
            let timed_out = self.timed_out.clone();
            let header_timeout = self.limits.header_timeout;
            tokio::spawn(async move {
                let Some(io) = pending.establish().await else {
                    return;
                };
                let heads = io.heads();
                let mut builder = (*builder).clone();
                builder.http1().timer(HeadTimer {
                    heads: heads.clone(),
                    header_timeout,
                });
                let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), service).into_owned());
                // A connection's end (closed by the client, a timeout, a malformed
                // request) is that connection's business; hyper has answered what it could.
                if let Err(e) = conn.await {
                    // hyper's header timer fired during a head (the IO's timers count
                    // themselves; a keep-alive connection that waited out its timeout is
                    // not a slow client).
                    if heads.too_slow.load(Ordering::Relaxed)
                        && e.downcast_ref::<hyper::Error>()
                            .is_some_and(hyper::Error::is_timeout)
                    {
                        timed_out.inc();
                    }
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        drop(self);
        closing.store(true, Ordering::Release);
        let notice_ends = Instant::now() + CLOSE_NOTICE;
        while graceful.count() > 0 && Instant::now() < notice_ends {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        graceful.shutdown().await;
    }
}

/// How long a shutting-down HTTP listener goes on serving its open connections, with
/// `Connection: close` on every HTTP/1.1 answer, before it closes the idle ones (see
/// [`Listener::serve_http`]).
pub const CLOSE_NOTICE: Duration = Duration::from_secs(1);

/// An accepted socket whose TLS handshake (if the listener has TLS) is still to come.
struct Pending {
    socket: Guarded,
    tls: Option<tokio_rustls::TlsAcceptor>,
    within: Duration,
}

impl Pending {
    /// The connection, once its handshake is done; `None` if it failed or took longer
    /// than the header timeout (then the socket is closed).
    async fn establish(self) -> Option<Conn> {
        let Some(acceptor) = self.tls else {
            return Some(Conn::Plain(self.socket));
        };
        let timed_out = self.socket.timed_out.clone();
        match tokio::time::timeout(self.within, acceptor.accept(self.socket)).await {
            Ok(Ok(tls)) => Some(Conn::Tls(Box::new(tls))),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                timed_out.inc();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests;
