//! Rank 0's iteration-level scheduler: which sequences run in the next step.
//!
//! Sequences wait in a bounded queue. Before each step the scheduler admits waiting
//! sequences, oldest first, while the step's token budget (`max_batch_tokens`: every
//! admitted prompt plus one token per running sequence), the running-sequence limit and
//! the cache allow. A step runs the prefill of the admitted sequences and one decode
//! token of every running one; after it, each sequence samples its next token, and the
//! ones that finished leave and return their cache blocks. No sequence waits for another
//! to finish.
//!
//! Cache policy: a sequence is admitted only when the cache can hold its prompt plus its
//! `max_tokens`, and those blocks are its own until it ends. A running sequence can then
//! never run out of cache, so nothing is ever preempted or recomputed; the price is that
//! a sequence stopping early (end of text, a stop) held blocks it did not use. One whose
//! prompt plus `max_tokens` exceeds the context or the whole cache is refused at once.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use super::Step;
use super::cache::BlockAllocator;
use crate::models::ModelError;

/// How one sequence picks its tokens and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities sum to `top_p`.
    pub top_p: f32,
    pub seed: Option<u64>,
}

impl Sampling {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
        }
    }

    pub fn validate(&self, context: usize) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::InvalidInput(m));
        if self.max_tokens == 0 || self.max_tokens > context {
            return bad(format!(
                "max_tokens {} must be between 1 and the context length {context}",
                self.max_tokens
            ));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature {} must be 0 (greedy) or positive",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model ended its answer.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

/// What one sequence did in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    pub id: u64,
    pub token: u32,
    pub finish: Option<Finish>,
}

struct Sequence {
    id: u64,
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    cached: usize,
    blocks: Vec<u32>,
    sampling: Sampling,
    rng: StdRng,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_batch_tokens: usize,
    pub max_running: usize,
    pub max_waiting: usize,
    pub context: usize,
}

pub struct Scheduler {
    limits: Limits,
    alloc: BlockAllocator,
    eos: u32,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Sequences of the step in flight, in the order of its `seqs` rows.
    in_step: Vec<usize>,
    pub steps: u64,
    /// Steps that computed more than one sequence.
    pub shared_steps: u64,
    /// Prompt tokens in the step last planned.
    pub prefill_tokens: usize,
}

impl Scheduler {
    pub fn new(limits: Limits, alloc: BlockAllocator, eos: u32) -> Self {
        Self {
            limits,
            alloc,
            eos,
            waiting: VecDeque::new(),
            running: Vec::new(),
            in_step: Vec::new(),
            steps: 0,
            shared_steps: 0,
            prefill_tokens: 0,
        }
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn free_tokens(&self) -> usize {
        self.alloc.free_tokens()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queues a sequence, or refuses one that could never run or finds the queue full.
    pub fn submit(&mut self, id: u64, prompt: Vec<u32>, sampling: Sampling) -> Result<(), ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::InvalidInput("the prompt is empty".into()));
        }
        sampling.validate(self.limits.context)?;
        let need = prompt.len() + sampling.max_tokens;
        if need > self.limits.context {
            return Err(ModelError::InvalidInput(format!(
                "{} prompt tokens plus max_tokens {} exceed the context length {}",
                prompt.len(),
                sampling.max_tokens,
                self.limits.context
            )));
        }
        if need > self.alloc.total_tokens() || prompt.len() > self.limits.max_batch_tokens {
            return Err(ModelError::InvalidInput(format!(
                "{} prompt tokens plus max_tokens {} can never fit this group (KV cache {} tokens, \
                 at most {} prompt tokens per step)",
                prompt.len(),
                sampling.max_tokens,
                self.alloc.total_tokens(),
                self.limits.max_batch_tokens
            )));
        }
        if self.waiting.len() >= self.limits.max_waiting {
            return Err(ModelError::Busy(format!(
                "{} sequences already wait for this group",
                self.waiting.len()
            )));
        }
        let rng = match sampling.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        self.waiting.push_back(Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            cached: 0,
            blocks: Vec::new(),
            sampling,
            rng,
        });
        Ok(())
    }

    /// Ends sequence `id` wherever it is, returning its blocks. False if unknown.
    pub fn cancel(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            return true;
        }
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let mut s = self.running.swap_remove(i);
            self.alloc.release(&mut s.blocks);
            return true;
        }
        false
    }

    /// Admits what fits and lays out the next step; `None` when nothing runs.
    pub fn plan(&mut self, padding_row: i64) -> Option<Step> {
        let mut budget = self.limits.max_batch_tokens.saturating_sub(self.running.len());
        while let Some(next) = self.waiting.front() {
            let need = next.prompt_len + next.sampling.max_tokens;
            if self.running.len() >= self.limits.max_running
                || next.prompt_len > budget
                || self.alloc.blocks_for(need) > self.alloc.free_blocks()
            {
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            assert!(self.alloc.grow(&mut seq.blocks, need), "counted free blocks");
            budget -= seq.prompt_len;
            self.running.push(seq);
        }
        if self.running.is_empty() {
            return None;
        }
        let (mut tokens, mut seqs, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        self.prefill_tokens = 0;
        let longest = self
            .running
            .iter()
            .map(|s| s.tokens.len())
            .max()
            .expect("non-empty");
        self.in_step.clear();
        for (i, s) in self.running.iter().enumerate() {
            let start = tokens.len() / 3;
            let new = &s.tokens[s.cached..];
            if s.cached == 0 {
                self.prefill_tokens += new.len();
            }
            for (k, &t) in new.iter().enumerate() {
                let pos = s.cached + k;
                tokens.extend([i64::from(t), pos as i64, self.alloc.row(&s.blocks, pos)]);
            }
            let ctx = s.tokens.len();
            seqs.extend([start as i64, new.len() as i64, ctx as i64]);
            rows.extend((0..longest).map(|p| {
                if p < ctx {
                    self.alloc.row(&s.blocks, p)
                } else {
                    padding_row
                }
            }));
            self.in_step.push(i);
        }
        let n = (tokens.len() / 3) as i64;
        let s = self.running.len() as i64;
        // [tokens, 3] laid out by token, sent as [3, tokens].
        let tokens = Tensor::from_slice(&tokens).view([n, 3]).tr().contiguous();
        Some(Step {
            tokens,
            seqs: Tensor::from_slice(&seqs).view([s, 3]),
            rows: Tensor::from_slice(&rows).view([s, longest as i64]),
        })
    }

    /// Takes the step's logits (`[sequences, vocab]`, rank 0), samples each sequence's
    /// next token and retires the finished ones.
    pub fn finish_step(&mut self, logits: &Tensor) -> Result<Vec<Emitted>, ModelError> {
        self.steps += 1;
        if self.in_step.len() > 1 {
            self.shared_steps += 1;
        }
        let logits = logits.to_device(Device::Cpu).to_kind(Kind::Float);
        let greedy = Vec::<i64>::try_from(logits.argmax(-1, false))?;
        let mut emitted = Vec::with_capacity(self.in_step.len());
        for (row, &i) in self.in_step.iter().enumerate() {
            let s = &mut self.running[i];
            s.cached = s.tokens.len();
            let token = if s.sampling.temperature == 0.0 {
                greedy[row] as u32
            } else {
                let row_logits = Vec::<f32>::try_from(logits.get(row as i64))?;
                sample(&row_logits, &s.sampling, &mut s.rng)
            };
            s.tokens.push(token);
            let finish = if token == self.eos {
                Some(Finish::Stop)
            } else if s.generated() >= s.sampling.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            emitted.push(Emitted {
                id: s.id,
                token,
                finish,
            });
        }
        self.in_step.clear();
        // The sequences that just finished leave, and their blocks come back.
        let finished: Vec<u64> = emitted
            .iter()
            .filter(|e| e.finish.is_some())
            .map(|e| e.id)
            .collect();
        let alloc = &mut self.alloc;
        self.running.retain_mut(|s| {
            let done = finished.contains(&s.id);
            if done {
                alloc.release(&mut s.blocks);
            }
            !done
        });
        Ok(emitted)
    }
}

/// Temperature and nucleus sampling over one row of logits.
fn sample(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> u32 {
    let t = sampling.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut keep = total;
    if sampling.top_p < 1.0 {
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let mut acc = 0.0;
        let cut = probs
            .iter()
            .position(|p| {
                acc += p.1;
                acc >= sampling.top_p * total
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(cut);
        keep = acc.min(total);
    }
    let mut x = rng.random::<f32>() * keep;
    for &(id, p) in &probs {
        if x < p {
            return id;
        }
        x -= p;
    }
    probs.last().map_or(0, |p| p.0)
}
