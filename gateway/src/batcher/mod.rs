//! The per-model dynamic batcher.
//!
//! Requests wait in a bounded queue (full = refused at once). A single task per model
//! takes the first waiting request and waits for a free slot on a ready group. When the
//! group is idle, the batch takes every request already waiting (up to `max_batch_size`
//! rows) and goes at once. When the group is computing another batch, the new one is
//! staged behind it: it keeps gathering requests until that batch is about to end (the
//! group's moving-average compute time less the usual cost of a call, or sooner if that
//! batch ends first), then goes, so it runs the moment the group frees with everything
//! that arrived meanwhile. Nothing waits while a group could compute; requests
//! accumulate only while every group is busy, so the batch size follows the load, as
//! with TGI's continuous batching and Triton's dynamic batcher at its default (no queue
//! delay). `max_queue_delay` (default 0) is an upper bound for those who want fuller
//! batches at low load: a batch then also waits until its first request has waited that
//! long. A request whose caller has gone (timed out or disconnected) before dispatch is
//! dropped from its batch.
//!
//! Spans: each request's `queue` span lasts until its batch is dispatched; the `batch`
//! span is a child of its first request's span (so a one-request batch is in the
//! client's trace) and links to the span of every request in it; each call to a group's
//! rank 0 is a `worker.Infer` span under it, whose context goes along in gRPC metadata.
//! All three are made only when traces are exported (`telemetry::TRACE_ONLY`).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

mod dispatch;
mod rows;

use rankway_proto::worker::Tensor;
use rankway_runtime::telemetry::TRACE_ONLY;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::pool::{Group, Pool};
use crate::request_id::RequestId;
use crate::timer::PreciseTimer;
use crate::validation::ValidInfer;
use dispatch::Dispatch;

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Rows in one batch at most (a larger single request goes alone).
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for others once a group is free
    /// (0: a batch takes what is waiting and goes).
    pub max_queue_delay: Duration,
    /// Requests that may wait per model.
    pub queue_capacity: usize,
    /// Other groups a batch may go to when a group refused it before running it.
    pub retry_budget: usize,
}

/// One request's share of a batch's answer.
#[derive(Debug)]
pub struct Served {
    /// The request's own rows of every output, in the model's order.
    pub outputs: Vec<Tensor>,
    /// Version of the model on the group that ran the batch.
    pub model_version: String,
    /// How long the batch's call to that group's rank 0 took.
    pub worker_time: Duration,
}

impl Served {
    /// Keeps only the outputs the client asked for (all when it named none).
    pub fn select_outputs(mut self, requested: &[String]) -> Result<Self, ApiError> {
        if requested.is_empty() {
            return Ok(self);
        }
        self.outputs = requested
            .iter()
            .map(|name| {
                self.outputs
                    .iter()
                    .find(|t| &t.name == name)
                    .cloned()
                    .ok_or_else(|| {
                        let have: Vec<_> = self.outputs.iter().map(|t| t.name.as_str()).collect();
                        ApiError::InvalidInput(format!(
                            "unknown output {name:?}; the model's outputs are {have:?}"
                        ))
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(self)
    }
}

type Reply = oneshot::Sender<Result<Served, ApiError>>;

struct Entry {
    request: ValidInfer,
    /// Sent on to rank 0 with the batch, for its logs and spans.
    request_id: RequestId,
    deadline: Instant,
    enqueued: Instant,
    reply: Reply,
    /// The caller's request span, which the batch links to.
    span: tracing::Span,
    /// Open while the request waits for its batch.
    queue_span: Option<tracing::Span>,
}

impl Entry {
    /// Answers an entry that can no longer be dispatched; false if it should be skipped.
    fn still_wanted(self, now: Instant) -> Option<Self> {
        if self.reply.is_closed() {
            return None;
        }
        if self.deadline <= now {
            let waited = now - self.enqueued;
            let _ = self.reply.send(Err(ApiError::DeadlineExceeded(format!(
                "request expired after waiting {waited:?} in the queue"
            ))));
            return None;
        }
        Some(self)
    }
}

/// Handle to one model's batcher. Dropping every handle stops its task.
#[derive(Clone)]
pub struct Batcher {
    model: String,
    tx: mpsc::Sender<Entry>,
    cfg: BatchConfig,
    metrics: Arc<Metrics>,
}

static BATCH_IDS: AtomicU64 = AtomicU64::new(1);

impl Batcher {
    pub fn spawn(model: String, cfg: BatchConfig, pool: Pool, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let delay_timer = (!cfg.max_queue_delay.is_zero())
            .then(|| match PreciseTimer::new() {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::warn!(%model, error = %e, "no timerfd: the queue delay rounds up to whole milliseconds");
                    None
                }
            })
            .flatten();
        let task = BatchLoop {
            model: model.clone(),
            cfg,
            pool,
            metrics: metrics.clone(),
            rx,
            delay_timer,
        };
        tokio::spawn(task.run());
        Self {
            model,
            tx,
            cfg,
            metrics,
        }
    }

    /// Queues a validated request and waits for its own rows of the batch result.
    pub async fn submit(
        &self,
        request: ValidInfer,
        deadline: Instant,
        request_id: RequestId,
    ) -> Result<Served, ApiError> {
        let (reply, rx) = oneshot::channel();
        let entry = Entry {
            request,
            request_id,
            deadline,
            enqueued: Instant::now(),
            reply,
            span: tracing::Span::current(),
            queue_span: Some(tracing::info_span!(target: TRACE_ONLY, "queue", model = %self.model)),
        };
        if self.tx.try_send(entry).is_err() {
            return Err(ApiError::QueueFull {
                model: self.model.clone(),
                capacity: self.cfg.queue_capacity,
                retry_after: Duration::from_secs(1),
            });
        }
        self.metrics.queue_depth(&self.model).inc();
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ApiError::Internal("batcher stopped before answering".into())),
            Err(_) => Err(ApiError::DeadlineExceeded(
                "no result before the request's deadline".into(),
            )),
        }
    }
}

struct BatchLoop {
    model: String,
    cfg: BatchConfig,
    pool: Pool,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Entry>,
    /// Ends queue-delay windows on time (Tokio's timer would round them up to the next
    /// millisecond). None with no queue delay, or on Tokio's timer in paused-time tests.
    delay_timer: Option<Arc<PreciseTimer>>,
}

impl BatchLoop {
    async fn recv(&mut self) -> Option<Entry> {
        let e = self.rx.recv().await?;
        self.metrics.queue_depth(&self.model).dec();
        Some(e)
    }

    /// The next waiting request, if one is already there.
    fn try_recv(&mut self) -> Option<Entry> {
        let e = self.rx.try_recv().ok()?;
        self.metrics.queue_depth(&self.model).dec();
        Some(e)
    }

    /// The next request for the batch being filled: one already waiting, else one that
    /// arrives before the batch closes. It closes at `delay_until` (now, with no queue
    /// delay), or, for a batch staged on a busy group, at the staging deadline if later,
    /// unless the group frees first: then nothing is worth waiting for.
    async fn next_for_batch(
        &mut self,
        delay_until: Instant,
        staged: Option<(Instant, &Group)>,
    ) -> Option<Entry> {
        if let Some(e) = self.try_recv() {
            return Some(e);
        }
        let pool = self.pool.clone();
        loop {
            let changed = pool.changed();
            let staging =
                staged.filter(|(until, group)| group.computes_another_batch() && Instant::now() < *until);
            let close_at = staging.map_or(delay_until, |(until, _)| until.max(delay_until));
            if Instant::now() >= close_at {
                return None;
            }
            // The queue delay is the user's bound, to the microsecond; a staging window
            // is an estimate that the group freeing cuts short, on Tokio's timer.
            let by_delay = staging.is_none_or(|(until, _)| until <= delay_until);
            let timer = self.delay_timer.clone().filter(|_| by_delay);
            tokio::select! {
                e = self.recv() => return e,
                _ = close_at_time(timer, close_at) => return None,
                _ = changed, if staging.is_some() => {} // a slot freed: is the group idle now?
            }
        }
    }

    async fn run(mut self) {
        let mut carry: Option<Entry> = None;
        loop {
            let first = match carry.take() {
                Some(e) => e,
                None => match self.recv().await {
                    Some(e) => e,
                    None => return, // every handle dropped: the gateway is shutting down
                },
            };
            let Some(first) = first.still_wanted(Instant::now()) else {
                continue;
            };

            // Hold the first request until a group can take a batch; others queue meanwhile.
            let deadline = first.deadline;
            let lease = tokio::select! {
                lease = self.pool.acquire(&self.model, &[]) => lease,
                _ = tokio::time::sleep_until(deadline) => {
                    // Answers the caller with DEADLINE_EXCEEDED.
                    let _ = first.still_wanted(Instant::now());
                    continue;
                }
            };
            let lease = match lease {
                Ok(l) => l,
                Err(e) => {
                    let _ = first.reply.send(Err(e));
                    continue;
                }
            };

            // The group can take a batch: take what waits. A batch staged behind a running
            // one also gathers what arrives until that one is about to end; with a queue
            // delay, what arrives until the first request has waited that long. Never
            // past the first request's deadline.
            let opened = Instant::now();
            let delay_until = (first.enqueued + self.cfg.max_queue_delay).min(first.deadline);
            let window = lease.group().staging_window();
            let staged = (!window.is_zero()).then(|| ((opened + window).min(first.deadline), lease.group()));
            let mut rows = first.request.rows;
            let mut batch = vec![first];
            while rows < self.cfg.max_batch_size {
                let Some(next) = self.next_for_batch(delay_until, staged).await else {
                    break;
                };
                let Some(next) = next.still_wanted(Instant::now()) else {
                    continue;
                };
                if rows + next.request.rows > self.cfg.max_batch_size {
                    carry = Some(next);
                    break;
                }
                rows += next.request.rows;
                batch.push(next);
            }
            // Callers that left or expired while the batch filled are answered, not sent.
            let now = Instant::now();
            let batch: Vec<Entry> = batch.into_iter().filter_map(|e| e.still_wanted(now)).collect();
            if batch.is_empty() {
                continue; // the lease drops here, freeing the slot
            }
            self.metrics.observe_fill_delay(&self.model, now - opened);
            let rows = batch.iter().map(|e| e.request.rows).sum();
            let dispatch = Dispatch {
                model: self.model.clone(),
                metrics: self.metrics.clone(),
                pool: self.pool.clone(),
                retry_budget: self.cfg.retry_budget,
                batch,
                rows,
            };
            tokio::spawn(dispatch.run(lease));
        }
    }
}

/// Waits until `at`, on the precise timer when there is one (Tokio's if it fails).
async fn close_at_time(timer: Option<Arc<PreciseTimer>>, at: Instant) {
    if let Some(timer) = timer
        && timer.sleep_until(at).await.is_ok()
    {
        return;
    }
    tokio::time::sleep_until(at).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::tests::ready_pool;
    use rankway_proto::codec::encode_bytes_elements;
    use rankway_proto::worker::DataType;

    fn id() -> RequestId {
        RequestId("test-request".into())
    }

    fn request() -> ValidInfer {
        let t = Tensor {
            name: "text".into(),
            datatype: DataType::Bytes as i32,
            shape: vec![1],
            data: encode_bytes_elements(&["x"]).into(),
        };
        ValidInfer {
            inputs: vec![t],
            rows: 1,
        }
    }

    fn cfg(queue_capacity: usize) -> BatchConfig {
        BatchConfig {
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(1),
            queue_capacity,
            retry_budget: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_answers_at_once() {
        let pool = ready_pool(&["a"], "m");
        // Both slots busy: the batcher holds its first request, the queue fills behind it.
        let _busy = (
            pool.acquire("m", &[]).await.unwrap(),
            pool.acquire("m", &[]).await.unwrap(),
        );
        let b = Batcher::spawn("m".into(), cfg(1), pool.clone(), Arc::new(Metrics::new()));
        let far = Instant::now() + Duration::from_secs(60);
        let held = tokio::spawn({
            let b = b.clone();
            async move { b.submit(request(), far, id()).await }
        });
        tokio::task::yield_now().await;
        let queued = tokio::spawn({
            let b = b.clone();
            async move { b.submit(request(), far, id()).await }
        });
        tokio::task::yield_now().await;
        let started = Instant::now();
        let full = b.submit(request(), far, id()).await;
        assert!(matches!(full, Err(ApiError::QueueFull { .. })), "{full:?}");
        assert_eq!(Instant::now(), started, "refused without waiting");
        held.abort();
        queued.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn expired_requests_are_answered_and_never_dispatched() {
        let pool = ready_pool(&["a"], "m");
        let busy = (
            pool.acquire("m", &[]).await.unwrap(),
            pool.acquire("m", &[]).await.unwrap(),
        );
        let sent_before = pool.groups()[0].batches_sent();
        let b = Batcher::spawn("m".into(), cfg(8), pool.clone(), Arc::new(Metrics::new()));
        let deadline = Instant::now() + Duration::from_millis(100);
        let r = b.submit(request(), deadline, id()).await;
        assert!(matches!(r, Err(ApiError::DeadlineExceeded(_))), "{r:?}");
        assert!(Instant::now() >= deadline);
        // Free the slots: the expired request must not become a batch.
        drop(busy);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(pool.groups()[0].batches_sent(), sent_before);
    }

    /// A batch loop fed by the returned sender, for driving `next_for_batch` directly;
    /// its queue delay runs on Tokio's timer, which paused time drives.
    fn batch_loop() -> (mpsc::Sender<Entry>, BatchLoop) {
        let (tx, rx) = mpsc::channel(8);
        let lp = BatchLoop {
            model: "m".into(),
            cfg: cfg(8),
            pool: ready_pool(&["a"], "m"),
            metrics: Arc::new(Metrics::new()),
            rx,
            delay_timer: None,
        };
        (tx, lp)
    }

    #[tokio::test]
    async fn a_sub_millisecond_queue_delay_closes_on_the_precise_timer() {
        let (_tx, mut coarse) = batch_loop();
        let (_tx2, mut precise) = batch_loop();
        precise.delay_timer = Some(Arc::new(PreciseTimer::new().unwrap()));
        let delay = Duration::from_micros(200);
        // Median time for an empty queue to close a 200 µs window, on each timer.
        async fn median(lp: &mut BatchLoop, delay: Duration) -> Duration {
            let mut took = Vec::new();
            for _ in 0..11 {
                let start = Instant::now();
                assert!(lp.next_for_batch(start + delay, None).await.is_none());
                took.push(start.elapsed());
            }
            took.sort();
            took[5]
        }
        let (precise, coarse) = (
            median(&mut precise, delay).await,
            median(&mut coarse, delay).await,
        );
        assert!(precise >= delay, "never before the bound: {precise:?}");
        assert!(
            precise * 2 < coarse,
            "precise {precise:?}, Tokio's timer {coarse:?}"
        );
    }

    fn entry() -> Entry {
        let now = Instant::now();
        Entry {
            request: request(),
            request_id: id(),
            deadline: now + Duration::from_secs(60),
            enqueued: now,
            reply: oneshot::channel().0,
            span: tracing::Span::none(),
            queue_span: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_queue_delay_a_batch_takes_what_waits_and_never_waits_for_more() {
        let (tx, mut lp) = batch_loop();
        let now = Instant::now();
        for _ in 0..3 {
            assert!(tx.try_send(entry()).is_ok());
        }
        let mut taken = 0;
        while lp.next_for_batch(now, None).await.is_some() {
            taken += 1;
        }
        assert_eq!(taken, 3, "every waiting request joins the batch");
        assert_eq!(Instant::now(), now, "an empty queue closes the batch at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_delay_is_an_upper_bound_on_waiting_for_more() {
        let (tx, mut lp) = batch_loop();
        let start = Instant::now();
        let close_at = start + Duration::from_millis(5);
        // One request arrives 2 ms in: it is taken when it arrives, not at the bound.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let _ = tx.send(entry()).await;
            tokio::time::sleep(Duration::from_secs(60)).await; // keep the queue open
        });
        assert!(lp.next_for_batch(close_at, None).await.is_some());
        assert_eq!(Instant::now(), start + Duration::from_millis(2));
        assert!(lp.next_for_batch(close_at, None).await.is_none());
        assert_eq!(Instant::now(), close_at, "no more: the batch closes at the bound");
    }

    #[tokio::test(start_paused = true)]
    async fn a_staged_batch_gathers_while_the_group_computes_and_leaves_when_it_frees() {
        let (tx, mut lp) = batch_loop();
        let pool = lp.pool.clone();
        let running = pool.acquire("m", &[]).await.unwrap();
        let ours = pool.acquire("m", &[]).await.unwrap();
        let start = Instant::now();
        let staged_until = start + Duration::from_millis(50);
        let group = ours.group();
        // Requests arriving while the other batch runs join the staged one...
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let _ = tx.send(entry()).await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        assert!(
            lp.next_for_batch(start, Some((staged_until, group)))
                .await
                .is_some()
        );
        assert_eq!(Instant::now(), start + Duration::from_millis(3));
        // ...and it leaves the moment the running batch ends, not at the estimate.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(7)).await;
            drop(running);
        });
        assert!(
            lp.next_for_batch(start, Some((staged_until, group)))
                .await
                .is_none()
        );
        assert_eq!(Instant::now(), start + Duration::from_millis(10));
        drop(ours);
    }
}
