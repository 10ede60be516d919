//! Rank 0's iteration-level scheduler: which sequences run in the next step. Serving
//! policy, not model code: it sees token ids, cache blocks and a step's logits, never the
//! model.
//!
//! Sequences wait in a bounded queue. Before each step the scheduler admits waiting
//! sequences, oldest first, while the step's token budget (`max_batch_tokens`: every
//! admitted prompt plus one token per running sequence), the running-sequence limit and
//! the cache allow. A step runs the prefill of the admitted sequences and one decode
//! token of every running one; after it, each sequence samples its next token, and the
//! ones that finished leave and return their cache blocks. No sequence waits for another
//! to finish.
//!
//! Cache policy (vLLM's): a sequence is admitted when the cache holds its prompt, and
//! grows a block at a time as it generates. Before each step every running sequence,
//! oldest first, gets room for the token it decodes next; when the cache runs short the
//! youngest running sequence is preempted: its blocks go back, and it waits at the front
//! of the queue (the oldest preempted first) to be recomputed, its prompt and the tokens
//! it already generated prefilled again (nothing is sent twice). The oldest sequence
//! always fits alone, so every sequence finishes. One whose prompt plus `max_tokens`
//! exceeds the context or the whole cache is refused at once.

use std::collections::VecDeque;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rankway_proto::limits::Invalid;
use tch::{Device, Kind, Tensor};

use super::sampling::{Sampling, sample};
use crate::models::ModelError;
use crate::models::llama::Step;
use crate::models::llama::cache::BlockAllocator;

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
    /// Arrival order: the larger, the younger.
    arrival: u64,
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
    /// Prompt tokens in the step last planned (recomputed ones included).
    pub prefill_tokens: usize,
    /// Sequences preempted to make room in the cache.
    pub preemptions: u64,
    arrivals: u64,
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
            preemptions: 0,
            arrivals: 0,
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
            return Err(ModelError::InvalidInput(Invalid::EmptyPrompt.to_string()));
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
        self.arrivals += 1;
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
            arrival: self.arrivals,
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

    /// Gives every running sequence, oldest first, a cache row for the token it decodes
    /// next, preempting the youngest while the cache is short.
    fn make_room(&mut self) {
        self.running.sort_by_key(|s| s.arrival);
        let mut i = 0;
        while i < self.running.len() {
            let need = self.running[i].tokens.len();
            if self.alloc.grow(&mut self.running[i].blocks, need) {
                i += 1;
                continue;
            }
            let mut youngest = self.running.pop().expect("non-empty");
            self.alloc.release(&mut youngest.blocks);
            youngest.cached = 0;
            self.preemptions += 1;
            self.waiting.push_front(youngest);
        }
    }

    /// Admits what fits and lays out the next step; `None` when nothing runs.
    pub fn plan(&mut self, padding_row: i64) -> Option<Step> {
        self.make_room();
        let mut budget = self.limits.max_batch_tokens.saturating_sub(self.running.len());
        while let Some(next) = self.waiting.front() {
            let len = next.tokens.len();
            // A recomputed sequence can be longer than a step's budget: it then runs alone.
            let alone = self.running.is_empty();
            if self.running.len() >= self.limits.max_running
                || (len > budget && !alone)
                || self.alloc.blocks_for(len) > self.alloc.free_blocks()
            {
                break;
            }
            let mut seq = self.waiting.pop_front().expect("front exists");
            assert!(self.alloc.grow(&mut seq.blocks, len), "counted free blocks");
            budget = budget.saturating_sub(len);
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

#[cfg(test)]
mod tests {
    //! The scheduler driven step by step with fake logits: no model, no threads, no time.

    use super::*;

    const VOCAB: i64 = 8;
    const EOS: u32 = 2;

    fn limits(max_batch_tokens: usize, max_running: usize) -> Limits {
        Limits {
            max_batch_tokens,
            max_running,
            max_waiting: 8,
            context: 100,
        }
    }

    /// Logits of one step whose greedy choice for row `i` is `next[i]`.
    fn logits(next: &[u32]) -> Tensor {
        let mut v = vec![0f32; next.len() * VOCAB as usize];
        for (i, &t) in next.iter().enumerate() {
            v[i * VOCAB as usize + t as usize] = 1.0;
        }
        Tensor::from_slice(&v).view([next.len() as i64, VOCAB])
    }

    /// Plans a step and finishes it with each running sequence choosing `token`: the
    /// step's sequence count and prompt tokens, and what it emitted.
    fn step(s: &mut Scheduler, token: u32) -> (usize, usize, Vec<Emitted>) {
        let step = s.plan(-1).expect("something runs");
        let rows = step.seqs.size()[0] as usize;
        let prefill = s.prefill_tokens;
        let emitted = s.finish_step(&logits(&vec![token; rows])).unwrap();
        (rows, prefill, emitted)
    }

    #[test]
    fn requests_that_can_never_run_are_refused_at_once() {
        let limits = Limits {
            max_batch_tokens: 64,
            max_running: 4,
            max_waiting: 1,
            context: 100,
        };
        let mut s = Scheduler::new(limits, BlockAllocator::new(4, 16), 2);
        let err = |r: Result<(), ModelError>| r.unwrap_err().to_string();
        assert!(err(s.submit(1, vec![], Sampling::greedy(4))).contains("empty"));
        assert!(err(s.submit(1, vec![5; 10], Sampling::greedy(0))).contains("max_tokens 0"));
        assert!(err(s.submit(1, vec![5; 10], Sampling::greedy(101))).contains("max_tokens 101"));
        assert!(
            err(s.submit(1, vec![5; 90], Sampling::greedy(20))).contains("exceed the context length 100")
        );
        assert!(err(s.submit(1, vec![5; 60], Sampling::greedy(20))).contains("can never fit"));
        let hot = Sampling {
            temperature: -1.0,
            ..Sampling::greedy(4)
        };
        assert!(err(s.submit(1, vec![5; 4], hot)).contains("temperature -1"));
        for top_p in [0.0, 1.5, f32::NAN] {
            let s2 = Sampling {
                temperature: 1.0,
                top_p,
                ..Sampling::greedy(4)
            };
            assert!(err(s.submit(1, vec![5; 4], s2)).contains("top_p"));
        }
        s.submit(1, vec![5; 4], Sampling::greedy(4)).unwrap();
        assert!(err(s.submit(2, vec![5; 4], Sampling::greedy(4))).contains("already wait"));
        // One that fits later waits: the cache holds 64 tokens, prompts of 40 one at a time.
        let mut s = Scheduler::new(limits, BlockAllocator::new(4, 16), 2);
        s.submit(1, vec![5; 40], Sampling::greedy(20)).unwrap();
        assert!(s.plan(64).is_some());
        s.submit(2, vec![5; 40], Sampling::greedy(20)).unwrap();
        assert!(s.plan(64).is_some());
        assert_eq!((s.running(), s.waiting()), (1, 1));
        assert!(s.cancel(1));
        assert_eq!(s.free_tokens(), 64);
        assert!(s.plan(64).is_some());
        assert_eq!((s.running(), s.waiting()), (1, 0));
    }

    #[test]
    fn the_youngest_is_preempted_and_recomputed_and_every_sequence_finishes() {
        // Four blocks of 16 tokens. Three sequences of 10 prompt tokens start together
        // (a block each) and each grows to 40 (three blocks): they cannot all grow.
        let mut s = Scheduler::new(limits(64, 4), BlockAllocator::new(4, 16), EOS);
        for id in 1..=3 {
            s.submit(id, vec![5; 10], Sampling::greedy(30)).unwrap();
        }
        let (mut generated, mut finished, mut recomputed) = ([0usize; 4], Vec::new(), Vec::new());
        for _ in 0..500 {
            let Some(step) = s.plan(-1) else { break };
            let seqs = Vec::<i64>::try_from(step.seqs.view([-1])).unwrap();
            // Query tokens beyond a prompt's 10: a preempted sequence prefilled again.
            recomputed.extend(seqs.chunks(3).map(|c| c[1]).filter(|&q| q > 10));
            for e in s.finish_step(&logits(&vec![7; seqs.len() / 3])).unwrap() {
                generated[e.id as usize] += 1;
                if e.finish.is_some() {
                    finished.push(e.id);
                }
            }
        }
        assert!(s.is_idle(), "every sequence ended");
        assert_eq!(
            finished,
            [1, 2, 3],
            "the oldest goes first, the preempted come back oldest first"
        );
        assert_eq!(&generated[1..], [30, 30, 30], "no token lost or sent twice");
        assert!(s.preemptions >= 2, "{} preemptions", s.preemptions);
        assert!(!recomputed.is_empty(), "preempted sequences were recomputed");
        assert_eq!(s.free_tokens(), 64, "every block came back");
    }

    #[test]
    fn admission_keeps_to_the_token_budget_and_the_oldest_goes_first() {
        // 10 tokens a step: one running sequence's decode token leaves room for 9.
        let mut s = Scheduler::new(limits(10, 4), BlockAllocator::new(16, 16), EOS);
        s.submit(1, vec![5; 6], Sampling::greedy(8)).unwrap();
        s.submit(2, vec![5; 6], Sampling::greedy(8)).unwrap();
        let (rows, prefill, _) = step(&mut s, 7);
        assert_eq!(
            (rows, prefill),
            (1, 6),
            "the second prompt does not fit beside the first"
        );
        assert_eq!(s.waiting(), 1);
        let (rows, prefill, _) = step(&mut s, 7);
        assert_eq!(
            (rows, prefill),
            (2, 6),
            "admitted at the next step, beside one decode token"
        );
        let (rows, prefill, emitted) = step(&mut s, 7);
        assert_eq!((rows, prefill), (2, 0));
        assert_eq!(
            emitted.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![1, 2],
            "in admission order"
        );
        assert_eq!((s.steps, s.shared_steps), (3, 2));
    }

    #[test]
    fn a_prompt_that_does_not_fit_the_cache_holds_back_the_ones_behind_it() {
        // Four blocks of 16 tokens: the first needs three, the second four, the third one.
        let mut s = Scheduler::new(limits(64, 4), BlockAllocator::new(4, 16), EOS);
        s.submit(1, vec![5; 30], Sampling::greedy(10)).unwrap();
        s.submit(2, vec![5; 50], Sampling::greedy(10)).unwrap();
        s.submit(3, vec![5; 4], Sampling::greedy(4)).unwrap();
        let (rows, prefill, _) = step(&mut s, 7);
        assert_eq!((rows, prefill), (1, 30));
        assert_eq!(s.waiting(), 2, "first come, first served: 3 waits behind 2");
        assert!(s.cancel(1));
        assert_eq!(s.free_tokens(), 64, "a cancelled sequence gives its blocks back");
        let (rows, prefill, _) = step(&mut s, 7);
        assert_eq!((rows, prefill), (1, 50));
        assert!(!s.cancel(1), "an ended sequence is unknown");
    }

    #[test]
    fn the_running_limit_bounds_a_step() {
        let mut s = Scheduler::new(limits(64, 2), BlockAllocator::new(16, 16), EOS);
        for id in 1..=3 {
            s.submit(id, vec![5; 3], Sampling::greedy(4)).unwrap();
        }
        assert_eq!(step(&mut s, 7).0, 2);
        assert_eq!((s.running(), s.waiting()), (2, 1));
    }

    #[test]
    fn sequences_finish_on_the_end_token_or_at_max_tokens_and_free_their_blocks() {
        let mut s = Scheduler::new(limits(64, 4), BlockAllocator::new(16, 16), EOS);
        s.submit(1, vec![5; 3], Sampling::greedy(2)).unwrap();
        s.submit(2, vec![5; 3], Sampling::greedy(9)).unwrap();
        let (_, _, first) = step(&mut s, 7);
        assert!(
            first.iter().all(|e| e.token == 7 && e.finish.is_none()),
            "{first:?}"
        );
        // Sequence 1 reaches its max_tokens; sequence 2 draws the end token.
        let plan = s.plan(-1).unwrap();
        assert_eq!(plan.seqs.size()[0], 2);
        let out = s.finish_step(&logits(&[7, EOS])).unwrap();
        assert_eq!(out[0].finish, Some(Finish::Length));
        assert_eq!(out[1].finish, Some(Finish::Stop));
        assert!(s.is_idle());
        assert_eq!(s.free_tokens(), 256);
        assert!(s.plan(-1).is_none(), "nothing left to run");
    }

    #[test]
    fn a_step_sends_only_new_tokens_at_their_positions() {
        let mut s = Scheduler::new(limits(64, 4), BlockAllocator::new(16, 16), EOS);
        s.submit(1, vec![4, 5, 6], Sampling::greedy(4)).unwrap();
        let prefill = s.plan(-1).unwrap();
        // [3, tokens]: token ids, positions, cache rows.
        let ids = Vec::<i64>::try_from(prefill.tokens.get(0)).unwrap();
        let positions = Vec::<i64>::try_from(prefill.tokens.get(1)).unwrap();
        assert_eq!((ids, positions), (vec![4, 5, 6], vec![0, 1, 2]));
        s.finish_step(&logits(&[7])).unwrap();
        let decode = s.plan(-1).unwrap();
        let ids = Vec::<i64>::try_from(decode.tokens.get(0)).unwrap();
        let positions = Vec::<i64>::try_from(decode.tokens.get(1)).unwrap();
        assert_eq!(
            (ids, positions),
            (vec![7], vec![3]),
            "one decode token, after the prompt"
        );
        // [start, new tokens, context] per sequence.
        assert_eq!(
            Vec::<i64>::try_from(decode.seqs.view([-1])).unwrap(),
            vec![0, 1, 4]
        );
    }

    #[test]
    fn seeded_sampling_repeats_and_greedy_takes_the_top_logit() {
        let run = |sampling: Sampling| {
            let mut s = Scheduler::new(limits(64, 4), BlockAllocator::new(16, 16), EOS);
            s.submit(1, vec![5; 3], sampling).unwrap();
            let mut tokens = Vec::new();
            for _ in 0..6 {
                s.plan(-1).unwrap();
                // Flat logits but for the end token, which never wins a draw.
                let mut row = vec![1f32; VOCAB as usize];
                row[EOS as usize] = -1e9;
                let out = s.finish_step(&Tensor::from_slice(&row).view([1, VOCAB])).unwrap();
                tokens.push(out[0].token);
            }
            tokens
        };
        let seeded = Sampling {
            temperature: 1.0,
            seed: Some(7),
            ..Sampling::greedy(6)
        };
        assert_eq!(run(seeded.clone()), run(seeded));
        assert!(
            run(Sampling::greedy(6)).iter().all(|&t| t == 0),
            "ties go to the first maximum"
        );
    }
}
