//! A synthetic tensor-parallel MLP with seeded weights, for fast tests and for
//! benchmarks of pure compute.
//!
//! Each block is `x + down(gelu(up(x)))` with `up: hidden → 4·hidden` split by rows over
//! the ranks (column parallel) and `down: 4·hidden → hidden` split by columns (row
//! parallel, one all-reduce). Every rank generates the full weights from the same seed
//! and keeps its slice, so any world size computes the same function.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tch::Tensor;

use super::{DType, HostTensor, Model, ModelConfig, ModelError, Prepared, Signature, TensorSpec};
use crate::collective::{Collective, Shard};

pub const INPUT: &str = "input";
pub const OUTPUT: &str = "output";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlpConfig {
    pub hidden: i64,
    pub layers: i64,
    pub seed: i64,
}

struct Block {
    up_w: Tensor,
    up_b: Tensor,
    down_w: Tensor,
    down_b: Tensor,
}

pub struct Mlp {
    cfg: MlpConfig,
    signature: Signature,
    blocks: Vec<Block>,
}

impl Mlp {
    pub fn new(cfg: MlpConfig, served: &ModelConfig, shard: Shard) -> Result<Self, ModelError> {
        let device = served.device;
        if cfg.hidden < 1 || cfg.layers < 1 {
            return Err(ModelError::Load(format!(
                "mlp needs hidden >= 1 and layers >= 1, got {} and {}",
                cfg.hidden, cfg.layers
            )));
        }
        let inner = 4 * cfg.hidden;
        super::check_divisible("the MLP inner width (4 x hidden)", inner, shard)?;
        let (start, len) = shard.range(inner);
        // Weights come from a seeded Rust RNG rather than libtorch's global generator:
        // no process-wide side effect, and the same values on every rank and version.
        let mut rng = StdRng::seed_from_u64(cfg.seed as u64);
        let bound = (3.0 / cfg.hidden as f32).sqrt();
        let mut rand = |shape: &[i64], scale: f32| {
            let n = shape.iter().product::<i64>() as usize;
            let values: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..=scale)).collect();
            Tensor::from_slice(&values).view(shape).to_device(device)
        };
        let blocks = (0..cfg.layers)
            .map(|_| {
                let up_w = rand(&[inner, cfg.hidden], bound);
                let up_b = rand(&[inner], 0.1);
                let down_w = rand(&[cfg.hidden, inner], 0.5 * bound);
                let down_b = rand(&[cfg.hidden], 0.1);
                Block {
                    up_w: up_w.narrow(0, start, len).contiguous(),
                    up_b: up_b.narrow(0, start, len).contiguous(),
                    down_w: down_w.narrow(1, start, len).contiguous(),
                    down_b,
                }
            })
            .collect();
        let signature = super::signature(
            served,
            "tch-mlp",
            vec![TensorSpec::new(INPUT, DType::Fp32, &[-1, cfg.hidden])],
            vec![TensorSpec::new(OUTPUT, DType::Fp32, &[-1, cfg.hidden])],
            format!("tp={} inner/rank={len}", shard.world),
        );
        Ok(Self {
            cfg,
            signature,
            blocks,
        })
    }
}

impl Model for Mlp {
    fn signature(&self) -> Signature {
        self.signature.clone()
    }

    fn prepare(&self, inputs: &[HostTensor]) -> Result<Prepared, ModelError> {
        let sig = &self.signature;
        let input = super::expect_input(inputs, &sig.inputs[0], sig.max_batch_size)?;
        let x = super::f32_input(input)?;
        Ok(Prepared {
            rows: input.rows() as usize,
            tensors: vec![x],
            token_counts: None,
        })
    }

    fn forward(&self, batch: &Prepared, comm: &dyn Collective) -> Result<Tensor, ModelError> {
        let [x] = batch.tensors.as_slice() else {
            return Err(ModelError::InvalidInput("expected one input tensor".into()));
        };
        let mut x = x.shallow_clone();
        for b in &self.blocks {
            let mut y = x
                .linear(&b.up_w, Some(&b.up_b))
                .gelu("none")
                .linear::<Tensor>(&b.down_w, None);
            comm.all_reduce_sum(&mut y)?;
            x = x + y + &b.down_b;
        }
        Ok(x)
    }

    fn outputs(&self, _batch: &Prepared, output: Tensor) -> Result<Vec<HostTensor>, ModelError> {
        Ok(vec![super::f32_output(OUTPUT, &output)?])
    }

    fn warmup_inputs(&self) -> Vec<HostTensor> {
        let values = vec![0.5f32; 2 * self.cfg.hidden as usize];
        vec![HostTensor::f32(INPUT, vec![2, self.cfg.hidden], &values)]
    }
}
