//! The embedding engine: a bounded channel feeds the model thread (see [`super`]), which
//! owns the model and the group's process group. On rank 0 it runs each batch through the group protocol
//! ([`crate::group`]) and, when idle for `heartbeat`, sends a heartbeat step, so a lost
//! rank is noticed within one interval. On the other ranks it follows rank 0's steps.
//! Any failed collective ends the thread with an error: the group is broken.
//!
//! One exception to "never on the reactor": in a group of one rank, a batch whose
//! forward is known to be short runs on the gRPC thread that received it, when the model
//! thread is idle ([`EngineOptions::inline_max`]). Handing it
//! over costs two thread wake-ups, and on a loaded host each can wait behind other work
//! on a busy core. With the no-op `mlp` at 8 REST connections through the gateway, that
//! gave more req/s (docs/benchmarks.md).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tch::Tensor;
use tokio::sync::oneshot;

use super::{EngineError, ModelThread, micros, next_work, start_thread, track_follower};
use crate::collective::{Collective, Shard, SingleRank};
use crate::group::{self, Header, Op};
use crate::metrics::WorkerMetrics;
use crate::models::{HostTensor, Model, ModelConfig, ModelError, PassLimits, in_batch_order};
use crate::stats::{EngineStats, Phase};

thread_local! {
    /// Whether this thread's libtorch threads are set for inline runs.
    static INLINE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
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

/// Loads this rank's shard and joins the group (phase Joining); run on the model thread.
pub type Loader = Box<dyn FnOnce() -> Result<(Box<dyn Model>, Box<dyn Collective>), ModelError> + Send>;

/// Loads the whole model `cfg` describes, as the one rank of its group (the `bench`
/// command, tests).
pub fn single_rank(cfg: ModelConfig) -> Loader {
    Box::new(move || {
        let model = crate::models::load(&cfg, Shard::SINGLE)?;
        Ok((model, Box::new(SingleRank(cfg.device)) as Box<dyn Collective>))
    })
}

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
    /// In a group of one, a batch of no more rows than a pass runs on the gRPC thread
    /// that received it while the model thread is idle and recent batches took less than
    /// this to compute (zero: never). The run holds that thread, and every call it
    /// serves, for as long.
    pub inline_max: Duration,
}

/// Rank 0's model and its group. The model thread owns them and lends them to an inline
/// run on the gRPC thread; the lock is held for one batch or one heartbeat at a time.
struct Leader {
    model: Box<dyn Model>,
    comm: Box<dyn Collective>,
    /// A failure of an inline run that broke the group; the model thread ends with it.
    broken: Option<ModelError>,
}

/// What the model thread shares with the handles.
struct Shared {
    leader: Mutex<Leader>,
    /// Compute time of recent batches, µs (a moving average over about eight).
    recent_us: AtomicU64,
    stats: Arc<EngineStats>,
    metrics: Arc<WorkerMetrics>,
    pass_limits: PassLimits,
    /// [`EngineOptions::inline_max`].
    inline_max: Duration,
    torch_threads: usize,
}

impl Shared {
    /// The leader, or the failure an inline run left in it.
    fn lock(&self) -> Result<MutexGuard<'_, Leader>, ModelError> {
        let mut leader = self
            .leader
            .lock()
            .map_err(|_| ModelError::Torch(tch::TchError::Torch("a batch panicked mid-forward".into())))?;
        match leader.broken.take() {
            Some(e) => Err(e),
            None => Ok(leader),
        }
    }

    /// Runs a batch on `leader`, on whichever thread holds it, and keeps the counters.
    /// `None`: abandoned, its caller gone.
    fn run(
        &self,
        leader: &Leader,
        (batch_id, inputs, enqueued): (u64, &[HostTensor], Instant),
        gone: impl Fn() -> bool,
    ) -> Result<Option<EngineOutput>, ModelError> {
        let started = Instant::now();
        self.stats.running.fetch_add(1, Ordering::AcqRel);
        let result = run_batch(
            leader.model.as_ref(),
            leader.comm.as_ref(),
            &self.metrics,
            (batch_id, self.pass_limits),
            inputs,
            gone,
        );
        self.stats.running.fetch_sub(1, Ordering::AcqRel);
        self.stats.batches.fetch_add(1, Ordering::AcqRel);
        let compute_time = started.elapsed();
        let old = self.recent_us.load(Ordering::Relaxed);
        self.recent_us
            .store((old * 7 + micros(compute_time)) / 8, Ordering::Relaxed);
        result.map(|done| {
            done.map(|(outputs, rows)| EngineOutput {
                outputs,
                rows,
                queue_time: started - enqueued,
                compute_time,
            })
        })
    }
}

/// Sends batches to rank 0's model thread. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    capacity: usize,
    stats: Arc<EngineStats>,
    /// Set once the group is ready, and only for a group of one with inline runs on.
    inline: Arc<OnceLock<Arc<Shared>>>,
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
    let inline = Arc::new(OnceLock::new());
    let lend = inline.clone();
    let thread_stats = stats.clone();
    let thread = start_thread("rankway-model", stats.clone(), opts.torch_threads, move |stats| {
        let started = Instant::now();
        let (model, comm) = load()?;
        stats.set_phase(Phase::Warming);
        let warm_started = Instant::now();
        let mut warm = model.prepare(&model.warmup_inputs())?;
        let _warm_output = group::lead_batch(comm.as_ref(), model.as_ref(), 0, &mut warm, &metrics)?;
        let warm_us = micros(warm_started.elapsed());
        let signature = model.signature();
        let world = comm.shard().world;
        tracing::info!(
            model = %signature.name,
            version = %signature.version,
            layout = %signature.shard_layout,
            world_size = world,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "group ready: every rank joined, loaded its shard and ran the warm-up batch"
        );
        let shared = Arc::new(Shared {
            leader: Mutex::new(Leader {
                model,
                comm,
                broken: None,
            }),
            // The warm-up batch is the first estimate; later batches refine it.
            recent_us: AtomicU64::new(warm_us),
            stats: thread_stats,
            metrics,
            pass_limits: opts.pass_limits,
            inline_max: opts.inline_max,
            torch_threads: opts.torch_threads,
        });
        // Only a group of one: elsewhere a forward waits on the other ranks'
        // collectives, for as long as a slow or lost rank takes.
        if world == 1 && !opts.inline_max.is_zero() {
            let _ = lend.set(shared.clone());
        }
        stats.set_signature(signature);
        stats.set_phase(Phase::Ready);
        lead(&shared, &rx, opts.heartbeat)
    })?;
    Ok((
        EngineHandle {
            tx,
            capacity: opts.capacity,
            stats,
            inline,
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

fn lead(shared: &Shared, rx: &mpsc::Receiver<Job>, heartbeat: Duration) -> Result<(), ModelError> {
    let send_header = |h: &Header| group::send_header(shared.lock()?.comm.as_ref(), h);
    loop {
        let Some(job) = next_work(rx, send_header, heartbeat)? else {
            // A failure an inline run left still ends the thread with it at shutdown.
            drop(shared.lock()?);
            return Ok(());
        };
        shared.stats.queued.fetch_sub(1, Ordering::AcqRel);
        if job.reply.is_closed() {
            continue; // the caller went away (or its deadline passed) while the batch waited
        }
        let leader = match shared.lock() {
            Ok(leader) => leader,
            Err(fatal) => {
                let _ = job.reply.send(Err(EngineError::Stopped(fatal.to_string())));
                return Err(fatal);
            }
        };
        let entered = job.span.enter();
        let gone = || job.reply.is_closed();
        let result = shared.run(&leader, (job.batch_id, &job.inputs, job.enqueued), gone);
        drop(entered);
        // Free before answering: the caller's next batch may run inline at once.
        drop(leader);
        match result {
            Ok(None) => {
                shared.metrics.abandoned_batch();
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
        if let Some(done) = self.try_inline(batch_id, &inputs) {
            return done;
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

    /// Runs the batch here, on the calling (gRPC) thread, if inline runs are on, the model
    /// thread is idle with nothing queued, recent batches were short and this one has no
    /// more rows than a pass. `None`: it goes to the model thread.
    fn try_inline(&self, batch_id: u64, inputs: &[HostTensor]) -> Option<Result<EngineOutput, EngineError>> {
        let shared = self.inline.get()?;
        let rows = inputs.first().map_or(0, |t| t.rows().max(0) as usize);
        if self.stats.queued.load(Ordering::Acquire) > 0
            || rows > shared.pass_limits.rows
            || Duration::from_micros(shared.recent_us.load(Ordering::Relaxed)) > shared.inline_max
        {
            return None;
        }
        let mut leader = shared.leader.try_lock().ok()?;
        if leader.broken.is_some() {
            return None;
        }
        INLINE_THREAD.with(|set| {
            if !set.replace(true) {
                tch::set_num_threads(shared.torch_threads.max(1) as i32);
            }
        });
        let _no_grad = tch::no_grad_guard();
        shared.metrics.inline_batch();
        // A short batch: nothing to abandon midway, so the caller's leaving is not checked
        // and the run always answers.
        Some(
            match shared.run(&leader, (batch_id, inputs, Instant::now()), || false) {
                Ok(done) => done.ok_or_else(|| EngineError::Stopped("the batch was abandoned".into())),
                Err(ModelError::InvalidInput(m)) => Err(ModelError::InvalidInput(m).into()),
                Err(fatal) => {
                    // The model thread ends with it at its next wake-up (a batch or a
                    // heartbeat); until then no batch is taken.
                    let why = fatal.to_string();
                    self.stats.fail(why.clone());
                    leader.broken = Some(fatal);
                    Err(EngineError::Stopped(why))
                }
            },
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Architecture;
    use crate::models::mlp::{INPUT, MlpConfig};

    const HIDDEN: i64 = 8;

    /// Rank 0 of a group of one serving a small `mlp`, ready.
    fn leader(inline_max: Duration) -> (EngineHandle, Arc<WorkerMetrics>) {
        let cfg = ModelConfig {
            architecture: Architecture::Mlp(MlpConfig {
                hidden: HIDDEN,
                layers: 1,
                seed: 7,
            }),
            name: "mlp".into(),
            version: "1".into(),
            max_batch_size: 64,
            max_text_bytes: 1024,
            device: tch::Device::Cpu,
        };
        let metrics = Arc::new(WorkerMetrics::new("t", 0, 1));
        let opts = EngineOptions {
            torch_threads: 1,
            capacity: 4,
            heartbeat: Duration::from_millis(50),
            pass_limits: PassLimits {
                rows: 4,
                ..PassLimits::NONE
            },
            inline_max,
        };
        let (engine, _thread) = spawn_leader(single_rank(cfg), opts, metrics.clone()).unwrap();
        let started = Instant::now();
        while !engine.stats().is_ready() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the mlp never got ready"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        (engine, metrics)
    }

    fn rows(n: usize) -> Vec<HostTensor> {
        let values: Vec<f32> = (0..n * HIDDEN as usize).map(|i| (i % 5) as f32 / 5.0).collect();
        vec![HostTensor::f32(INPUT, vec![n as i64, HIDDEN], &values)]
    }

    fn inline_count(metrics: &WorkerMetrics) -> f64 {
        let text = metrics.render(&EngineStats::default());
        let line = text
            .lines()
            .find(|l| l.starts_with("rankway_worker_inline_batches_total{"))
            .unwrap_or_else(|| panic!("no inline counter in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// `batches` calls of `n` rows each, one after another, from a current-thread
    /// runtime, as rank 0's gRPC thread makes them; the last one's outputs.
    fn serve(engine: &EngineHandle, batches: u64, n: usize) -> Vec<HostTensor> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut last = Vec::new();
            for id in 0..batches {
                last = engine.infer(id, rows(n)).await.unwrap().outputs;
            }
            last
        })
    }

    #[test]
    fn short_batches_run_on_the_calling_thread_with_the_model_threads_results() {
        let (inline, inline_metrics) = leader(Duration::from_secs(1));
        let (threaded, threaded_metrics) = leader(Duration::ZERO);
        let ran_inline = serve(&inline, 20, 3);
        let ran_threaded = serve(&threaded, 20, 3);
        assert_eq!(ran_inline, ran_threaded, "the same function on either thread");
        assert!(
            inline_count(&inline_metrics) >= 19.0,
            "a short batch after the warm-up runs inline: {}",
            inline_count(&inline_metrics)
        );
        assert_eq!(
            inline_count(&threaded_metrics),
            0.0,
            "--inline-max 0 turns it off"
        );
        assert_eq!(inline.stats().batches.load(Ordering::Acquire), 20);
    }

    #[test]
    fn a_batch_goes_to_the_model_thread_when_longer_than_a_pass_or_after_slow_batches() {
        let (engine, metrics) = leader(Duration::from_secs(1));
        // Five rows: two passes of at most four.
        let split = serve(&engine, 3, 5);
        assert_eq!(split[0].shape, vec![5, HIDDEN]);
        assert_eq!(inline_count(&metrics), 0.0);
        serve(&engine, 3, 4);
        assert_eq!(inline_count(&metrics), 3.0, "four rows fit one pass");
        // Recent batches slower than the limit: no inline run until they are faster.
        let (slow, slow_metrics) = leader(Duration::from_nanos(1));
        serve(&slow, 3, 1);
        assert_eq!(inline_count(&slow_metrics), 0.0);
    }
}
