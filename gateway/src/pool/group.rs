//! One group: its rank 0's client, its health as `GroupStatus` last told it, its
//! in-flight slots and the timings that pace them, and what a failed call means.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rankway_proto::worker::worker_client::WorkerClient;
use rankway_proto::worker::{
    GenerateRequest, GenerateResponse, GroupStatusRequest, MAX_MESSAGE_BYTES, NOT_STARTED_KEY, RankPhase,
};
use rankway_runtime::keys::KeyFile;
use rankway_runtime::sync;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::breaker::Breaker;
use super::connect::{WorkerTls, authorize, call_request, plain_connector};
use super::view::{GenerationLoad, GroupKind, GroupView};
use super::whole_body::WholeBody;
use crate::error::{ApiError, from_worker_status};

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
    pub(super) name: String,
    pub(super) address: String,
    pub(super) client: WorkerClient<WholeBody<Channel>>,
    pub(super) token: Option<Arc<KeyFile>>,
    pub(super) slots: Arc<Semaphore>,
    pub(super) max_in_flight: usize,
    pub(super) view: RwLock<GroupView>,
    pub(super) breaker: Mutex<Breaker>,
    pub(super) batches: AtomicU64,
    /// Moving averages of a batch's compute time on the group (rank 0's own figure) and
    /// of the rest of a call (network, queueing, encoding), in µs: when to send a staged
    /// batch (see [`Group::staging_window`]).
    pub(super) compute_us: Ewma,
    pub(super) overhead_us: Ewma,
    /// The rest of a call less its wait in rank 0's queue (network and encoding), in µs:
    /// whether more than two batches in flight pay (see [`Group::has_free_slot`]). A
    /// batch queued behind others there must not count: it would make a slow model look
    /// faster than a round trip, and the extra slots would then only lengthen the queue.
    pub(super) transit_us: Ewma,
    /// Found through DNS (so DNS may also remove it), rather than given with --group.
    pub(super) discovered: bool,
    /// Streams this gateway opened on the group minus those that ended, since the last
    /// GroupStatus (whose running and waiting figures already count the older ones).
    pub(super) streams_since_poll: AtomicI64,
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
            streams_since_poll: AtomicI64::new(0),
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
    pub(super) fn has_free_slot(&self) -> bool {
        let n = self.in_flight();
        n < self.max_in_flight && (n < 2 || self.compute_us.get() < self.transit_us.get())
    }

    /// Adds one answered call to the moving averages: `took` in all, `compute` of it in
    /// the forward and `queued` in rank 0's queue (rank 0's figures), in µs.
    pub(super) fn observe_call(&self, took: u64, compute: u64, queued: u64) {
        let rest = took.saturating_sub(compute);
        self.compute_us.observe(compute);
        self.overhead_us.observe(rest);
        self.transit_us.observe(rest.saturating_sub(queued));
    }

    /// Batches sent and not yet answered (running or staged).
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.slots.available_permits()
    }

    pub(super) fn serves(&self, model: &str) -> bool {
        let v = sync::read(&self.view);
        v.ready && v.model.as_deref() == Some(model)
    }

    /// A generative group's load for routing: the sequences rank 0 last reported running
    /// or waiting, plus the streams this gateway opened (minus those that ended) since.
    pub(super) fn sequences(&self) -> i64 {
        let reported = sync::read(&self.view).load.map_or(0, |l| {
            i64::from(l.running_sequences) + i64::from(l.waiting_sequences)
        });
        (reported + self.streams_since_poll.load(Ordering::Relaxed)).max(0)
    }

    /// Opens a generation on this group, bounded by `deadline` (sent as `grpc-timeout`;
    /// rank 0 ends the stream when it passes), and waits for its first message. Until
    /// that message nothing has reached the caller, so a group that fails before it
    /// (refused the request, or broke before its first token) has not started it (see
    /// [`DispatchError::not_started`]). The stream counts toward the group's load until
    /// its [`StreamGuard`] drops.
    pub async fn open_generation(
        self: &Arc<Self>,
        request: GenerateRequest,
        deadline: Instant,
        trace: &tracing::Span,
    ) -> Result<Opened, DispatchError> {
        let guard = StreamGuard::new(self.clone());
        let mut client = self.client.clone();
        let req = call_request(request, deadline, trace, self.token.as_deref());
        let mut stream = match client.generate(req).await {
            Ok(resp) => resp.into_inner(),
            Err(status) => return Err(self.failed(&status, deadline)),
        };
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(first))) => {
                sync::lock(&self.breaker).on_success();
                Ok((first, stream, guard))
            }
            Ok(Ok(None)) => Err(DispatchError {
                error: ApiError::Unavailable(format!("group {:?} ended the stream at once", self.name)),
                not_started: true,
            }),
            Ok(Err(status)) => Err(DispatchError {
                not_started: true,
                ..self.failed(&status, deadline)
            }),
            Err(_) => Err(DispatchError {
                error: ApiError::DeadlineExceeded("no first token before the deadline".into()),
                not_started: false,
            }),
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
pub(super) struct Ewma(AtomicU64);

impl Ewma {
    pub(super) fn observe(&self, sample: u64) {
        // Racing updates may drop a sample; an average does not mind.
        let old = self.0.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 4 + sample / 4
        };
        self.0.store(new, Ordering::Relaxed);
    }

    pub(super) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// An open generation: its first message, the rest of its stream, and its place in the
/// group's load.
pub type Opened = (GenerateResponse, tonic::Streaming<GenerateResponse>, StreamGuard);

/// One open generation on a group: counted in the group's load until dropped.
pub struct StreamGuard(Arc<Group>);

impl StreamGuard {
    pub(super) fn new(group: Arc<Group>) -> Self {
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

/// How a server reports a call that ran out of its `grpc-timeout` (tonic says
/// CANCELLED "Timeout expired"; the gRPC spec says DEADLINE_EXCEEDED).
fn is_timeout(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    )
}

/// A batch or a stream that did not come back.
#[derive(Debug)]
pub struct DispatchError {
    pub error: ApiError,
    /// Nothing of the request's result reached its caller and the group never ran it to
    /// an answer: it refused it, could not be reached, or (a stream) failed before its
    /// first message. Whether that allows another group is [`super::failover::is_retryable`].
    pub not_started: bool,
}

/// Whether a failed call never reached the model: the worker said so, or no connection
/// could be made (tonic reports a failed connect as UNAVAILABLE "tcp connect error").
fn never_started(status: &tonic::Status) -> bool {
    status.metadata().contains_key(NOT_STARTED_KEY)
        || (status.code() == tonic::Code::Unavailable && status.message().contains("connect"))
}
