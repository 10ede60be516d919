//! The worker groups behind the gateway: their health, and leases on their capacity.
//!
//! Each group is polled with `GroupStatus`; only a group whose rank 0 reports a complete,
//! warm group is routable. A [`Lease`] is one of a group's in-flight slots (two: one
//! batch running, one staged; up to `--max-in-flight` for a model faster than a round
//! trip, see [`Group::has_free_slot`]), held until the batch's response has been
//! handled, so work waits in the gateway where it can still go to whichever group frees
//! first.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub mod breaker;
pub mod p2c;
pub mod whole_body;

use breaker::{Breaker, BreakerState};
use rand::rngs::StdRng;
use tokio::time::Instant;
use whole_body::WholeBody;

use rankway_proto::worker::worker_client::WorkerClient;
use rankway_proto::worker::{
    GenerateRequest, GenerateResponse, GroupStatusRequest, InferRequest, InferResponse, MAX_MESSAGE_BYTES,
    ModelInfo, ModelKind, NOT_STARTED_KEY, RankPhase,
};
use rankway_runtime::coalesce::Coalesce;
use rankway_runtime::keys::KeyFile;
use rankway_runtime::sync;
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tonic::transport::{Channel, Endpoint};

use crate::error::{ApiError, from_worker_status};

/// A group's state as the gateway last saw it, as shown by `/admin/groups`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroupView {
    pub name: String,
    pub address: String,
    pub ready: bool,
    /// Why the group is not routable (empty when it is).
    pub reason: String,
    pub model: Option<String>,
    pub world_size: u32,
    pub ranks_ready: u32,
    pub generation: u64,
    pub in_flight: usize,
    /// The last error seen from this group (kept after it recovers), and when (RFC 3339).
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Circuit breaker on consecutive failed dispatches.
    pub breaker: Option<BreakerState>,
    /// `embedding` or `generative` (empty until rank 0 said).
    pub kind: GroupKind,
    /// A generative group's load as rank 0 last reported it.
    pub load: Option<GenerationLoad>,
    #[serde(skip)]
    pub model_info: Option<Arc<ModelInfo>>,
}

/// What a group's model is, as its rank 0 last said; shown as `""` until it has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupKind {
    #[default]
    #[serde(rename = "")]
    Unknown,
    Embedding,
    Generative,
}

impl From<i32> for GroupKind {
    fn from(kind: i32) -> Self {
        match ModelKind::try_from(kind) {
            Ok(ModelKind::Generative) => Self::Generative,
            Ok(ModelKind::Embedding) => Self::Embedding,
            _ => Self::Unknown,
        }
    }
}

/// A generative group's load, from its GroupStatus.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GenerationLoad {
    pub context_length: u32,
    pub running_sequences: u32,
    pub waiting_sequences: u32,
    pub free_kv_tokens: u64,
    pub total_kv_tokens: u64,
}

impl GroupView {
    fn record_error(&mut self, error: String) {
        self.last_error = Some(error);
        self.last_error_at =
            Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
    }
}

/// How the gateway treats each group.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// The token every call to a rank 0 carries (`--worker-token-file`).
    pub token: Option<Arc<KeyFile>>,
    /// TLS to every rank 0 (`--worker-tls-ca`).
    pub tls: Option<WorkerTls>,
    /// Batches in flight at most (`--max-in-flight`).
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    /// Consecutive failed dispatches that open the breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps the group out before one probe batch.
    pub breaker_cooldown: Duration,
}

/// One worker group, addressed through its rank 0.
pub struct Group {
    name: String,
    address: String,
    client: WorkerClient<WholeBody<Channel>>,
    token: Option<Arc<KeyFile>>,
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    view: RwLock<GroupView>,
    breaker: Mutex<Breaker>,
    batches: AtomicU64,
    /// Moving averages of a batch's compute time on the group (rank 0's own figure) and
    /// of the rest of a call (network, queueing, encoding), in µs: when to send a staged
    /// batch (see [`Group::staging_window`]).
    compute_us: Ewma,
    overhead_us: Ewma,
    /// The rest of a call less its wait in rank 0's queue (network and encoding), in µs:
    /// whether more than two batches in flight pay (see [`Group::has_free_slot`]). A
    /// batch queued behind others there must not count: it would make a slow model look
    /// faster than a round trip, and the extra slots would then only lengthen the queue.
    transit_us: Ewma,
    /// Found through DNS (so DNS may also remove it), rather than given with --group.
    discovered: bool,
    /// Streams this gateway opened on the group minus those that ended, since the last
    /// GroupStatus (whose running and waiting figures already count the older ones).
    streams_since_poll: std::sync::atomic::AtomicI64,
}

impl Group {
    pub fn new(name: String, address: String, settings: GroupSettings) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("group {name}: bad address {address:?}: {e}"))?
            .connect_timeout(settings.connect_timeout);
        // Both connectors set TCP_NODELAY themselves (connect_tcp): an Endpoint's own
        // setting applies only to tonic's connector.
        let channel = match &settings.tls {
            None => endpoint.connect_with_connector_lazy(plain_connector(&address)),
            Some(tls) => endpoint.connect_with_connector_lazy(tls.connector(&address)?),
        };
        let client = WorkerClient::new(WholeBody(channel))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let view = GroupView {
            name: name.clone(),
            address: address.clone(),
            reason: "not checked yet".into(),
            ..GroupView::default()
        };
        Ok(Self {
            name,
            address,
            client,
            token: settings.token,
            slots: Arc::new(Semaphore::new(settings.max_in_flight)),
            max_in_flight: settings.max_in_flight,
            view: RwLock::new(view),
            breaker: Mutex::new(Breaker::new(settings.breaker_failures, settings.breaker_cooldown)),
            batches: AtomicU64::new(0),
            compute_us: Ewma::default(),
            overhead_us: Ewma::default(),
            transit_us: Ewma::default(),
            discovered: false,
            streams_since_poll: std::sync::atomic::AtomicI64::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn view(&self) -> GroupView {
        let mut v = sync::read(&self.view).clone();
        v.in_flight = self.in_flight();
        v.breaker = Some(sync::lock(&self.breaker).state(Instant::now()));
        v
    }

    pub fn is_ready(&self) -> bool {
        sync::read(&self.view).ready
    }

    /// Batches this gateway has sent to the group.
    pub fn batches_sent(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// How long a batch about to be staged on this group may keep gathering requests:
    /// none when the group is idle (only the caller's slot is taken); else about the
    /// time left of the batch it would queue behind (the group's usual compute time,
    /// less the usual cost of getting a batch there), so that it leaves in time to run
    /// the moment the group frees, carrying every request that arrived meanwhile.
    pub fn staging_window(&self) -> Duration {
        if !self.computes_another_batch() {
            return Duration::ZERO;
        }
        let (compute, overhead) = (self.compute_us.get(), self.overhead_us.get());
        Duration::from_micros(compute.saturating_sub(overhead))
    }

    /// Whether the group holds a batch besides the one of the caller, which holds a slot.
    pub fn computes_another_batch(&self) -> bool {
        self.in_flight() > 1
    }

    /// Whether the group may take another batch. Two in flight (one running, one staged)
    /// always; more, up to `max_in_flight`, only while a batch computes in less time than
    /// its way to rank 0 and back takes (a tiny model), so batches on their way keep the
    /// group busy while answers travel. A slower model stays at two, where the staging window
    /// paces the batches: with four slots there, MiniLM at 32 clients ran batches of 8.2
    /// rows instead of 15.9 and lost throughput (`make bench`).
    fn has_free_slot(&self) -> bool {
        let n = self.in_flight();
        n < self.max_in_flight && (n < 2 || self.compute_us.get() < self.transit_us.get())
    }

    /// Adds one answered call to the moving averages: `took` in all, `compute` of it in
    /// the forward and `queued` in rank 0's queue (rank 0's figures), in µs.
    fn observe_call(&self, took: u64, compute: u64, queued: u64) {
        let rest = took.saturating_sub(compute);
        self.compute_us.observe(compute);
        self.overhead_us.observe(rest);
        self.transit_us.observe(rest.saturating_sub(queued));
    }

    /// Batches sent and not yet answered (running or staged).
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.slots.available_permits()
    }

    fn serves(&self, model: &str) -> bool {
        let v = sync::read(&self.view);
        v.ready && v.model.as_deref() == Some(model)
    }

    /// A generative group's load for routing: the sequences rank 0 last reported running
    /// or waiting, plus the streams this gateway opened (minus those that ended) since.
    fn sequences(&self) -> i64 {
        let reported = sync::read(&self.view).load.map_or(0, |l| {
            i64::from(l.running_sequences) + i64::from(l.waiting_sequences)
        });
        (reported + self.streams_since_poll.load(Ordering::Relaxed)).max(0)
    }

    /// Opens a generation on this group, bounded by `deadline` (sent as `grpc-timeout`;
    /// rank 0 ends the stream when it passes). The stream counts toward the group's load
    /// until its [`StreamGuard`] drops.
    pub async fn generate(
        self: &Arc<Self>,
        request: GenerateRequest,
        deadline: Instant,
        trace: &tracing::Span,
    ) -> Result<(tonic::Streaming<GenerateResponse>, StreamGuard), DispatchError> {
        let guard = StreamGuard::new(self.clone());
        let mut client = self.client.clone();
        let req = call_request(request, deadline, trace, self.token.as_deref());
        match client.generate(req).await {
            Ok(resp) => {
                sync::lock(&self.breaker).on_success();
                Ok((resp.into_inner(), guard))
            }
            Err(status) => Err(self.failed(&status, deadline)),
        }
    }

    /// What a failed call means; a failure of the group (not of the request) counts
    /// against its breaker.
    pub fn failed(&self, status: &tonic::Status, deadline: Instant) -> DispatchError {
        // Rank 0's server cancels a call at its grpc-timeout: the call ran out of time,
        // which says nothing about the group's health.
        if Instant::now() >= deadline && is_timeout(status) {
            return DispatchError {
                error: ApiError::DeadlineExceeded(format!(
                    "group {:?} did not finish before the deadline",
                    self.name
                )),
                not_started: false,
            };
        }
        let error = from_worker_status(&self.name, status);
        // A full queue is load, not a fault: it does not open the breaker.
        if matches!(error, ApiError::Unavailable(_)) && status.code() != tonic::Code::ResourceExhausted {
            self.breaker
                .lock()
                .expect("breaker lock")
                .on_failure(Instant::now());
            sync::write(&self.view).record_error(format!("{}: {}", status.code(), status.message()));
        }
        DispatchError {
            error,
            not_started: never_started(status),
        }
    }

    /// Polls rank 0 once and records what it said. Returns whether readiness changed.
    pub async fn check(&self, timeout: Duration) -> bool {
        let mut client = self.client.clone();
        let mut req = tonic::Request::new(GroupStatusRequest {});
        req.set_timeout(timeout);
        authorize(&mut req, self.token.as_deref());
        let result = tokio::time::timeout(timeout, client.group_status(req)).await;
        let mut v = sync::write(&self.view);
        let was_ready = v.ready;
        match result {
            Ok(Ok(resp)) => {
                let s = resp.into_inner();
                v.ready = s.ready && s.model.is_some();
                v.reason = s.reason;
                v.world_size = s.world_size;
                v.ranks_ready = s
                    .ranks
                    .iter()
                    .filter(|r| r.phase == RankPhase::Ready as i32)
                    .count() as u32;
                if v.generation != s.generation {
                    // A restarted group is a new group: forget its predecessor's failures.
                    sync::lock(&self.breaker).on_success();
                }
                v.generation = s.generation;
                v.model = s.model.as_ref().map(|m| m.name.clone());
                v.model_info = s.model.map(Arc::new);
                v.kind = GroupKind::from(s.kind);
                v.load = s.generation_state.map(|g| GenerationLoad {
                    context_length: g.context_length,
                    running_sequences: g.running_sequences,
                    waiting_sequences: g.waiting_sequences,
                    free_kv_tokens: g.free_kv_tokens,
                    total_kv_tokens: g.total_kv_tokens,
                });
                self.streams_since_poll.store(0, Ordering::Relaxed);
            }
            Ok(Err(status)) => {
                v.ready = false;
                v.reason = "group status failed".into();
                v.record_error(format!("{}: {}", status.code(), status.message()));
            }
            Err(_) => {
                v.ready = false;
                v.reason = format!("group status timed out after {timeout:?}");
                let reason = v.reason.clone();
                v.record_error(reason);
            }
        }
        if was_ready != v.ready {
            tracing::info!(group = %self.name, address = %self.address, ready = v.ready, reason = %v.reason, "group readiness changed");
        }
        was_ready != v.ready
    }
}

/// An exponentially weighted moving average (weight 1/4 for each new sample) of µs.
#[derive(Debug, Default)]
struct Ewma(AtomicU64);

impl Ewma {
    fn observe(&self, sample: u64) {
        // Racing updates may drop a sample; an average does not mind.
        let old = self.0.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 4 + sample / 4
        };
        self.0.store(new, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

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
type WorkerIo<T> = hyper_util::rt::TokioIo<Coalesce<T>>;
type TlsIo = WorkerIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A TCP connection to `address` with TCP_NODELAY.
async fn connect_tcp(address: &str) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(address).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Connects to `address` (HOST:PORT) over TCP.
fn plain_connector(
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
    fn connector(
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
fn authorize<T>(req: &mut tonic::Request<T>, token: Option<&KeyFile>) {
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
fn call_request<T>(
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

/// One open generation on a group: counted in the group's load until dropped.
pub struct StreamGuard(Arc<Group>);

impl StreamGuard {
    fn new(group: Arc<Group>) -> Self {
        group.streams_since_poll.fetch_add(1, Ordering::Relaxed);
        Self(group)
    }

    pub fn group(&self) -> &Group {
        &self.0
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams_since_poll.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A slot on one group; the batch it carries is sent with [`Lease::infer`].
pub struct Lease {
    group: Arc<Group>,
    pool: Arc<PoolInner>,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Runs `request` on the group by `deadline`, which goes to rank 0 as the call's
    /// `grpc-timeout` (its server enforces it); `trace` is the call's span, whose context
    /// goes along as `traceparent`. A failure says whether the group never started the
    /// batch (safe to retry elsewhere) or lost it (its callers must be told). An answer
    /// comes with how long the call took.
    pub async fn infer(
        &self,
        request: InferRequest,
        deadline: Instant,
        trace: &tracing::Span,
    ) -> Result<(InferResponse, Duration), DispatchError> {
        self.group.batches.fetch_add(1, Ordering::Relaxed);
        let mut client = self.group.client.clone();
        let req = call_request(request, deadline, trace, self.group.token.as_deref());
        let started = Instant::now();
        let result = client.infer(req).await;
        match result {
            Ok(resp) => {
                sync::lock(&self.group.breaker).on_success();
                let resp = resp.into_inner();
                let took = started.elapsed();
                self.group
                    .observe_call(took.as_micros() as u64, resp.compute_us, resp.queue_us);
                Ok((resp, took))
            }
            Err(status) => Err(self.group.failed(&status, deadline)),
        }
    }
}

/// How a server reports a call that ran out of its `grpc-timeout` (tonic says
/// CANCELLED "Timeout expired"; the gRPC spec says DEADLINE_EXCEEDED).
fn is_timeout(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    )
}

/// A batch that did not come back.
#[derive(Debug)]
pub struct DispatchError {
    pub error: ApiError,
    /// The group never started the batch (it refused it, or could not be reached).
    pub not_started: bool,
}

/// Whether a failed call never reached the model: the worker said so, or no connection
/// could be made (tonic reports a failed connect as UNAVAILABLE "tcp connect error").
fn never_started(status: &tonic::Status) -> bool {
    status.metadata().contains_key(NOT_STARTED_KEY)
        || (status.code() == tonic::Code::Unavailable && status.message().contains("connect"))
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The permit is released after this; wake batchers to look again.
        self.pool.changed.notify_waiters();
    }
}

struct PoolInner {
    groups: RwLock<Vec<Arc<Group>>>,
    /// How new (discovered) groups are set up.
    settings: GroupSettings,
    /// For power-of-two-choices; seeded in tests.
    rng: Mutex<StdRng>,
    /// Woken when a slot frees or a group's readiness changes.
    changed: Notify,
    /// Whether any group is routable, for health reporting.
    any_ready: watch::Sender<bool>,
}

impl PoolInner {
    /// The current groups (cheap: clones a few Arcs).
    fn snapshot(&self) -> Vec<Arc<Group>> {
        sync::read(&self.groups).clone()
    }

    fn readiness_changed(&self) {
        let ready = self.snapshot().iter().any(|g| g.is_ready());
        self.any_ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
        self.changed.notify_waiters();
    }
}

/// All known groups. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

impl Pool {
    pub fn new(groups: Vec<Group>, settings: GroupSettings, rng: StdRng) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                groups: RwLock::new(groups.into_iter().map(Arc::new).collect()),
                settings,
                changed: Notify::new(),
                any_ready: watch::channel(false).0,
                rng: Mutex::new(rng),
            }),
        }
    }

    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.inner.snapshot()
    }

    pub fn views(&self) -> Vec<GroupView> {
        self.inner.snapshot().iter().map(|g| g.view()).collect()
    }

    /// Resolves at the next freed slot or readiness change (created before the check it
    /// follows, it misses none).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.changed.notified()
    }

    /// Follows whether any group is routable.
    pub fn subscribe_ready(&self) -> watch::Receiver<bool> {
        self.inner.any_ready.subscribe()
    }

    /// True when at least one group is routable.
    pub fn any_ready(&self) -> bool {
        self.inner.snapshot().iter().any(|g| g.is_ready())
    }

    /// Signature of `model` from a ready group serving it.
    pub fn model_info(&self, model: &str) -> Option<Arc<ModelInfo>> {
        self.inner
            .snapshot()
            .iter()
            .filter(|g| g.serves(model))
            .find_map(|g| sync::read(&g.view).model_info.clone())
    }

    /// Signature of `model` from any group that has reported it, ready or not.
    pub fn known_model_info(&self, model: &str) -> Option<Arc<ModelInfo>> {
        self.model_info(model).or_else(|| {
            self.inner.snapshot().iter().find_map(|g| {
                let v = sync::read(&g.view);
                v.model_info.clone().filter(|m| m.name == model)
            })
        })
    }

    /// Names of the models some ready group serves.
    pub fn ready_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .snapshot()
            .iter()
            .filter_map(|g| {
                let v = sync::read(&g.view);
                v.ready.then(|| v.model.clone()).flatten()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Waits for a free slot on a ready group serving `model` (not one of `exclude`),
    /// choosing by power of two choices on in-flight batches among the groups with a
    /// free slot and a closed (or probing) breaker. Fails at once, rather than waiting,
    /// when no such group is ready or every one has its breaker open.
    pub async fn acquire(&self, model: &str, exclude: &[String]) -> Result<Lease, ApiError> {
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();

            let now = Instant::now();
            let allowed = self.routable(model, exclude, now)?;
            let mut free: Vec<&Arc<Group>> = allowed.iter().filter(|g| g.has_free_slot()).collect();
            // An idle group, when there is one, takes the batch at once; a busy one would
            // stage it (see the batcher). P2C alone may draw two busy groups of many.
            if free.iter().any(|g| g.in_flight() == 0) {
                free.retain(|g| g.in_flight() == 0);
            }
            let loads: Vec<usize> = free.iter().map(|g| g.in_flight()).collect();
            let pick = p2c::choose(&loads, &mut *sync::lock(&self.inner.rng));
            if let Some(group) = pick.map(|i| free[i])
                && let Ok(permit) = group.slots.clone().try_acquire_owned()
            {
                sync::lock(&group.breaker).on_dispatch(now);
                return Ok(Lease {
                    group: group.clone(),
                    pool: self.inner.clone(),
                    _permit: permit,
                });
            }
            changed.await;
        }
    }

    /// A ready generative group serving `model` (not one of `exclude`) to open a stream
    /// on: power of two choices on their sequences (see [`Group::sequences`]) among those
    /// whose breaker allows. Never waits: rank 0 queues sequences itself.
    pub fn choose_generative(&self, model: &str, exclude: &[String]) -> Result<Arc<Group>, ApiError> {
        let now = Instant::now();
        let allowed = self.routable(model, exclude, now)?;
        let loads: Vec<usize> = allowed.iter().map(|g| g.sequences() as usize).collect();
        let pick = p2c::choose(&loads, &mut *sync::lock(&self.inner.rng)).expect("non-empty");
        let group = allowed[pick].clone();
        sync::lock(&group.breaker).on_dispatch(now);
        Ok(group)
    }

    /// The ready groups serving `model` (not one of `exclude`) whose breaker lets a call
    /// through; an error saying why when there is none.
    fn routable(&self, model: &str, exclude: &[String], now: Instant) -> Result<Vec<Arc<Group>>, ApiError> {
        let candidates: Vec<Arc<Group>> = self
            .inner
            .snapshot()
            .into_iter()
            .filter(|g| g.serves(model) && !exclude.contains(&g.name))
            .collect();
        if candidates.is_empty() {
            return Err(ApiError::Unavailable(format!(
                "no ready worker group serves model {model:?}"
            )));
        }
        let allowed: Vec<Arc<Group>> = candidates
            .into_iter()
            .filter(|g| sync::lock(&g.breaker).allows(now))
            .collect();
        if allowed.is_empty() {
            return Err(ApiError::Unavailable(format!(
                "every group serving model {model:?} is failing (circuit breaker open)"
            )));
        }
        Ok(allowed)
    }

    /// Whether `model` is served by generative groups (as far as any group has said).
    pub fn is_generative(&self, model: &str) -> bool {
        self.inner.snapshot().iter().any(|g| {
            let v = sync::read(&g.view);
            v.kind == GroupKind::Generative && v.model.as_deref() == Some(model)
        })
    }

    /// The context length of a ready group serving `model`, if one reported it.
    pub fn context_length(&self, model: &str) -> Option<u32> {
        self.inner
            .snapshot()
            .iter()
            .filter(|g| g.serves(model))
            .find_map(|g| {
                g.view
                    .read()
                    .expect("group view lock")
                    .load
                    .map(|l| l.context_length)
            })
    }

    /// Makes the discovered groups exactly `addrs` (static `--group`s are kept). A group
    /// that leaves is only unlisted: batches in flight on it finish, none are added.
    pub fn sync_discovered(&self, addrs: &[std::net::SocketAddr]) {
        let wanted: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let mut groups = sync::write(&self.inner.groups);
        let before = groups.len();
        groups.retain(|g| {
            let keep = !g.discovered || wanted.contains(&g.address);
            if !keep {
                tracing::info!(group = %g.name, "group left DNS; draining it");
            }
            keep
        });
        let mut added = 0;
        for addr in wanted {
            if groups.iter().any(|g| g.address == addr) {
                continue;
            }
            match Group::new(addr.clone(), addr.clone(), self.inner.settings.clone()) {
                Ok(mut g) => {
                    g.discovered = true;
                    tracing::info!(group = %addr, "group found in DNS");
                    groups.push(Arc::new(g));
                    added += 1;
                }
                Err(e) => tracing::warn!(error = %e, "cannot add discovered group"),
            }
        }
        let changed = added > 0 || groups.len() != before;
        drop(groups);
        if changed {
            self.inner.readiness_changed();
        }
    }

    /// Polls every group until `stop` turns true.
    pub async fn run_health_checks(
        self,
        interval: Duration,
        timeout: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.check_all(timeout).await;
        }
    }

    /// Checks every group once, concurrently.
    pub async fn check_all(&self, timeout: Duration) {
        let groups = self.inner.snapshot();
        let checks = groups.iter().map(|g| g.check(timeout));
        let changed = futures_util::future::join_all(checks).await;
        if changed.into_iter().any(|c| c) {
            self.inner.readiness_changed();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;

    pub(crate) fn settings() -> GroupSettings {
        GroupSettings {
            token: None,
            tls: None,
            max_in_flight: 2,
            connect_timeout: Duration::from_secs(1),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(5),
        }
    }

    /// A pool of groups that look ready for `model` (no worker is contacted).
    pub(crate) fn ready_pool(names: &[&str], model: &str) -> Pool {
        ready_pool_with(names, model, settings())
    }

    fn ready_pool_with(names: &[&str], model: &str, settings: GroupSettings) -> Pool {
        let groups = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let g = Group::new(n.to_string(), format!("127.0.0.1:{}", 1 + i), settings.clone()).unwrap();
                {
                    let mut v = g.view.write().unwrap();
                    v.ready = true;
                    v.model = Some(model.to_owned());
                    v.model_info = Some(Arc::new(ModelInfo {
                        name: model.to_owned(),
                        ..Default::default()
                    }));
                }
                g
            })
            .collect();
        Pool::new(groups, settings, StdRng::seed_from_u64(1))
    }

    #[test]
    fn admin_shows_a_group_kind_as_rank_0_named_it() {
        let shown = |kind: i32| serde_json::to_value(GroupKind::from(kind)).unwrap();
        assert_eq!(shown(ModelKind::Embedding as i32), "embedding");
        assert_eq!(shown(ModelKind::Generative as i32), "generative");
        assert_eq!(shown(ModelKind::Unspecified as i32), "");
        assert_eq!(shown(-1), "");
        assert_eq!(serde_json::to_value(GroupView::default()).unwrap()["kind"], "");
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_is_capped_and_work_waits_for_a_free_slot() {
        let pool = ready_pool(&["a"], "m");
        let first = pool.acquire("m", &[]).await.unwrap();
        let _second = pool.acquire("m", &[]).await.unwrap();
        assert_eq!(pool.groups()[0].in_flight(), 2);
        let third = tokio::time::timeout(Duration::from_secs(10), pool.acquire("m", &[])).await;
        assert!(third.is_err(), "a third batch must wait while two are in flight");
        let waiting = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire("m", &[]).await.map(|l| l.group().name().to_owned()) }
        });
        tokio::task::yield_now().await;
        drop(first);
        assert_eq!(
            waiting.await.unwrap().unwrap(),
            "a",
            "a freed slot is taken at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_sends_work_to_the_less_loaded_group() {
        let pool = ready_pool(&["a", "b"], "m");
        let first = pool.acquire("m", &[]).await.unwrap();
        let busy = first.group().name().to_owned();
        for _ in 0..20 {
            let next = pool.acquire("m", &[]).await.unwrap();
            assert_ne!(next.group().name(), busy, "the idle group wins every choice");
        }
        // Excluded groups are never chosen.
        drop(first);
        let l = pool.acquire("m", &["a".to_owned()]).await.unwrap();
        assert_eq!(l.group().name(), "b");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_group_is_chosen_whenever_there_is_one() {
        let names: Vec<String> = (0..6).map(|i| format!("g{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let pool = ready_pool(&refs, "m");
        // Five groups busy with one batch each; one idle.
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(pool.acquire("m", &[]).await.unwrap());
        }
        let busy: Vec<String> = held.iter().map(|l| l.group().name().to_owned()).collect();
        let idle = names.iter().find(|n| !busy.contains(n)).unwrap().clone();
        for _ in 0..20 {
            let l = pool.acquire("m", &[]).await.unwrap();
            assert_eq!(l.group().name(), idle, "never staged behind a busy group");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_ready_group_fails_at_once() {
        let pool = ready_pool(&["a"], "m");
        let err = pool.acquire("other", &[]).await.err().unwrap();
        assert!(
            err.to_string()
                .contains("no ready worker group serves model \"other\""),
            "{err}"
        );
        pool.groups()[0].view.write().unwrap().ready = false;
        assert!(pool.acquire("m", &[]).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn open_breakers_take_a_group_out_until_the_probe() {
        let pool = ready_pool(&["a"], "m");
        for _ in 0..3 {
            pool.groups()[0]
                .breaker
                .lock()
                .unwrap()
                .on_failure(Instant::now());
        }
        let err = pool.acquire("m", &[]).await.err().unwrap();
        assert!(err.to_string().contains("circuit breaker open"), "{err}");
        assert_eq!(pool.views()[0].breaker, Some(BreakerState::Open));
        tokio::time::advance(Duration::from_secs(5)).await;
        let probe = pool
            .acquire("m", &[])
            .await
            .expect("half-open lets one probe through");
        let second = tokio::time::timeout(Duration::from_secs(1), pool.acquire("m", &[])).await;
        assert!(matches!(second, Ok(Err(_))), "only one probe while half-open");
        drop(probe);
        pool.groups()[0].breaker.lock().unwrap().on_success();
        assert_eq!(pool.views()[0].breaker, Some(BreakerState::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn slots_past_two_are_for_a_model_faster_than_a_round_trip() {
        let settings = GroupSettings {
            max_in_flight: 4,
            ..settings()
        };
        let pool = ready_pool_with(&["a"], "m", settings);
        let g = pool.groups()[0].clone();
        let wait = Duration::from_secs(10);
        // A 20 ms forward whose batch also waited 29 ms in rank 0's queue: the wait is
        // not the way there (1 ms), so it stays a model slower than a round trip.
        g.observe_call(50_000, 20_000, 29_000);
        let two = [
            pool.acquire("m", &[]).await.unwrap(),
            pool.acquire("m", &[]).await.unwrap(),
        ];
        assert!(
            tokio::time::timeout(wait, pool.acquire("m", &[])).await.is_err(),
            "a model slower than a call keeps to two batches in flight"
        );
        // A model that computes in 50 µs of a 300 µs call.
        for _ in 0..40 {
            g.observe_call(300, 50, 0);
        }
        let more = [
            pool.acquire("m", &[]).await.unwrap(),
            pool.acquire("m", &[]).await.unwrap(),
        ];
        assert_eq!(g.in_flight(), 4);
        assert!(
            tokio::time::timeout(wait, pool.acquire("m", &[])).await.is_err(),
            "--max-in-flight still caps a fast model"
        );
        drop((two, more));
    }

    #[tokio::test(start_paused = true)]
    async fn a_staging_window_is_open_only_behind_a_running_batch_that_takes_longer_than_a_call() {
        let pool = ready_pool(&["a"], "m");
        let g = pool.groups()[0].clone();
        g.compute_us.observe(20_000);
        g.overhead_us.observe(1_000);
        let ours = pool.acquire("m", &[]).await.unwrap();
        assert_eq!(
            g.staging_window(),
            Duration::ZERO,
            "an idle group takes the batch now"
        );
        let running = pool.acquire("m", &[]).await.unwrap();
        assert_eq!(g.staging_window(), Duration::from_millis(19));
        // A model faster than a round trip: nothing to wait for.
        for _ in 0..40 {
            g.compute_us.observe(100);
        }
        assert_eq!(g.staging_window(), Duration::ZERO);
        drop((ours, running));
    }
}
