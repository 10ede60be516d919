//! A synthetic tensor-parallel MLP with seeded weights, for fast tests and for
//! benchmarks of pure compute.
//!
//! Each block is `x + down(gelu(up(x)))` with `up: hidden → 4·hidden` split by rows over
//! the ranks (column parallel) and `down: 4·hidden → hidden` split by columns (row
//! parallel, one all-reduce). Every rank generates the full weights from the same seed
//! and keeps its slice, so any world size computes the same function.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rankway_proto::worker::{DataType, ModelInfo, Tensor as WireTensor};
use tch::{Device, Tensor};

use super::{Model, ModelError, Prepared};
use crate::dist::{Collective, Shard};

pub const INPUT: &str = "input";
pub const OUTPUT: &str = "output";

#[derive(Debug, Clone, Copy)]
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
    name: String,
    cfg: MlpConfig,
    shard: Shard,
    max_batch_size: u32,
    blocks: Vec<Block>,
}

impl Mlp {
    pub fn new(
        cfg: MlpConfig,
        name: String,
        shard: Shard,
        max_batch_size: u32,
        device: Device,
    ) -> Result<Self, ModelError> {
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
        Ok(Self {
            name,
            cfg,
            shard,
            max_batch_size,
            blocks,
        })
    }
}

impl Model for Mlp {
    fn info(&self) -> ModelInfo {
        super::model_info(
            &self.name,
            "tch-mlp",
            vec![super::spec(INPUT, DataType::Fp32, &[-1, self.cfg.hidden])],
            vec![super::spec(OUTPUT, DataType::Fp32, &[-1, self.cfg.hidden])],
            format!(
                "tp={} inner/rank={}",
                self.shard.world,
                4 * self.cfg.hidden / self.shard.world as i64
            ),
            self.max_batch_size,
        )
    }

    fn prepare(&self, inputs: &[WireTensor]) -> Result<Prepared, ModelError> {
        let spec = super::spec(INPUT, DataType::Fp32, &[-1, self.cfg.hidden]);
        let input = super::expect_input(inputs, &spec, self.max_batch_size)?;
        let x = super::wire_to_f32(input)?;
        Ok(Prepared {
            rows: input.shape[0] as usize,
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

    fn outputs(&self, _batch: &Prepared, output: Tensor) -> Result<Vec<WireTensor>, ModelError> {
        Ok(vec![super::f32_to_wire(OUTPUT, &output)?])
    }

    fn warmup_inputs(&self) -> Vec<WireTensor> {
        let values = vec![0.5f32; 2 * self.cfg.hidden as usize];
        vec![WireTensor {
            name: INPUT.into(),
            datatype: DataType::Fp32 as i32,
            shape: vec![2, self.cfg.hidden],
            data: values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        }]
    }
}
