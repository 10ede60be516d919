//! The model thread of a generative group.
//!
//! Rank 0's thread owns the model, its cache shard and the [`Scheduler`]. Between steps
//! it takes new sequences from a bounded channel (each with the sender of its token
//! events), drops sequences whose receiver is gone (the stream was dropped: a client
//! disconnect or a passed deadline), plans the next step, runs it on every rank and
//! sends each sequence its token. When nothing runs it waits for work, sending a
//! heartbeat step every `heartbeat` so a lost rank is noticed. Followers run rank 0's
//! steps. A failed collective ends the thread, and every open stream gets the error.

use clap::ValueEnum;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;

use super::sampling::Sampling;
use super::schedule::{Finish, Limits, Scheduler};
use super::{follow_steps, lead_step};
use crate::collective::Collective;
use crate::engine::{EngineError, ModelThread, next_work, start_thread, track_follower};
use crate::group::Op;
use crate::models::ModelError;
use crate::models::llama::cache::BlockAllocator;
use crate::models::llama::{KvCache, Llama};
use crate::models::{DType, Signature, TensorSpec};
use crate::stats::{EngineStats, GenStats, Phase};

/// How the KV cache holds keys and values (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvCacheDtype {
    /// The step's values exactly.
    Float32,
    /// Half the bytes per cached token; read back as float32 for attention.
    Bfloat16,
}

/// The flag's spelling (`float32`, `bfloat16`), for logs.
impl std::fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => Ok(()),
        }
    }
}

impl KvCacheDtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            KvCacheDtype::Float32 => tch::Kind::Float,
            KvCacheDtype::Bfloat16 => tch::Kind::BFloat16,
        }
    }
}

/// Loads this rank's shard and joins the group; run on the model thread.
pub type GenLoader = Box<dyn FnOnce() -> Result<(Llama, Box<dyn Collective>), ModelError> + Send>;

#[derive(Debug, Clone, Copy)]
pub struct GenOptions {
    pub torch_threads: usize,
    pub heartbeat: Duration,
    pub limits: Limits,
    /// KV cache size in tokens (rounded down to whole blocks).
    pub kv_tokens: usize,
    pub block_size: usize,
    /// How the cache holds keys and values (`--kv-cache-dtype`).
    pub kv_cache_dtype: KvCacheDtype,
}

impl GenOptions {
    fn blocks(&self) -> usize {
        self.kv_tokens / self.block_size
    }
}

/// What a sequence's stream receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Token(u32),
    /// The last token was the end of the sequence.
    Finished(Finish),
    /// The group broke; the sequence is lost.
    Failed(String),
}

struct Submit {
    prompt: Vec<u32>,
    sampling: Sampling,
    events: UnboundedSender<Event>,
    accepted: oneshot::Sender<Result<(), ModelError>>,
}

/// Submits sequences to rank 0's model thread. Cheap to clone.
#[derive(Clone)]
pub struct GenHandle {
    tx: SyncSender<Submit>,
    stats: Arc<EngineStats>,
    gen_stats: Arc<GenStats>,
}

impl GenHandle {
    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    pub fn gen_stats(&self) -> &Arc<GenStats> {
        &self.gen_stats
    }

    /// Queues a sequence; its tokens arrive on the returned receiver. Refused at once
    /// (invalid, can never fit, queue full) with the scheduler's reason. Dropping the
    /// receiver cancels the sequence at the next step.
    pub async fn submit(
        &self,
        prompt: Vec<u32>,
        sampling: Sampling,
    ) -> Result<UnboundedReceiver<Event>, EngineError> {
        if !self.stats.is_ready() {
            return Err(EngineError::NotReady(self.stats.not_ready_reason()));
        }
        let (events, rx) = unbounded_channel();
        let (accepted, accepted_rx) = oneshot::channel();
        let submit = Submit {
            prompt,
            sampling,
            events,
            accepted,
        };
        if let Err(e) = self.tx.try_send(submit) {
            return Err(match e {
                TrySendError::Full(_) => EngineError::Model(ModelError::Busy(
                    "too many sequences are being submitted to this group; retry later".into(),
                )),
                // The model thread is gone: the sequence never started (the gateway may
                // send it to another group).
                TrySendError::Disconnected(_) => EngineError::NotReady(self.stats.not_ready_reason()),
            });
        }
        accepted_rx
            .await
            .map_err(|_| EngineError::NotReady(self.stats.not_ready_reason()))??;
        Ok(rx)
    }
}

/// The signature a generative model is listed with: text in, text out.
fn signature(model: &Llama, name: String, version: String, max_running: usize) -> Signature {
    let cfg = &model.cfg;
    let world = model.shard().world as i64;
    let text = |name: &str| TensorSpec {
        name: name.into(),
        dtype: DType::Bytes,
        shape: vec![1],
    };
    Signature {
        name,
        version,
        platform: "tch-llama".into(),
        inputs: vec![text("text_input")],
        outputs: vec![text("text_output")],
        shard_layout: format!(
            "tp={world} heads/rank={} kv_heads/rank={} ffn/rank={}",
            cfg.heads / world,
            cfg.kv_heads / world,
            cfg.ffn / world
        ),
        max_batch_size: max_running as u32,
    }
}

/// Starts rank 0's model thread: join, load, run a warm-up step on every rank, then
/// schedule sequences from the returned handle. Dropping every handle shuts the group
/// down cleanly.
pub fn spawn_leader(
    load: GenLoader,
    opts: GenOptions,
    eos: u32,
    name: String,
    version: String,
) -> std::io::Result<(GenHandle, ModelThread)> {
    // Submissions wait here only until the next step boundary.
    let (tx, rx) = mpsc::sync_channel::<Submit>(opts.limits.max_waiting.max(1));
    let stats = Arc::new(EngineStats::default());
    let gen_stats = Arc::new(GenStats::default());
    let shared = gen_stats.clone();
    let thread = start_thread("rankway-model", stats.clone(), opts.torch_threads, move |stats| {
        let started = Instant::now();
        let (model, comm) = load()?;
        stats.set_phase(Phase::Warming);
        let mut cache = model.new_cache(opts.blocks(), opts.block_size, opts.kv_cache_dtype.kind());
        let limits = Limits {
            context: opts.limits.context.min(model.cfg.context),
            ..opts.limits
        };
        let alloc = BlockAllocator::new(opts.blocks(), opts.block_size);
        let mut sched = Scheduler::new(limits, alloc, eos);
        // Warm-up: one short prefill on every rank.
        sched.submit(0, vec![1, 2, 3], Sampling::greedy(1))?;
        let step = sched
            .plan(cache.padding_row())
            .expect("the warm-up sequence runs");
        let logits = lead_step(&model, comm.as_ref(), &mut cache, 0, step)?;
        sched.finish_step(&logits)?;
        sched.cancel(0);
        (sched.steps, sched.shared_steps) = (0, 0);
        shared.context.store(limits.context, Ordering::Release);
        shared
            .total_kv_tokens
            .store(sched.free_tokens(), Ordering::Release);
        shared
            .free_kv_tokens
            .store(sched.free_tokens(), Ordering::Release);
        let signature = signature(&model, name, version, limits.max_running);
        tracing::info!(
            model = %signature.name,
            layout = %signature.shard_layout,
            world_size = comm.shard().world,
            kv_cache_tokens = sched.free_tokens(),
            kv_cache_mib = cache.bytes() >> 20,
            kv_cache_dtype = %opts.kv_cache_dtype,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "generative group ready: every rank joined, loaded its shard and ran the warm-up step"
        );
        stats.set_signature(signature);
        stats.set_phase(Phase::Ready);
        lead(
            &model,
            comm.as_ref(),
            &mut cache,
            &mut sched,
            &rx,
            &shared,
            opts.heartbeat,
        )
    })?;
    Ok((GenHandle { tx, stats, gen_stats }, thread))
}

/// Starts a follower's model thread: join, load, then run rank 0's steps.
pub fn spawn_follower(load: GenLoader, opts: GenOptions) -> std::io::Result<(Arc<EngineStats>, ModelThread)> {
    let stats = Arc::new(EngineStats::default());
    let thread = start_thread("rankway-model", stats.clone(), opts.torch_threads, move |stats| {
        let (model, comm) = load()?;
        stats.set_phase(Phase::Warming);
        let mut cache = model.new_cache(opts.blocks(), opts.block_size, opts.kv_cache_dtype.kind());
        let rank = comm.shard().rank;
        follow_steps(
            &model,
            comm.as_ref(),
            &mut cache,
            track_follower(stats, rank, Op::Step),
        )?;
        tracing::info!(rank, "rank 0 shut the group down");
        Ok(())
    })?;
    Ok((stats, thread))
}

fn lead(
    model: &Llama,
    comm: &dyn Collective,
    cache: &mut KvCache,
    sched: &mut Scheduler,
    rx: &mpsc::Receiver<Submit>,
    stats: &GenStats,
    heartbeat: Duration,
) -> Result<(), ModelError> {
    let mut streams: HashMap<u64, UnboundedSender<Event>> = HashMap::new();
    let mut next_id = 0u64;
    let mut step_id = 0u64;
    let mut admit = |s: Submit, sched: &mut Scheduler, streams: &mut HashMap<u64, _>| {
        next_id += 1;
        let result = sched.submit(next_id, s.prompt, s.sampling);
        if result.is_ok() {
            streams.insert(next_id, s.events);
        }
        let _ = s.accepted.send(result);
    };
    loop {
        // Take what was submitted; wait only when nothing runs.
        if sched.is_idle() {
            match next_work(rx, |h| crate::group::send_header(comm, h), heartbeat)? {
                Some(s) => admit(s, sched, &mut streams),
                None => return Ok(()),
            }
        }
        while let Ok(s) = rx.try_recv() {
            admit(s, sched, &mut streams);
        }
        // Streams dropped by their callers leave now and free their cache.
        streams.retain(|&id, tx| {
            let gone = tx.is_closed();
            if gone {
                sched.cancel(id);
            }
            !gone
        });
        let Some(step) = sched.plan(cache.padding_row()) else {
            publish(sched, stats);
            continue;
        };
        step_id += 1;
        let prompt_tokens = sched.prefill_tokens as u64;
        let emitted =
            lead_step(model, comm, cache, step_id, step).and_then(|logits| sched.finish_step(&logits));
        let emitted = match emitted {
            Ok(e) => e,
            Err(fatal) => {
                for tx in streams.values() {
                    let _ = tx.send(Event::Failed(fatal.to_string()));
                }
                return Err(fatal);
            }
        };
        stats.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        stats
            .generated_tokens
            .fetch_add(emitted.len() as u64, Ordering::Relaxed);
        // The load first, then the tokens: a client that has a stream's token finds the
        // step that made it in GroupStatus.
        publish(sched, stats);
        for e in emitted {
            let Some(tx) = streams.get(&e.id) else { continue };
            let _ = tx.send(Event::Token(e.token));
            if let Some(finish) = e.finish {
                let _ = tx.send(Event::Finished(finish));
                streams.remove(&e.id);
            }
        }
    }
}

fn publish(sched: &Scheduler, stats: &GenStats) {
    stats.running.store(sched.running(), Ordering::Release);
    stats.waiting.store(sched.waiting(), Ordering::Release);
    stats.free_kv_tokens.store(sched.free_tokens(), Ordering::Release);
    stats.steps.store(sched.steps, Ordering::Release);
    stats.shared_steps.store(sched.shared_steps, Ordering::Release);
}
