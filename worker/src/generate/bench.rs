//! `rankway-worker bench --model smollm2`: in-process generation throughput, the ceiling
//! for the gateway. Rank 0 runs in this thread; with `--world 3` two more ranks run in
//! threads of this process over a real c10d Gloo group on loopback (each rank gets
//! cores / world libtorch threads, as `launch` gives ranks sharing a host).
//!
//! Prefill: one step holding 8 prompts of 64 tokens. Decode: `n` sequences of 32 prompt
//! tokens each generate `--max-tokens` tokens (end-of-text disabled, so every sequence
//! runs to its length); only steps with no prefill are timed.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::sampling::Sampling;
use super::schedule::{Limits, Scheduler};
use super::{follow_steps, lead_step};
use crate::collective::c10d::{Backend, JoinOptions, ProcessGroup};
use crate::collective::{Collective, Shard, SingleRank};
use crate::config::BenchArgs;
use crate::group::{self, Header, Op};
use crate::models::ModelError;
use crate::models::llama::cache::BlockAllocator;
use crate::models::llama::{KvCache, Llama};

const BLOCK: usize = 16;

#[derive(Debug, Serialize)]
pub struct GenBenchRow {
    pub world: usize,
    /// The matrices' type: "float32" or "bfloat16".
    pub dtype: &'static str,
    /// "prefill" or "decode".
    pub phase: &'static str,
    pub sequences: usize,
    pub tokens: u64,
    pub steps: u64,
    pub tokens_per_sec: f64,
    pub ms_per_step: f64,
}

fn prompt(seed: usize, len: usize) -> Vec<u32> {
    // Ordinary vocabulary ids (past the 17 control tokens), different per sequence.
    (0..len)
        .map(|i| 100 + ((seed * 7919 + i * 104_729) % 40_000) as u32)
        .collect()
}

struct Bench<'a> {
    model: &'a Llama,
    comm: &'a dyn Collective,
    cache: KvCache,
    blocks: usize,
    step_id: u64,
}

impl Bench<'_> {
    fn scheduler(&self) -> Scheduler {
        let limits = Limits {
            max_batch_tokens: 4096,
            max_running: 256,
            max_waiting: 256,
            context: self.model.cfg.context,
        };
        // No end-of-text token: every sequence runs to max_tokens.
        Scheduler::new(limits, BlockAllocator::new(self.blocks, BLOCK), u32::MAX)
    }

    /// Runs `prompts` to the end; returns (tokens, steps, time) of the timed steps:
    /// steps with prompt tokens when `prefill`, the others otherwise.
    fn run(
        &mut self,
        prompts: Vec<Vec<u32>>,
        max_tokens: usize,
        prefill: bool,
    ) -> Result<(u64, u64, Duration), ModelError> {
        let mut sched = self.scheduler();
        for (i, p) in prompts.into_iter().enumerate() {
            sched.submit(i as u64, p, Sampling::greedy(max_tokens))?;
        }
        let (mut tokens, mut steps, mut time) = (0, 0, Duration::ZERO);
        while let Some(step) = sched.plan(self.cache.padding_row()) {
            let (new_prompt, decodes) = (sched.prefill_tokens, sched.running());
            self.step_id += 1;
            let started = Instant::now();
            let logits = lead_step(self.model, self.comm, &mut self.cache, self.step_id, step)?;
            sched.finish_step(&logits)?;
            let took = started.elapsed();
            if prefill == (new_prompt > 0) {
                tokens += if prefill {
                    new_prompt as u64
                } else {
                    decodes as u64
                };
                steps += 1;
                time += took;
            }
        }
        Ok((tokens, steps, time))
    }
}

fn row(
    model: &Llama,
    phase: &'static str,
    sequences: usize,
    (tokens, steps, time): (u64, u64, Duration),
) -> GenBenchRow {
    let secs = time.as_secs_f64().max(1e-9);
    GenBenchRow {
        world: model.shard().world,
        dtype: model.weights().name(),
        phase,
        sequences,
        tokens,
        steps,
        tokens_per_sec: tokens as f64 / secs,
        ms_per_step: secs * 1e3 / steps.max(1) as f64,
    }
}

/// Cache blocks for the largest run, the same on every rank.
fn cache_blocks(args: &BenchArgs) -> usize {
    let longest = *args.batch_sizes.iter().max().unwrap_or(&1);
    (longest.max(8) * (64 + args.max_tokens)).div_ceil(BLOCK) + 8
}

/// Rank 0's part: warm up, then measure.
fn lead(model: &Llama, comm: &dyn Collective, args: &BenchArgs) -> Result<Vec<GenBenchRow>, ModelError> {
    let blocks = cache_blocks(args);
    let mut b = Bench {
        model,
        comm,
        cache: model.new_cache(blocks, BLOCK, args.model.generation.kv_cache_dtype.kind()),
        blocks,
        step_id: 0,
    };
    b.run(vec![prompt(0, 8)], 2, false)?; // warm-up
    let mut rows = vec![row(
        model,
        "prefill",
        8,
        b.run((0..8).map(|s| prompt(s, 64)).collect(), 1, true)?,
    )];
    for &n in &args.batch_sizes {
        let prompts = (0..n).map(|s| prompt(s, 32)).collect();
        rows.push(row(model, "decode", n, b.run(prompts, args.max_tokens, false)?));
    }
    group::send_header(comm, &Header::control(Op::Shutdown))?;
    Ok(rows)
}

pub fn run(args: &BenchArgs) -> Result<Vec<GenBenchRow>, ModelError> {
    let cfg = args.model.config();
    let crate::models::Architecture::Llama { gguf, weights } = cfg.architecture else {
        return Err(ModelError::Load(
            "the generation bench needs a generative model".into(),
        ));
    };
    let world = args.world as usize;
    let threads = args.model.torch_threads(world);
    if world == 1 {
        tch::set_num_threads(threads as i32);
        let model = Llama::load(&gguf, Shard::SINGLE, cfg.device, weights)?;
        return lead(&model, &SingleRank(cfg.device), args);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| ModelError::Load(format!("no free port for the bench group: {e}")))?
        .port();
    let blocks = cache_blocks(args);
    let kv_kind = args.model.generation.kv_cache_dtype.kind();
    let join = move |rank: usize| -> Result<(Llama, ProcessGroup), ModelError> {
        tch::set_num_threads(threads as i32);
        let shard = Shard { rank, world };
        let model = Llama::load(&gguf, shard, cfg.device, weights)?;
        let pg = ProcessGroup::join(&JoinOptions {
            master_addr: "127.0.0.1".into(),
            master_port: port,
            shard,
            backend: Backend::Gloo,
            device: cfg.device,
            store_timeout: Duration::from_secs(60),
            collective_timeout: Duration::from_secs(300),
            iface: String::new(),
            host: "127.0.0.1".into(),
        })?;
        Ok((model, pg))
    };
    let followers: Vec<_> = (1..world)
        .map(|rank| {
            let join = join.clone();
            std::thread::spawn(move || -> Result<(), ModelError> {
                let _guard = tch::no_grad_guard();
                let (model, pg) = join(rank)?;
                let mut cache = model.new_cache(blocks, BLOCK, kv_kind);
                follow_steps(&model, &pg, &mut cache, |_| {})
            })
        })
        .collect();
    let (model, pg) = join(0)?;
    let rows = lead(&model, &pg, args);
    for f in followers {
        f.join()
            .map_err(|_| ModelError::Load("a bench rank panicked".into()))??;
    }
    rows
}
