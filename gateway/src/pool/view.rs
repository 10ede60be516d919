//! What the gateway knows of a group, as `/admin/groups` shows it.

use std::sync::Arc;

use rankway_proto::worker::{ModelInfo, ModelKind};
use serde::Serialize;

use super::breaker::BreakerState;

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
    pub(super) fn record_error(&mut self, error: String) {
        self.last_error = Some(error);
        self.last_error_at =
            Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
    }
}
