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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::coalesce::Coalesce;

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

/// A layer for a tonic server that answers a bad request message with the codes gRPC
/// servers use for a client's mistake: a message over the decoding limit (`limit`
/// bytes), which tonic answers OUT_OF_RANGE, gets RESOURCE_EXHAUSTED; one that is not
/// valid protobuf, which tonic answers INTERNAL as if the server had failed, gets
/// INVALID_ARGUMENT. tonic sends those statuses in the headers and keeps them in the
/// response's extensions, where this finds them.
pub fn grpc_request_errors(
    limit: usize,
) -> tower::util::MapResponseLayer<
    impl Fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> + Clone,
> {
    tower::util::MapResponseLayer::new(move |resp: http::Response<tonic::body::Body>| {
        let Some(status) = resp.extensions().get::<tonic::Status>() else {
            return resp;
        };
        let fixed = match status.code() {
            tonic::Code::OutOfRange if status.message().contains("message length too large") => {
                tonic::Status::resource_exhausted(format!(
                    "request message is over the limit of {limit} bytes"
                ))
            }
            tonic::Code::Internal if status.message().starts_with("failed to decode Protobuf message") => {
                // prost's description names the field and the wire problem, not values.
                tonic::Status::invalid_argument(format!("malformed request message: {}", status.message()))
            }
            _ => return resp,
        };
        fixed.into_http()
    })
}

/// Connection counts of every listener, by its name (a fixed set: `rest`, `grpc`,
/// `metrics`), registered once per process in its registry (whose prefix names them:
/// `rankway_connections_open`, `rankway_worker_connections_open`, ...), with the
/// registry's constant labels (a rank's `group` and `rank`).
#[derive(Clone)]
pub struct ConnectionMetrics {
    open: IntGaugeVec,
    refused: IntCounterVec,
    timed_out: IntCounterVec,
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

/// A served connection: the guarded socket, or TLS over it.
pub enum Conn {
    Plain(Guarded),
    Tls(Box<tokio_rustls::server::TlsStream<Guarded>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(g) => Pin::new(g).poll_read(cx, buf),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(g) => Pin::new(g).poll_write(cx, buf),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(g) => Pin::new(g).poll_write_vectored(cx, bufs),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(g) => g.is_write_vectored(),
            Conn::Tls(t) => t.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(g) => Pin::new(g).poll_flush(cx),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(g) => Pin::new(g).poll_shutdown(cx),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Conn {
    /// What the connection's [`HeadTimer`] reads and tells.
    fn heads(&self) -> Arc<Heads> {
        match self {
            Conn::Plain(g) => g.heads.clone(),
            Conn::Tls(t) => t.get_ref().0.heads.clone(),
        }
    }
}

/// Shared by a connection's socket and its [`HeadTimer`].
#[derive(Default)]
struct Heads {
    /// Reads that brought bytes.
    reads: AtomicU64,
    /// A request head took longer than the header timeout (rather than the connection
    /// having waited out the keep-alive timeout).
    too_slow: AtomicBool,
}

/// hyper's HTTP/1.1 header timer for one connection. hyper starts it when it begins
/// waiting for a request head, with the keep-alive timeout; once a read brings bytes (the
/// head's first), the deadline becomes the header timeout from then.
struct HeadTimer {
    heads: Arc<Heads>,
    header_timeout: Duration,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(std::time::Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            heads: self.heads.clone(),
            seen: self.heads.reads.load(Ordering::Relaxed),
            header_timeout: self.header_timeout,
            head_started: false,
            sleep: Box::pin(tokio::time::sleep_until(Instant::from_std(deadline))),
        })
    }

    /// hyper resets the timer for every request after the first: in place, as Tokio's
    /// own timer does, rather than with a new allocation and timer entry each time.
    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(head) => {
                let head = head.get_mut();
                head.seen = self.heads.reads.load(Ordering::Relaxed);
                head.head_started = false;
                head.sleep.as_mut().reset(Instant::from_std(new_deadline));
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

struct HeadSleep {
    heads: Arc<Heads>,
    /// The read count when the wait began.
    seen: u64,
    header_timeout: Duration,
    head_started: bool,
    sleep: Pin<Box<Sleep>>,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // hyper polls this after each read of the head, so a read's bytes are seen here
        // in the same turn that read them.
        if !self.head_started && self.heads.reads.load(Ordering::Relaxed) != self.seen {
            self.head_started = true;
            let deadline = Instant::now() + self.header_timeout;
            self.sleep.as_mut().reset(deadline);
        }
        ready!(self.sleep.as_mut().poll(cx));
        if self.head_started {
            self.heads.too_slow.store(true, Ordering::Relaxed);
        }
        Poll::Ready(())
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Plain(g) => g.tcp.connect_info(),
            Conn::Tls(t) => t.get_ref().0.tcp.connect_info(),
        }
    }
}

/// An accepted socket holding its listener slot: reads fail with `TimedOut` once it has
/// sent nothing within the header timeout, or moved nothing for the idle timeout.
pub struct Guarded {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
    open: prometheus::IntGauge,
    timed_out: prometheus::IntCounter,
    /// When the timer fires: first the header deadline, then the idle deadline.
    timer: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    /// The last time bytes moved; `None` until the first read.
    last_activity: Option<Instant>,
    heads: Arc<Heads>,
}

impl Guarded {
    fn new(tcp: TcpStream, slot: OwnedSemaphorePermit, listener: &Listener) -> Self {
        listener.open.inc();
        Self {
            tcp,
            _slot: slot,
            open: listener.open.clone(),
            timed_out: listener.timed_out.clone(),
            timer: Box::pin(tokio::time::sleep(listener.limits.header_timeout)),
            idle_timeout: listener.limits.idle_timeout,
            last_activity: None,
            heads: Arc::default(),
        }
    }

    /// Called with a read pending: `Err(TimedOut)` once the connection's deadline has
    /// passed. Activity only moves the deadline when the timer fires, so moving bytes
    /// costs a clock read, not a timer update.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let Some(last) = self.last_activity else {
                return Err(self.time_out("sent nothing within the header timeout"));
            };
            let deadline = last + self.idle_timeout;
            if deadline <= Instant::now() {
                return Err(self.time_out("idle for the idle timeout"));
            }
            self.timer.as_mut().reset(deadline);
        }
        Ok(())
    }

    fn time_out(&self, why: &'static str) -> io::Error {
        self.timed_out.inc();
        io::Error::new(io::ErrorKind::TimedOut, why)
    }

    fn moved(&mut self, first: bool) {
        let now = Instant::now();
        if first && self.last_activity.is_none() {
            // The header deadline has done its job; from now on the idle one counts.
            self.timer.as_mut().reset(now + self.idle_timeout);
        }
        if first || self.last_activity.is_some() {
            self.last_activity = Some(now);
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.moved(true);
                    self.heads.reads.fetch_add(1, Ordering::Relaxed);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.poll_deadline(cx)?;
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, buf))?;
        if n > 0 {
            self.moved(false);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs))?;
        if n > 0 {
            self.moved(false);
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
