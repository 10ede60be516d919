//! Connections to a group's rank 0: TCP with TCP_NODELAY, optionally TLS, writes
//! coalesced; and what every call to it carries (trace context, deadline, token).

use std::future::Future;
use std::sync::Arc;

use rankway_runtime::coalesce::Coalesce;
use rankway_runtime::keys::KeyFile;
use tokio::time::Instant;

/// TLS from the gateway to the ranks 0: whom to trust, what to present, which name to
/// check.
#[derive(Clone)]
pub struct WorkerTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: Option<String>,
}

impl std::fmt::Debug for WorkerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The socket to a rank 0, its writes coalesced ([`Coalesce`]): a call's HEADERS and
/// DATA leave in one write instead of two.
pub(super) type WorkerIo<T> = hyper_util::rt::TokioIo<Coalesce<T>>;
type TlsIo = WorkerIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A TCP connection to `address` with TCP_NODELAY.
async fn connect_tcp(address: &str) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(address).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Connects to `address` (HOST:PORT) over TCP.
pub(super) fn plain_connector(
    address: &str,
) -> impl tower::Service<
    http::Uri,
    Response = WorkerIo<tokio::net::TcpStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<WorkerIo<tokio::net::TcpStream>>> + Send,
> + Clone
+ Send
+ 'static {
    let address = address.to_owned();
    tower::service_fn(move |_: http::Uri| {
        let address = address.clone();
        async move {
            Ok(hyper_util::rt::TokioIo::new(Coalesce::new(
                connect_tcp(&address).await?,
            )))
        }
    })
}

impl WorkerTls {
    /// Connects to `address` (HOST:PORT) over TCP with TCP_NODELAY, then TLS, checking
    /// the certificate against --worker-tls-server-name or HOST.
    pub(super) fn connector(
        &self,
        address: &str,
    ) -> Result<
        impl tower::Service<
            http::Uri,
            Response = TlsIo,
            Error = std::io::Error,
            Future = impl Future<Output = std::io::Result<TlsIo>> + Send,
        > + Clone
        + Send
        + 'static,
        String,
    > {
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        let name = self.server_name.clone().unwrap_or_else(|| host.to_owned());
        let name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|e| format!("worker TLS: bad server name {name:?}: {e}"))?;
        let (address, connector) = (
            address.to_owned(),
            tokio_rustls::TlsConnector::from(self.config.clone()),
        );
        Ok(tower::service_fn(move |_: http::Uri| {
            let (address, connector, name) = (address.clone(), connector.clone(), name.clone());
            async move {
                let tls = connector.connect(name, connect_tcp(&address).await?).await?;
                Ok(hyper_util::rt::TokioIo::new(Coalesce::new(tls)))
            }
        }))
    }
}

/// Adds the worker token (if the gateway has one) to a call to rank 0.
pub(super) fn authorize<T>(req: &mut tonic::Request<T>, token: Option<&KeyFile>) {
    if let Some(bearer) = token.and_then(KeyFile::bearer) {
        req.metadata_mut().insert(
            "authorization",
            tonic::metadata::AsciiMetadataValue::try_from(bearer.as_bytes())
                .expect("a header value is ASCII"),
        );
    }
}

/// A call to rank 0: the trace context as `traceparent`, the deadline as `grpc-timeout`,
/// the token (if any) as `authorization`.
pub(super) fn call_request<T>(
    message: T,
    deadline: Instant,
    trace: &tracing::Span,
    token: Option<&KeyFile>,
) -> tonic::Request<T> {
    let mut headers = http::HeaderMap::new();
    rankway_runtime::telemetry::inject(trace, &mut headers);
    let mut req = tonic::Request::from_parts(
        tonic::metadata::MetadataMap::from_headers(headers),
        Default::default(),
        message,
    );
    req.set_timeout(deadline.saturating_duration_since(Instant::now()));
    authorize(&mut req, token);
    req
}
