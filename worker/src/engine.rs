//! The model thread: libtorch work runs here, never on the tokio reactor.
//!
//! A bounded channel feeds one dedicated OS thread that owns the model. Callers get a
//! [`EngineHandle`]; a full channel is refused at once rather than queued without bound.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rankway_proto::worker::{ModelInfo, Tensor as WireTensor};
use tokio::sync::oneshot;

use crate::dist::Collective;
use crate::models::{Model, ModelError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("worker queue is full ({0} batches waiting); retry later")]
    Overloaded(usize),
    #[error("batch deadline expired {0:?} before it could run")]
    DeadlineExceeded(Duration),
    #[error("model is not ready: {0}")]
    NotReady(String),
    #[error("the model thread has stopped")]
    Stopped,
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The result of one batch.
#[derive(Debug)]
pub struct EngineOutput {
    pub outputs: Vec<WireTensor>,
    pub rows: usize,
    pub queue_time: Duration,
    pub compute_time: Duration,
}

struct Job {
    inputs: Vec<WireTensor>,
    deadline: Option<Instant>,
    enqueued: Instant,
    reply: oneshot::Sender<Result<EngineOutput, EngineError>>,
}

/// Counters shared between the model thread and the server.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    pub batches: AtomicUsize,
    ready: AtomicBool,
    info: OnceLock<ModelInfo>,
    failure: OnceLock<String>,
}

impl EngineStats {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
    pub fn info(&self) -> Option<&ModelInfo> {
        self.info.get()
    }
    /// Why the model could not be loaded or warmed up, if it could not.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

/// Sends batches to the model thread. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    capacity: usize,
    stats: Arc<EngineStats>,
}

/// Loads a model and runs one batch on it; what the thread calls at start.
pub type Loader = Box<dyn FnOnce() -> Result<(Box<dyn Model>, Box<dyn Collective>), ModelError> + Send>;

/// Starts the model thread. `load` runs on that thread, followed by one warm-up batch;
/// only then does [`EngineStats::is_ready`] turn true.
pub fn spawn(
    load: Loader,
    torch_threads: usize,
    capacity: usize,
) -> std::io::Result<(EngineHandle, JoinHandle<Result<(), ModelError>>)> {
    let (tx, rx) = mpsc::sync_channel::<Job>(capacity);
    let stats = Arc::new(EngineStats::default());
    let thread_stats = stats.clone();
    let thread = std::thread::Builder::new()
        .name("rankway-model".into())
        .spawn(move || {
            let stats = thread_stats;
            let result = run(load, torch_threads, &stats, rx);
            if let Err(e) = &result {
                let _ = stats.failure.set(e.to_string());
            }
            stats.ready.store(false, Ordering::Release);
            result
        })?;
    Ok((EngineHandle { tx, capacity, stats }, thread))
}

fn run(
    load: Loader,
    torch_threads: usize,
    stats: &EngineStats,
    rx: mpsc::Receiver<Job>,
) -> Result<(), ModelError> {
    tch::set_num_threads(torch_threads.max(1) as i32);
    let _no_grad = tch::no_grad_guard();
    let started = Instant::now();
    let (model, comm) = load()?;
    let warm = model.prepare(&model.warmup_inputs())?;
    let _warm_output = model.forward(&warm, comm.as_ref())?;
    let _ = stats.info.set(model.info());
    stats.ready.store(true, Ordering::Release);
    tracing::info!(
        model = %model.info().name,
        layout = %model.info().shard_layout,
        torch_threads,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded and warmed up"
    );

    while let Ok(job) = rx.recv() {
        stats.queued.fetch_sub(1, Ordering::AcqRel);
        if job.reply.is_closed() {
            continue; // the caller went away while the batch waited
        }
        let now = Instant::now();
        if let Some(deadline) = job.deadline.filter(|d| *d <= now) {
            let _ = job.reply.send(Err(EngineError::DeadlineExceeded(now - deadline)));
            continue;
        }
        stats.running.fetch_add(1, Ordering::AcqRel);
        let result =
            run_batch(model.as_ref(), comm.as_ref(), &job.inputs).map(|(outputs, rows)| EngineOutput {
                outputs,
                rows,
                queue_time: now - job.enqueued,
                compute_time: now.elapsed(),
            });
        stats.running.fetch_sub(1, Ordering::AcqRel);
        stats.batches.fetch_add(1, Ordering::AcqRel);
        // A failed collective leaves the group unusable: report it and stop serving.
        let fatal = matches!(
            &result,
            Err(ModelError::Collective(_)) | Err(ModelError::Torch(_))
        );
        let err_text = result.as_ref().err().map(|e| e.to_string());
        let _ = job.reply.send(result.map_err(EngineError::from));
        if fatal {
            return Err(ModelError::Load(err_text.unwrap_or_default()));
        }
    }
    Ok(())
}

fn run_batch(
    model: &dyn Model,
    comm: &dyn Collective,
    inputs: &[WireTensor],
) -> Result<(Vec<WireTensor>, usize), ModelError> {
    let batch = model.prepare(inputs)?;
    let output = model.forward(&batch, comm)?;
    Ok((model.outputs(&batch, output)?, batch.rows))
}

impl EngineHandle {
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    /// Queues a batch and waits for its result without blocking the reactor.
    pub async fn infer(
        &self,
        inputs: Vec<WireTensor>,
        deadline: Option<Instant>,
    ) -> Result<EngineOutput, EngineError> {
        if !self.stats.is_ready() {
            let why = self.stats.failure().unwrap_or("still loading").to_owned();
            return Err(EngineError::NotReady(why));
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            inputs,
            deadline,
            enqueued: Instant::now(),
            reply,
        };
        self.stats.queued.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::AcqRel);
                return Err(EngineError::Overloaded(self.capacity));
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::AcqRel);
                return Err(EngineError::Stopped);
            }
        }
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Runs a batch from a blocking context (the `bench` command).
    pub fn infer_blocking(&self, inputs: Vec<WireTensor>) -> Result<EngineOutput, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.stats.queued.fetch_add(1, Ordering::AcqRel);
        self.tx
            .send(Job {
                inputs,
                deadline: None,
                enqueued: Instant::now(),
                reply,
            })
            .map_err(|_| EngineError::Stopped)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)?
    }
}
