//! The model-thread kernel both engines share (the embedding engine, [`embedding`], and
//! the generative one, `crate::generate::engine`): libtorch work runs on one dedicated
//! OS thread, never on the tokio reactor. Rank 0's thread sends a heartbeat step when
//! idle for `heartbeat`, so a lost rank is noticed within one interval; the other ranks
//! follow rank 0's steps. Any failed collective ends the thread with an error: the group
//! is broken.

pub mod embedding;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::group::{Header, Op};
use crate::models::ModelError;
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

/// `d` in µs, capped so that a moving average of them cannot overflow.
pub(crate) fn micros(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128 / 8) as u64
}

/// The model thread; it ends with the group's failure, if the group broke.
pub type ModelThread = JoinHandle<Result<(), ModelError>>;

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

/// Rank 0 when idle: waits for work, sending a heartbeat step every `heartbeat`. `None`
/// once the server is gone, after releasing the followers with a clean exit.
pub(crate) fn next_work<T>(
    rx: &mpsc::Receiver<T>,
    send_header: impl Fn(&Header) -> Result<(), ModelError>,
    heartbeat: Duration,
) -> Result<Option<T>, ModelError> {
    loop {
        match rx.recv_timeout(heartbeat) {
            Ok(work) => return Ok(Some(work)),
            Err(RecvTimeoutError::Timeout) => send_header(&Header::control(Op::Heartbeat))?,
            Err(RecvTimeoutError::Disconnected) => {
                let _ = send_header(&Header::control(Op::Shutdown));
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
