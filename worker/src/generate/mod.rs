//! Generative groups: rank 0 schedules each step ([`schedule`]),
//! sends it to every rank as `Op::Step`, and every rank computes its shard of it
//! against its own part of the KV cache. Followers receive the token ids, positions and
//! cache rows, never the text, and decide nothing.

use tch::Tensor;

use crate::collective::Collective;
use crate::group::{self, Header, Op};
use crate::models::ModelError;
use crate::models::llama::{KvCache, Llama, Step};

/// Rank 0: runs `step` on the whole group; returns the logits of each sequence's last
/// token, `[sequences, vocab]`.
pub fn lead_step(
    model: &Llama,
    comm: &dyn Collective,
    cache: &mut KvCache,
    step_id: u64,
    step: Step,
) -> Result<Tensor, ModelError> {
    let span = tracing::debug_span!("step", rank = 0, step_id);
    let _entered = span.enter();
    let mut tensors: Vec<Tensor> = step
        .into_tensors()
        .into_iter()
        .map(|t| t.to_device(comm.device()))
        .collect();
    group::send_work(
        comm,
        Op::Step,
        step_id,
        &mut tensors,
        rankway_runtime::telemetry::TraceParent::of(&span),
    )?;
    let step = Step::from_tensors(tensors)?;
    model
        .step(&step, cache, comm)?
        .ok_or_else(|| ModelError::Load("rank 0 computed no logits".into()))
}

/// Followers: compute rank 0's steps until it shuts down (Ok) or a collective fails.
pub fn follow_steps(
    model: &Llama,
    comm: &dyn Collective,
    cache: &mut KvCache,
    on_step: impl FnMut(&Header),
) -> Result<(), ModelError> {
    group::follow_with(comm, Op::Step, on_step, |tensors| {
        model.step(&Step::from_tensors(tensors)?, cache, comm).map(drop)
    })
}

pub mod bench;
pub mod engine;
pub mod sampling;
pub mod schedule;
pub mod service;
pub mod text;

#[cfg(test)]
mod tests;
