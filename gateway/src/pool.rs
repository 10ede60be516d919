//! The worker groups behind the gateway: their health, and leases on their capacity.
//!
//! Each group is polled with `GroupStatus`; only a group whose rank 0 reports a complete,
//! warm group is routable. A [`Lease`] is one of a group's in-flight slots (default 2:
//! one batch running, one staged), held until the batch's response has been handled, so
//! work waits in the gateway where it can still go to whichever group frees first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rankway_proto::worker::worker_client::WorkerClient;
use rankway_proto::worker::{GroupStatusRequest, InferRequest, InferResponse, ModelInfo, RankPhase};
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tonic::transport::{Channel, Endpoint};

use crate::error::{ApiError, from_worker_status};

/// Largest gRPC message sent to or taken from a worker.
pub const MAX_WORKER_MESSAGE_BYTES: usize = 64 << 20;

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
    pub last_error: Option<String>,
    #[serde(skip)]
    pub model_info: Option<ModelInfo>,
}

/// One worker group, addressed through its rank 0.
pub struct Group {
    name: String,
    address: String,
    client: WorkerClient<Channel>,
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    view: RwLock<GroupView>,
    batches: AtomicU64,
}

impl Group {
    pub fn new(
        name: String,
        address: String,
        max_in_flight: usize,
        connect_timeout: Duration,
    ) -> Result<Self, String> {
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("group {name}: bad address {address:?}: {e}"))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        let client = WorkerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_WORKER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_WORKER_MESSAGE_BYTES);
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
            slots: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            view: RwLock::new(view),
            batches: AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn view(&self) -> GroupView {
        let mut v = self.view.read().expect("group view lock").clone();
        v.in_flight = self.max_in_flight - self.slots.available_permits();
        v
    }

    pub fn is_ready(&self) -> bool {
        self.view.read().expect("group view lock").ready
    }

    /// Batches this gateway has sent to the group.
    pub fn batches_sent(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    fn serves(&self, model: &str) -> bool {
        let v = self.view.read().expect("group view lock");
        v.ready && v.model.as_deref() == Some(model)
    }

    /// Polls rank 0 once and records what it said. Returns whether readiness changed.
    pub async fn check(&self, timeout: Duration) -> bool {
        let mut client = self.client.clone();
        let mut req = tonic::Request::new(GroupStatusRequest {});
        req.set_timeout(timeout);
        let result = tokio::time::timeout(timeout, client.group_status(req)).await;
        let mut v = self.view.write().expect("group view lock");
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
                v.generation = s.generation;
                v.model = s.model.as_ref().map(|m| m.name.clone());
                v.model_info = s.model;
            }
            Ok(Err(status)) => {
                v.ready = false;
                v.reason = "group status failed".into();
                v.last_error = Some(format!("{}: {}", status.code(), status.message()));
            }
            Err(_) => {
                v.ready = false;
                v.reason = format!("group status timed out after {timeout:?}");
                v.last_error = Some(v.reason.clone());
            }
        }
        if was_ready != v.ready {
            tracing::info!(group = %self.name, address = %self.address, ready = v.ready, reason = %v.reason, "group readiness changed");
        }
        was_ready != v.ready
    }

    /// Takes a group out of rotation until its next successful health check.
    fn mark_failed(&self, error: String) {
        let mut v = self.view.write().expect("group view lock");
        v.ready = false;
        v.reason = "a batch failed".into();
        v.last_error = Some(error);
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

    pub async fn infer(
        &self,
        request: InferRequest,
        timeout: Option<Duration>,
    ) -> Result<InferResponse, ApiError> {
        self.group.batches.fetch_add(1, Ordering::Relaxed);
        let mut client = self.group.client.clone();
        let mut req = tonic::Request::new(request);
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        match client.infer(req).await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) => {
                let err = from_worker_status(&self.group.name, &status);
                if matches!(err, ApiError::Unavailable(_)) {
                    self.group.mark_failed(status.message().to_owned());
                    self.pool.readiness_changed();
                }
                Err(err)
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The permit is released after this; wake batchers to look again.
        self.pool.changed.notify_waiters();
    }
}

struct PoolInner {
    groups: Vec<Arc<Group>>,
    /// Woken when a slot frees or a group's readiness changes.
    changed: Notify,
    /// Whether any group is routable, for health reporting.
    any_ready: watch::Sender<bool>,
    next: AtomicU64,
}

impl PoolInner {
    fn readiness_changed(&self) {
        let ready = self.groups.iter().any(|g| g.is_ready());
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
    pub fn new(groups: Vec<Group>) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                groups: groups.into_iter().map(Arc::new).collect(),
                changed: Notify::new(),
                any_ready: watch::channel(false).0,
                next: AtomicU64::new(0),
            }),
        }
    }

    pub fn groups(&self) -> &[Arc<Group>] {
        &self.inner.groups
    }

    pub fn views(&self) -> Vec<GroupView> {
        self.inner.groups.iter().map(|g| g.view()).collect()
    }

    /// Follows whether any group is routable.
    pub fn subscribe_ready(&self) -> watch::Receiver<bool> {
        self.inner.any_ready.subscribe()
    }

    /// True when at least one group is routable.
    pub fn any_ready(&self) -> bool {
        self.inner.groups.iter().any(|g| g.is_ready())
    }

    /// Signature of `model` from a ready group serving it.
    pub fn model_info(&self, model: &str) -> Option<ModelInfo> {
        self.inner
            .groups
            .iter()
            .filter(|g| g.serves(model))
            .find_map(|g| g.view.read().expect("group view lock").model_info.clone())
    }

    /// Signature of `model` from any group that has reported it, ready or not.
    pub fn known_model_info(&self, model: &str) -> Option<ModelInfo> {
        self.model_info(model).or_else(|| {
            self.inner.groups.iter().find_map(|g| {
                let v = g.view.read().expect("group view lock");
                v.model_info.clone().filter(|m| m.name == model)
            })
        })
    }

    /// Names of the models some ready group serves.
    pub fn ready_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .groups
            .iter()
            .filter_map(|g| {
                let v = g.view.read().expect("group view lock");
                v.ready.then(|| v.model.clone()).flatten()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Waits for a free slot on a ready group serving `model`, trying groups in
    /// rotation. Fails at once, rather than waiting, when no such group is ready.
    pub async fn acquire(&self, model: &str) -> Result<Lease, ApiError> {
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();

            let candidates: Vec<&Arc<Group>> = self.inner.groups.iter().filter(|g| g.serves(model)).collect();
            if candidates.is_empty() {
                return Err(ApiError::Unavailable(format!(
                    "no ready worker group serves model {model:?}"
                )));
            }
            let start = self.inner.next.fetch_add(1, Ordering::Relaxed) as usize;
            for i in 0..candidates.len() {
                let group = candidates[(start + i) % candidates.len()];
                if let Ok(permit) = group.slots.clone().try_acquire_owned() {
                    return Ok(Lease {
                        group: group.clone(),
                        pool: self.inner.clone(),
                        _permit: permit,
                    });
                }
            }
            changed.await;
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
        let checks = self.inner.groups.iter().map(|g| g.check(timeout));
        let changed = futures_util::future::join_all(checks).await;
        if changed.into_iter().any(|c| c) {
            self.inner.readiness_changed();
        }
    }
}
