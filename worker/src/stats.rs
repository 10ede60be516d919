//! What a rank's model thread tells the servers about itself: phase, counters, the
//! loaded model's signature, and why it failed. Written by the model thread, read by
//! gRPC (GroupStatus, health) and by the metrics.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use crate::models::Signature;

/// Where a rank is in its group's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Waiting for every rank to join the process group.
    Joining = 1,
    /// Loading the shard and running the warm-up batch.
    Warming = 2,
    Ready = 3,
    /// A collective failed (or the model could not load): the rank is exiting.
    Broken = 4,
    /// The model thread ended cleanly.
    Stopped = 5,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Phase::Joining,
            2 => Phase::Warming,
            3 => Phase::Ready,
            4 => Phase::Broken,
            _ => Phase::Stopped,
        }
    }
}

/// State shared between the model thread and the servers.
#[derive(Debug)]
pub struct EngineStats {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    pub batches: AtomicUsize,
    phase: AtomicU8,
    signature: OnceLock<Signature>,
    failure: OnceLock<String>,
}

impl Default for EngineStats {
    fn default() -> Self {
        Self {
            queued: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            batches: AtomicUsize::new(0),
            phase: AtomicU8::new(Phase::Joining as u8),
            signature: OnceLock::new(),
            failure: OnceLock::new(),
        }
    }
}

impl EngineStats {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }
    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Ready
    }
    /// Whether this rank serves: ready (on rank 0, the whole group complete and warm) and
    /// not `draining`. `grpc.health.v1` and the metrics port's `/health/ready` both
    /// answer it.
    pub fn serving(&self, draining: bool) -> bool {
        self.is_ready() && !draining
    }
    /// The loaded model's signature, once it is loaded.
    pub fn signature(&self) -> Option<&Signature> {
        self.signature.get()
    }
    pub fn set_signature(&self, signature: Signature) {
        let _ = self.signature.set(signature);
    }
    /// Why the group broke or the model could not load, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
    /// Records the failure that ends this rank (the first one wins) and marks it broken.
    pub fn fail(&self, why: String) {
        let _ = self.failure.set(why);
        self.set_phase(Phase::Broken);
    }
    /// Why this rank is not ready, for GroupStatus and health.
    pub fn not_ready_reason(&self) -> String {
        match (self.phase(), self.failure()) {
            (_, Some(why)) => format!("group broken: {why}"),
            (Phase::Joining, _) => "waiting for every rank to join the group".into(),
            (Phase::Warming, _) => "loading the model shard and warming up on every rank".into(),
            (Phase::Ready, _) => String::new(),
            _ => "stopped".into(),
        }
    }
}

/// Rank 0 of a generative group: its scheduler's load and counters, for GroupStatus
/// and the metrics.
#[derive(Debug, Default)]
pub struct GenStats {
    pub context: AtomicUsize,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub free_kv_tokens: AtomicUsize,
    pub total_kv_tokens: AtomicUsize,
    pub steps: AtomicU64,
    pub shared_steps: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
}
