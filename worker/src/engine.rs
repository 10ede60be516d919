//! The model thread: libtorch work runs here, never on the tokio reactor.
//!
//! A bounded channel feeds one dedicated OS thread that owns the model and the group's
//! process group. On rank 0 it runs each batch through the group protocol
//! ([`crate::group`]) and, when idle for `heartbeat`, sends a heartbeat step, so a lost
//! rank is noticed within one interval. On the other ranks it follows rank 0's steps.
//! Any failed collective ends the thread with an error: the group is broken.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::Tensor;
use tokio::sync::oneshot;

use crate::collective::Collective;
use crate::group::{self, Header, Op};
use crate::metrics::WorkerMetrics;
use crate::models::{HostTensor, Model, ModelError, PassLimits, in_batch_order};
use crate::stats::{EngineStats, Phase};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("worker queue is full ({0} batches waiting); retry later")]
    Overloaded(usize),
    #[error("group is not ready: {0}")]
    NotReady(String),
    #[error("the group stopped before finishing the batch: {0}")]
    Stopped(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The result of one batch.
#[derive(Debug)]
pub struct EngineOutput {
    pub outputs: Vec<HostTensor>,
    pub rows: usize,
    pub queue_time: Duration,
    pub compute_time: Duration,
}

/// One batch for the model thread. It has no deadline of its own: the caller's deadline
/// is enforced by the gRPC server (`grpc-timeout`), which drops the call, and a job whose
/// caller has gone is skipped.
struct Job {
    batch_id: u64,
    inputs: Vec<HostTensor>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<EngineOutput, EngineError>>,
    /// The caller's span; the model thread runs the batch inside it.
    span: tracing::Span,
}

/// The model thread; it ends with the group's failure, if the group broke.
pub type ModelThread = JoinHandle<Result<(), ModelError>>;

/// Loads this rank's shard and joins the group (phase Joining); run on the model thread.
pub type Loader = Box<dyn FnOnce() -> Result<(Box<dyn Model>, Box<dyn Collective>), ModelError> + Send>;

#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub torch_threads: usize,
    /// Batches that may wait for the model thread (rank 0).
    pub capacity: usize,
    /// Idle time after which rank 0 sends a heartbeat step.
    pub heartbeat: Duration,
    /// Rows and tokens per forward pass: a larger batch runs as several, and what is
    /// left of it is abandoned once its caller has gone.
    pub pass_limits: PassLimits,
}

/// Sends batches to rank 0's model thread. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    capacity: usize,
    stats: Arc<EngineStats>,
}

pub(crate) fn start_thread(
    name: &str,
    stats: Arc<EngineStats>,
    torch_threads: usize,
    body: impl FnOnce(&EngineStats) -> Result<(), ModelError> + Send + 'static,
) -> std::io::Result<ModelThread> {
    std::thread::Builder::new().name(name.into()).spawn(move || {
        tch::set_num_threads(torch_threads.max(1) as i32);
        let _no_grad = tch::no_grad_guard();
        let result = body(&stats);
        match &result {
            Err(e) => stats.fail(e.to_string()),
            Ok(()) => stats.set_phase(Phase::Stopped),
        }
        result
    })
}

/// Starts rank 0's model thread: join, load, warm up with the whole group, then serve
/// batches from the returned handle. Dropping every handle shuts the group down cleanly.
pub fn spawn_leader(
    load: Loader,
    opts: EngineOptions,
    metrics: Arc<WorkerMetrics>,
) -> std::io::Result<(EngineHandle, ModelThread)> {
    let (tx, rx) = mpsc::sync_channel::<Job>(opts.capacity);
    let stats = Arc::new(EngineStats::default());
    let thread = start_thread("rankway-model", stats.clone(), opts.torch_threads, move |stats| {
        let started = Instant::now();
        let (model, comm) = load()?;
        stats.set_phase(Phase::Warming);
        let mut warm = model.prepare(&model.warmup_inputs())?;
        let _warm_output = group::lead_batch(comm.as_ref(), model.as_ref(), 0, &mut warm, &metrics)?;
        let signature = model.signature();
        tracing::info!(
            model = %signature.name,
            version = %signature.version,
            layout = %signature.shard_layout,
            world_size = comm.shard().world,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "group ready: every rank joined, loaded its shard and ran the warm-up batch"
        );
        stats.set_signature(signature);
        stats.set_phase(Phase::Ready);
        lead(
            model.as_ref(),
            comm.as_ref(),
            stats,
            &metrics,
            &rx,
            (opts.heartbeat, opts.pass_limits),
        )
    })?;
    Ok((
        EngineHandle {
            tx,
            capacity: opts.capacity,
            stats,
        },
        thread,
    ))
}

/// Starts a follower's model thread: join, load, then run rank 0's steps until it shuts
/// down (Ok) or the group breaks (Err).
pub fn spawn_follower(
    load: Loader,
    torch_threads: usize,
    metrics: Arc<WorkerMetrics>,
) -> std::io::Result<(Arc<EngineStats>, ModelThread)> {
    let stats = Arc::new(EngineStats::default());
    let thread = start_thread("rankway-model", stats.clone(), torch_threads, move |stats| {
        let (model, comm) = load()?;
        stats.set_signature(model.signature());
        stats.set_phase(Phase::Warming);
        let rank = comm.shard().rank;
        group::follow(
            comm.as_ref(),
            model.as_ref(),
            &metrics,
            track_follower(stats, rank, Op::Batch),
        )?;
        tracing::info!(rank, "rank 0 shut the group down");
        Ok(())
    })?;
    Ok((stats, thread))
}

/// Rank 0 when idle: waits for work, sending a heartbeat step every `heartbeat`. `None`
/// once the server is gone, after releasing the followers with a clean exit.
pub(crate) fn next_work<T>(
    rx: &mpsc::Receiver<T>,
    comm: &dyn Collective,
    heartbeat: Duration,
) -> Result<Option<T>, ModelError> {
    loop {
        match rx.recv_timeout(heartbeat) {
            Ok(work) => return Ok(Some(work)),
            Err(RecvTimeoutError::Timeout) => group::send_header(comm, &Header::control(Op::Heartbeat))?,
            Err(RecvTimeoutError::Disconnected) => {
                let _ = group::send_header(comm, &Header::control(Op::Shutdown));
                return Ok(None);
            }
        }
    }
}

/// A follower's reading of rank 0's headers: the first step of kind `work` is rank 0's
/// warm-up, after which this rank is ready; every such step counts as a batch.
pub(crate) fn track_follower(stats: &EngineStats, rank: usize, work: Op) -> impl FnMut(&Header) + '_ {
    move |h: &Header| {
        if h.op == work {
            if !stats.is_ready() {
                stats.set_phase(Phase::Ready);
                tracing::info!(rank, "warm-up done; following rank 0");
            }
            stats.batches.fetch_add(1, Ordering::AcqRel);
        }
    }
}

fn lead(
    model: &dyn Model,
    comm: &dyn Collective,
    stats: &EngineStats,
    metrics: &WorkerMetrics,
    rx: &mpsc::Receiver<Job>,
    (heartbeat, pass_limits): (Duration, PassLimits),
) -> Result<(), ModelError> {
    loop {
        let Some(job) = next_work(rx, comm, heartbeat)? else {
            return Ok(());
        };
        stats.queued.fetch_sub(1, Ordering::AcqRel);
        if job.reply.is_closed() {
            continue; // the caller went away (or its deadline passed) while the batch waited
        }
        let now = Instant::now();
        stats.running.fetch_add(1, Ordering::AcqRel);
        let entered = job.span.enter();
        let gone = || job.reply.is_closed();
        let result = run_batch(
            model,
            comm,
            metrics,
            (job.batch_id, pass_limits),
            &job.inputs,
            gone,
        );
        drop(entered);
        stats.running.fetch_sub(1, Ordering::AcqRel);
        stats.batches.fetch_add(1, Ordering::AcqRel);
        let result = result.map(|done| {
            done.map(|(outputs, rows)| EngineOutput {
                outputs,
                rows,
                queue_time: now - job.enqueued,
                compute_time: now.elapsed(),
            })
        });
        match result {
            Ok(None) => {
                metrics.abandoned_batch();
                tracing::info!(
                    batch_id = job.batch_id,
                    "batch abandoned: its caller left (deadline or cancel)"
                );
            }
            Ok(Some(out)) => {
                let _ = job.reply.send(Ok(out));
            }
            Err(ModelError::InvalidInput(m)) => {
                // Refused before any collective ran: the group is still in step.
                let _ = job.reply.send(Err(ModelError::InvalidInput(m).into()));
            }
            Err(fatal) => {
                // A failed collective (or a libtorch error mid-forward) leaves the ranks
                // out of step: the group is broken and must restart as a unit.
                let _ = job.reply.send(Err(EngineError::Stopped(fatal.to_string())));
                return Err(fatal);
            }
        }
    }
}

/// Runs one batch as forward passes within `pass_limits` (see [`Prepared::passes`]; every
/// one a step of its own on every rank, so stopping between them leaves the group in
/// step). Before each pass after the first, `gone` says whether the caller has left;
/// then the rest is abandoned and the answer is `None`.
///
/// [`Prepared::passes`]: crate::models::Prepared::passes
fn run_batch(
    model: &dyn Model,
    comm: &dyn Collective,
    metrics: &WorkerMetrics,
    (batch_id, pass_limits): (u64, PassLimits),
    inputs: &[HostTensor],
    gone: impl Fn() -> bool,
) -> Result<Option<(Vec<HostTensor>, usize)>, ModelError> {
    let batch = model.prepare(inputs)?;
    let passes = batch.passes(pass_limits);
    let mut outputs = Vec::with_capacity(passes.len());
    for (i, rows) in passes.iter().enumerate() {
        if i > 0 && gone() {
            return Ok(None);
        }
        let mut part = batch.pass(rows);
        outputs.push(group::lead_batch(comm, model, batch_id, &mut part, metrics)?);
    }
    let output = match outputs.len() {
        1 => outputs.pop().expect("one output"),
        _ => in_batch_order(Tensor::cat(&outputs, 0), &passes),
    };
    Ok(Some((model.outputs(&batch, output)?, batch.rows)))
}

impl EngineHandle {
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Queues a batch and waits for its result without blocking the reactor. Dropping
    /// the future before the batch starts takes it out of the queue.
    pub async fn infer(&self, batch_id: u64, inputs: Vec<HostTensor>) -> Result<EngineOutput, EngineError> {
        if !self.stats.is_ready() {
            return Err(EngineError::NotReady(self.stats.not_ready_reason()));
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            batch_id,
            inputs,
            enqueued: Instant::now(),
            reply,
            span: tracing::Span::current(),
        };
        self.stats.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(e) = self.tx.try_send(job) {
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(match e {
                TrySendError::Full(_) => EngineError::Overloaded(self.capacity),
                TrySendError::Disconnected(_) => EngineError::Stopped(self.stats.not_ready_reason()),
            });
        }
        rx.await
            .map_err(|_| EngineError::Stopped(self.stats.not_ready_reason()))?
    }

    /// Runs a batch from a blocking context (the `bench` command).
    pub fn infer_blocking(&self, inputs: Vec<HostTensor>) -> Result<EngineOutput, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.stats.queued.fetch_add(1, Ordering::AcqRel);
        let job = Job {
            batch_id: 0,
            inputs,
            enqueued: Instant::now(),
            reply,
            span: tracing::Span::current(),
        };
        self.tx
            .send(job)
            .map_err(|_| EngineError::Stopped(self.stats.not_ready_reason()))?;
        rx.blocking_recv()
            .map_err(|_| EngineError::Stopped(self.stats.not_ready_reason()))?
    }
}
