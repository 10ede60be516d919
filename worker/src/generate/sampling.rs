//! How a sequence picks its next token from a row of logits: greedy, or temperature and
//! nucleus (top-p) sampling with the sequence's own seeded generator.

use rand::Rng;
use rand::rngs::StdRng;
use rankway_proto::limits::check_sampling;

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

    /// The sampling rules every request meets ([`check_sampling`], as the gateway
    /// checks them), for a model whose context holds `context` tokens.
    pub fn validate(&self, context: usize) -> Result<(), ModelError> {
        let max_tokens = u32::try_from(self.max_tokens).unwrap_or(u32::MAX);
        let context = u32::try_from(context).unwrap_or(u32::MAX);
        check_sampling(max_tokens, self.temperature, Some(self.top_p), context)
            .map_err(|e| ModelError::InvalidInput(e.to_string()))
    }
}

/// Temperature and nucleus sampling over one row of logits.
pub(super) fn sample(logits: &[f32], sampling: &Sampling, rng: &mut StdRng) -> u32 {
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
