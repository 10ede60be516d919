//! Models a worker can serve, written once for one rank or a tensor-parallel group.
//!
//! A batch goes through three steps: [`Model::prepare`] (rank 0 only: validate and
//! tokenize the inputs), [`Model::forward`] (every rank, with collectives), and
//! [`Model::outputs`] (rank 0 only: back to host tensors). Models speak only their own
//! types ([`types`]); the gRPC edge converts.

pub mod kernels;
pub mod linear;
pub mod llama;
pub mod minilm;
pub mod mlp;
pub mod types;

use tch::Tensor;

use crate::collective::{Collective, CollectiveError, Shard};
pub use types::{Architecture, DType, HostTensor, ModelConfig, Signature, TensorSpec, Values};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The request is wrong; the message says how.
    #[error("{0}")]
    InvalidInput(String),
    /// The request is fine but the group has no room for it now; try again later.
    #[error("{0}")]
    Busy(String),
    /// The model files or settings are wrong; the worker cannot start.
    #[error("cannot load model: {0}")]
    Load(String),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The tensors of one batch after [`Model::prepare`], ready for every rank's forward.
pub struct Prepared {
    pub rows: usize,
    pub tensors: Vec<Tensor>,
    /// Tokens per row after truncation, for text models, whose tensors are then all
    /// `[rows, tokens]` and padded on the right to the longest row.
    pub token_counts: Option<Vec<i64>>,
}

/// How a batch is cut into forward passes (`--sub-batch-rows`, `--sub-batch-tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassLimits {
    pub rows: usize,
    /// Tokens of a text model's pass, padding included: rows × its longest row.
    pub tokens: usize,
    /// What one more pass costs, in padded tokens: a text batch is split, within the
    /// limits, only where that saves more padding than this per extra pass.
    pub pass_cost_tokens: usize,
}

impl PassLimits {
    /// Every batch in one pass.
    pub const NONE: PassLimits = PassLimits {
        rows: usize::MAX,
        tokens: usize::MAX,
        pass_cost_tokens: usize::MAX,
    };

    /// What an extra pass costs, in padded tokens, with a margin (docs/worker.md gives
    /// the measurement): it keeps a batch of short texts of different lengths (5 to 16
    /// tokens, as `make bench` sends) whole, and still splits a long text from short ones.
    pub const PASS_COST_TOKENS: usize = 128;
}

impl Prepared {
    /// Rows `start..start + len` (every tensor's first dimension is the rows).
    fn rows_range(&self, start: usize, len: usize) -> Prepared {
        if start == 0 && len == self.rows {
            return Prepared {
                rows: self.rows,
                tensors: self.tensors.iter().map(Tensor::shallow_clone).collect(),
                token_counts: self.token_counts.clone(),
            };
        }
        Prepared {
            rows: len,
            tensors: self
                .tensors
                .iter()
                .map(|t| t.narrow(0, start as i64, len as i64))
                .collect(),
            token_counts: self.token_counts.as_ref().map(|c| c[start..start + len].to_vec()),
        }
    }

    /// The rows of each forward pass this batch runs as, within `limits`. Text rows are
    /// ordered longest first and cut into runs, each padded to its own first row; of the
    /// cuts within the limits, the one of fewest padded tokens plus
    /// `pass_cost_tokens` per pass wins (fewer passes on a tie). So a long text goes
    /// apart from short ones, and texts of similar length stay together; a batch that
    /// stays one pass keeps its order. A row over the token limit goes alone. Other
    /// batches split in order, `limits.rows` rows a pass.
    pub fn passes(&self, limits: PassLimits) -> Vec<Vec<usize>> {
        let max_rows = limits.rows.max(1);
        let Some(counts) = &self.token_counts else {
            return (0..self.rows)
                .step_by(max_rows)
                .map(|start| (start..self.rows.min(start + max_rows)).collect())
                .collect();
        };
        let n = self.rows;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(counts[i]));
        let len = |k: usize| counts[order[k]].max(0) as usize;
        // cut[j]: the cheapest cut of the first j sorted rows, as (cost, passes, start of
        // its last pass). A pass is a run of sorted rows, padded to its first.
        let mut cut = vec![(0usize, 0usize, 0usize); n + 1];
        for j in 1..=n {
            cut[j] = (usize::MAX, usize::MAX, j - 1);
            // Shortest last pass first: on a tie the earlier passes stay full.
            for i in (j.saturating_sub(max_rows)..j).rev() {
                let padded = (j - i).saturating_mul(len(i));
                if padded > limits.tokens && j - i > 1 {
                    break; // longer runs, of longer rows, pad to more still
                }
                let cost = cut[i]
                    .0
                    .saturating_add(padded)
                    .saturating_add(limits.pass_cost_tokens);
                if (cost, cut[i].1 + 1) < (cut[j].0, cut[j].1) {
                    cut[j] = (cost, cut[i].1 + 1, i);
                }
            }
        }
        let mut passes = Vec::new();
        let mut j = n;
        while j > 0 {
            let i = cut[j].2;
            passes.push(order[i..j].to_vec());
            j = i;
        }
        if passes.len() <= 1 {
            return vec![(0..n).collect()];
        }
        passes.reverse();
        passes
    }

    /// The pass of `rows` (from [`Prepared::passes`]); a text pass is cut to its own
    /// longest row.
    pub fn pass(&self, rows: &[usize]) -> Prepared {
        let contiguous = rows.windows(2).all(|w| w[1] == w[0] + 1);
        let part = match rows.first() {
            Some(&start) if contiguous => self.rows_range(start, rows.len()),
            _ => {
                let index = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
                Prepared {
                    rows: rows.len(),
                    tensors: self.tensors.iter().map(|t| t.index_select(0, &index)).collect(),
                    token_counts: self
                        .token_counts
                        .as_ref()
                        .map(|c| rows.iter().map(|&r| c[r]).collect()),
                }
            }
        };
        let Some(longest) = part.token_counts.as_ref().and_then(|c| c.iter().copied().max()) else {
            return part;
        };
        let keep = longest.max(1);
        Prepared {
            tensors: part
                .tensors
                .iter()
                .map(|t| match t.size().get(1) {
                    Some(&len) if keep < len => t.narrow(1, 0, keep),
                    _ => t.shallow_clone(),
                })
                .collect(),
            ..part
        }
    }
}

/// The passes' outputs, concatenated in pass order, put back in the batch's row order.
pub fn in_batch_order(output: Tensor, passes: &[Vec<usize>]) -> Tensor {
    let order: Vec<usize> = passes.concat();
    if order.iter().enumerate().all(|(k, &r)| k == r) {
        return output;
    }
    let mut position = vec![0i64; order.len()];
    for (k, &r) in order.iter().enumerate() {
        position[r] = k as i64;
    }
    output.index_select(0, &Tensor::from_slice(&position).to_device(output.device()))
}

pub trait Model: Send {
    fn signature(&self) -> Signature;
    fn prepare(&self, inputs: &[HostTensor]) -> Result<Prepared, ModelError>;
    fn forward(&self, batch: &Prepared, comm: &dyn Collective) -> Result<Tensor, ModelError>;
    fn outputs(&self, batch: &Prepared, output: Tensor) -> Result<Vec<HostTensor>, ModelError>;
    /// A small batch that exercises the whole forward pass, run before serving.
    fn warmup_inputs(&self) -> Vec<HostTensor>;
}

/// Fails unless `device` is the CPU or a GPU this process can see.
pub fn check_device(device: tch::Device) -> Result<(), String> {
    let tch::Device::Cuda(n) = device else {
        return Ok(());
    };
    let visible = tch::Cuda::device_count();
    if n as i64 >= visible {
        return Err(format!(
            "--device cuda:{n}, but {visible} CUDA devices are visible (the worker needs its \
             `cuda` build and a GPU)"
        ));
    }
    Ok(())
}

/// Loads the model `cfg` describes, holding the shard of the weights `shard` owns.
pub fn load(cfg: &ModelConfig, shard: Shard) -> Result<Box<dyn Model>, ModelError> {
    check_device(cfg.device).map_err(ModelError::Load)?;
    Ok(match &cfg.architecture {
        Architecture::MiniLm { dir } => Box::new(minilm::MiniLm::load(dir, cfg, shard)?),
        Architecture::Mlp(mlp_cfg) => Box::new(mlp::Mlp::new(*mlp_cfg, cfg, shard)?),
        Architecture::Llama { .. } => {
            return Err(ModelError::Load(format!(
                "{} is a generative model: it runs on the generation engine",
                cfg.name
            )));
        }
    })
}

/// Finds the single input `spec` names and checks its datatype, rank and fixed dims.
pub(crate) fn expect_input<'a>(
    inputs: &'a [HostTensor],
    spec: &TensorSpec,
    max_rows: u32,
) -> Result<&'a HostTensor, ModelError> {
    let [t] = inputs else {
        return Err(ModelError::InvalidInput(format!(
            "expected exactly one input {:?}, got {}",
            spec.name,
            inputs.len()
        )));
    };
    if t.name != spec.name {
        return Err(ModelError::InvalidInput(format!(
            "unexpected input {:?}: this model takes {:?}",
            t.name, spec.name
        )));
    }
    if t.dtype != spec.dtype {
        return Err(ModelError::InvalidInput(format!(
            "input {:?} must be {}, got {}",
            t.name,
            spec.dtype.name(),
            t.dtype.name()
        )));
    }
    let fits = t.shape.len() == spec.shape.len()
        && t.shape.iter().zip(&spec.shape).all(
            |(&got, &want)| {
                if want == -1 { got >= 1 } else { got == want }
            },
        );
    if !fits {
        return Err(ModelError::InvalidInput(format!(
            "input {:?} has shape {:?}, expected {:?} (-1 = any batch size >= 1)",
            t.name, t.shape, spec.shape
        )));
    }
    if t.rows() > i64::from(max_rows) {
        return Err(ModelError::InvalidInput(format!(
            "batch of {} rows exceeds this worker's limit of {max_rows}",
            t.rows()
        )));
    }
    Ok(t)
}

/// A float tensor (on any device) as an FP32 host tensor.
pub(crate) fn f32_output(name: &str, t: &Tensor) -> Result<HostTensor, ModelError> {
    let t = t
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Float)
        .contiguous();
    let values = Vec::<f32>::try_from(t.flatten(0, -1))?;
    Ok(HostTensor::f32(name, t.size(), &values))
}

/// A validated FP32 host tensor as a tch tensor of the same shape.
pub(crate) fn f32_input(t: &HostTensor) -> Result<Tensor, ModelError> {
    let expected = t.shape.iter().product::<i64>() as usize * 4;
    let data = match &t.values {
        Values::Raw(data) if t.dtype == DType::Fp32 && data.len() == expected => data,
        _ => {
            return Err(ModelError::InvalidInput(format!(
                "input {:?} of shape {:?} needs {expected} bytes of FP32 data",
                t.name, t.shape
            )));
        }
    };
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(Tensor::from_slice(&values).view(t.shape.as_slice()))
}

/// Checks that a tensor-parallel split of `what` (of size `total`) is even.
pub(crate) fn check_divisible(what: &str, total: i64, shard: Shard) -> Result<(), ModelError> {
    if total % shard.world as i64 != 0 {
        return Err(ModelError::Load(format!(
            "world size {} does not divide {what} ({total}); use a world size that divides it",
            shard.world
        )));
    }
    Ok(())
}

/// A model's signature under the name and version `cfg` serves it as.
pub(crate) fn signature(
    cfg: &ModelConfig,
    platform: &str,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    shard_layout: String,
) -> Signature {
    Signature {
        name: cfg.name.clone(),
        version: cfg.version.clone(),
        platform: platform.to_owned(),
        inputs,
        outputs,
        shard_layout,
        max_batch_size: cfg.max_batch_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A text batch of `counts` tokens per row: ids are row * 100 + position, padded
    /// with 0 to the longest row.
    fn text(counts: &[i64]) -> Prepared {
        let longest = *counts.iter().max().unwrap();
        let ids: Vec<i64> = counts
            .iter()
            .enumerate()
            .flat_map(|(r, &n)| (0..longest).map(move |p| if p < n { r as i64 * 100 + p } else { 0 }))
            .collect();
        Prepared {
            rows: counts.len(),
            tensors: vec![Tensor::from_slice(&ids).view([counts.len() as i64, longest])],
            token_counts: Some(counts.to_vec()),
        }
    }

    fn limits(rows: usize, tokens: usize) -> PassLimits {
        PassLimits {
            rows,
            tokens,
            pass_cost_tokens: PassLimits::PASS_COST_TOKENS,
        }
    }

    #[test]
    fn texts_of_similar_length_stay_one_pass_in_order() {
        // One pass: 4 × 16 + 128. Apart, the 5-token text would save 33 tokens.
        assert_eq!(
            text(&[12, 15, 5, 16]).passes(limits(32, 8192)),
            vec![vec![0, 1, 2, 3]]
        );
        assert_eq!(text(&[256, 2]).passes(PassLimits::NONE), vec![vec![0, 1]]);
    }

    #[test]
    fn a_long_text_goes_apart_from_short_ones() {
        // One pass: 4 × 256 + 128 = 1152. Apart: 256 + 128 + 3 × 16 + 128 = 560.
        assert_eq!(
            text(&[16, 16, 256, 12]).passes(limits(32, 8192)),
            vec![vec![2], vec![0, 1, 3]]
        );
    }

    #[test]
    fn the_limits_cut_longest_first_and_fill_the_earlier_passes() {
        assert_eq!(
            text(&[10, 10, 10, 10, 10]).passes(limits(2, 8192)),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
        // 40 tokens a pass: 16 + 16 + 15 would pad to 48.
        assert_eq!(
            text(&[15, 16, 14, 16]).passes(limits(32, 40)),
            vec![vec![1, 3], vec![0, 2]]
        );
        // A text longer than the token limit goes alone, and is not refused.
        assert_eq!(
            text(&[300, 5, 5]).passes(limits(32, 256)),
            vec![vec![0], vec![1, 2]]
        );
    }

    #[test]
    fn other_batches_split_in_order() {
        let batch = Prepared {
            rows: 5,
            tensors: vec![Tensor::zeros([5, 16], (tch::Kind::Float, tch::Device::Cpu))],
            token_counts: None,
        };
        assert_eq!(batch.passes(limits(2, 1)), vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(batch.pass(&[2, 3]).tensors[0].size(), [2, 16]);
    }

    #[test]
    fn a_text_pass_holds_its_rows_cut_to_its_longest() {
        let batch = text(&[3, 10, 5, 10, 2]);
        let pass = batch.pass(&[2, 0]);
        assert_eq!(pass.rows, 2);
        assert_eq!(pass.token_counts, Some(vec![5, 3]));
        let ids = Vec::<i64>::try_from(pass.tensors[0].flatten(0, -1)).unwrap();
        assert_eq!(ids, [200, 201, 202, 203, 204, 0, 1, 2, 0, 0]);
    }

    #[test]
    fn outputs_return_to_the_batch_order() {
        let passes = vec![vec![1, 3], vec![2, 0], vec![4]];
        // Each pass's output row is its batch row's index, concatenated in pass order.
        let concatenated = Tensor::from_slice(&[1i64, 3, 2, 0, 4]);
        let restored = Vec::<i64>::try_from(in_batch_order(concatenated, &passes)).unwrap();
        assert_eq!(restored, [0, 1, 2, 3, 4]);
    }
}
