//! The worker groups behind the gateway: their health, and leases on their capacity.
//!
//! Each group is polled with `GroupStatus`; only a group whose rank 0 reports a complete,
//! warm group is routable. A [`Lease`] is one of a group's in-flight slots (two: one
//! batch running, one staged; up to `--max-in-flight` for a model faster than a round
//! trip, see [`Group::has_free_slot`]), held until the batch's response has been
//! handled, so work waits in the gateway where it can still go to whichever group frees
//! first.

pub mod breaker;
mod connect;
pub mod failover;
mod group;
mod lease;
pub mod p2c;
mod view;
pub mod whole_body;

pub use connect::WorkerTls;
pub use group::{DispatchError, Group, GroupSettings, Opened, StreamGuard};
pub use lease::Lease;
pub use view::{GenerationLoad, GroupKind, GroupView};

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::rngs::StdRng;
use rankway_proto::worker::ModelInfo;
use rankway_runtime::sync;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::error::ApiError;

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
    use breaker::BreakerState;
    use rand::SeedableRng;
    use rankway_proto::worker::ModelKind;

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
