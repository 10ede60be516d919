//! A LLaMA-family decoder (SmolLM2) read from GGUF, tensor-parallel Megatron style.
//!
//! Every number comes from the GGUF metadata. Each rank holds `1/world` of the query and
//! KV heads (their rows of Q, K and V, their columns of the attention output) and
//! `1/world` of the MLP's intermediate width (gate and up rows, down columns); the token
//! embedding (tied to the output) and the norms are replicated. Each layer all-reduces
//! twice: after attention and after the MLP. Logits are computed on rank 0 only: with
//! the output tied to the embedding every rank already holds the whole matrix, and one
//! rank computing `[sequences, vocab]` costs less than a gather of vocab shards each step.
//!
//! Weights are kept in the file's row order. llama.cpp's converter permutes each head's
//! Q and K rows so that RoPE rotates adjacent pairs `(2i, 2i+1)` instead of Hugging
//! Face's halves `(i, i + d/2)`; this forward applies the adjacent-pair rotation to the
//! file's order, which is the same attention. The permutation stays inside each head, so
//! sharding by whole heads is unaffected. (The reference in
//! `scripts/make_smollm2_reference.py` undoes the permutation and uses HF's rotation: the
//! two agree only if both readings are right.)
//!
//! One [`Step`] runs any mix of prefills and decodes: the linear layers see every token
//! of the step as one `[tokens, hidden]` matrix; attention reads each sequence's keys and
//! values from the paged [`KvCache`] through its cache rows.

mod attention;
pub mod cache;
pub mod tokenizer;

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::collective::{Collective, Shard};
use crate::formats::gguf::Gguf;
use crate::models::ModelError;
use crate::models::kernels::{self, Heads};
pub use crate::models::linear::Weights;
use crate::models::linear::{Embedding, Linear};
use attention::Plan;
pub use cache::KvCache;

/// The shape of the model, from the GGUF metadata.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaConfig {
    pub layers: usize,
    pub hidden: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub ffn: i64,
    pub vocab: i64,
    pub context: usize,
    pub rope_theta: f64,
    pub eps: f64,
}

impl LlamaConfig {
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ModelError> {
        let arch = gguf
            .metadata("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        if arch != "llama" {
            return Err(ModelError::Load(format!(
                "general.architecture {arch:?}: only llama-family decoders are supported"
            )));
        }
        let int = |key: &str| gguf.require_u64(&format!("llama.{key}")).map(|v| v as i64);
        let hidden = int("embedding_length")?;
        let heads = int("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv").or(Ok::<i64, ModelError>(heads))?;
        let vocab = match gguf.metadata("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(tokens) => tokens.len() as i64,
            None => int("vocab_size")?,
        };
        let cfg = Self {
            layers: int("block_count")? as usize,
            hidden,
            heads,
            kv_heads,
            head_dim: hidden / heads.max(1),
            ffn: int("feed_forward_length")?,
            vocab,
            context: int("context_length")? as usize,
            rope_theta: gguf.require_f64("llama.rope.freq_base").unwrap_or(10_000.0),
            eps: gguf.require_f64("llama.attention.layer_norm_rms_epsilon")?,
        };
        let sane = cfg.layers > 0
            && cfg.heads > 0
            && cfg.kv_heads > 0
            && cfg.heads % cfg.kv_heads == 0
            && cfg.head_dim * cfg.heads == cfg.hidden
            && cfg.head_dim % 2 == 0
            && cfg.ffn > 0
            && cfg.vocab > 0
            && cfg.context > 0;
        if !sane {
            return Err(ModelError::Load(format!("inconsistent llama metadata: {cfg:?}")));
        }
        Ok(cfg)
    }

    /// Group sizes that split both the query and the KV heads (and the MLP) evenly.
    pub fn valid_world_sizes(&self) -> Vec<usize> {
        (1..=self.heads as usize)
            .filter(|&w| {
                let w = w as i64;
                self.heads % w == 0 && self.kv_heads % w == 0 && self.ffn % w == 0
            })
            .collect()
    }

    /// Refuses a group size the heads do not divide, naming the ones that work.
    pub fn check_world(&self, world: usize) -> Result<(), ModelError> {
        let valid = self.valid_world_sizes();
        if valid.contains(&world) {
            return Ok(());
        }
        Err(ModelError::Load(format!(
            "a group of {world} ranks cannot split {} query and {} KV heads evenly; valid \
             group sizes for this model: {valid:?}",
            self.heads, self.kv_heads
        )))
    }
}

struct Layer {
    attn_norm: Tensor,
    /// `[(q + 2 kv) local heads * head_dim, hidden]`: Q, K and V in one product.
    qkv: Linear,
    /// `[hidden, local heads * head_dim]`.
    out: Linear,
    ffn_norm: Tensor,
    /// `[2 * local ffn, hidden]`: gate then up.
    gate_up: Linear,
    /// `[hidden, local ffn]`.
    down: Linear,
}

pub struct Llama {
    pub cfg: LlamaConfig,
    shard: Shard,
    weights: Weights,
    device: Device,
    /// Heads on this rank.
    heads: i64,
    kv_heads: i64,
    ffn: i64,
    /// The token embedding, tied to the output.
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `[positions, head_dim / 2]` each.
    cos: Tensor,
    sin: Tensor,
}

/// One step's work, identical on every rank (rank 0 builds it; see [`cache`]).
pub struct Step {
    /// `[3, tokens]` i64: token id, position, cache row to write.
    pub tokens: Tensor,
    /// `[sequences, 3]` i64: first token index in the step, query tokens, context length
    /// after the step.
    pub seqs: Tensor,
    /// `[sequences, max context]` i64: cache rows of each sequence's positions, padded
    /// with the cache's padding row.
    pub rows: Tensor,
}

impl Step {
    /// The tensors that travel to the followers, in order.
    pub fn into_tensors(self) -> Vec<Tensor> {
        vec![self.tokens, self.seqs, self.rows]
    }

    pub fn from_tensors(tensors: Vec<Tensor>) -> Result<Self, ModelError> {
        let Ok([tokens, seqs, rows]) = <[Tensor; 3]>::try_from(tensors) else {
            return Err(ModelError::InvalidInput("a step is three tensors".into()));
        };
        Ok(Self { tokens, seqs, rows })
    }
}

impl Llama {
    pub fn load(path: &Path, shard: Shard, device: Device, weights: Weights) -> Result<Self, ModelError> {
        let gguf = Gguf::open(path)?;
        let cfg = LlamaConfig::from_gguf(&gguf)?;
        cfg.check_world(shard.world)?;
        let world = shard.world as i64;
        let (heads, kv_heads, ffn) = (cfg.heads / world, cfg.kv_heads / world, cfg.ffn / world);
        let d = cfg.head_dim;
        let read = |name: &str, rows: i64| -> Result<Tensor, ModelError> {
            let values = gguf.read_f32(name)?;
            let cols = values.len() as i64 / rows;
            if rows * cols != values.len() as i64 {
                return Err(ModelError::Load(format!(
                    "{name}: {} values are not {rows} rows",
                    values.len()
                )));
            }
            Ok(Tensor::from_slice(&values).view([rows, cols]))
        };
        // This rank's rows [start, start + len) of a `[rows, in]` weight.
        let rows_of = |w: &Tensor, start: i64, len: i64| w.narrow(0, start, len);
        let vector = |name: &str| -> Result<Tensor, ModelError> {
            Ok(Tensor::from_slice(&gguf.read_f32(name)?).to_device(device))
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("blk.{i}.");
            let q = read(&format!("{p}attn_q.weight"), cfg.hidden)?;
            let k = read(&format!("{p}attn_k.weight"), cfg.kv_heads * d)?;
            let v = read(&format!("{p}attn_v.weight"), cfg.kv_heads * d)?;
            let qkv = Tensor::cat(
                &[
                    rows_of(&q, shard.rank as i64 * heads * d, heads * d),
                    rows_of(&k, shard.rank as i64 * kv_heads * d, kv_heads * d),
                    rows_of(&v, shard.rank as i64 * kv_heads * d, kv_heads * d),
                ],
                0,
            );
            let out = read(&format!("{p}attn_output.weight"), cfg.hidden)?;
            let out = out.narrow(1, shard.rank as i64 * heads * d, heads * d);
            let gate = read(&format!("{p}ffn_gate.weight"), cfg.ffn)?;
            let up = read(&format!("{p}ffn_up.weight"), cfg.ffn)?;
            let (f0, _) = shard.range(cfg.ffn);
            let gate_up = Tensor::cat(&[rows_of(&gate, f0, ffn), rows_of(&up, f0, ffn)], 0);
            let down = read(&format!("{p}ffn_down.weight"), cfg.hidden)?.narrow(1, f0, ffn);
            let t = |w: Tensor| Linear::new(&w, weights, device);
            layers.push(Layer {
                attn_norm: vector(&format!("{p}attn_norm.weight"))?,
                qkv: t(qkv)?,
                out: t(out)?,
                ffn_norm: vector(&format!("{p}ffn_norm.weight"))?,
                gate_up: t(gate_up)?,
                down: Linear::new(&down, weights.for_outlier_inputs(), device)?,
            });
        }
        // Also the output matrix (tied), so it takes the matrices' kind.
        let embed = Embedding::new(&read("token_embd.weight", cfg.vocab)?, weights, device)?;
        if gguf.tensor("output.weight").is_ok() {
            return Err(ModelError::Load(
                "an untied output.weight is not supported yet (SmolLM2 ties it to the embedding)".into(),
            ));
        }
        let half = d / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| cfg.rope_theta.powf(-(2.0 * i as f64) / d as f64))
            .collect();
        let positions = cfg.context as i64;
        let angles = Tensor::arange(positions, (Kind::Double, Device::Cpu))
            .unsqueeze(1)
            .matmul(&Tensor::from_slice(&inv).unsqueeze(0));
        Ok(Self {
            cfg,
            shard,
            weights,
            device,
            heads,
            kv_heads,
            ffn,
            embed,
            layers,
            norm: vector("output_norm.weight")?,
            cos: angles.cos().to_kind(Kind::Float).to_device(device),
            sin: angles.sin().to_kind(Kind::Float).to_device(device),
        })
    }

    pub fn shard(&self) -> Shard {
        self.shard
    }

    pub fn weights(&self) -> Weights {
        self.weights
    }

    /// An empty cache for this rank's KV heads: `blocks` blocks of `block_size` tokens,
    /// held as `kind` (float32 or bfloat16).
    pub fn new_cache(&self, blocks: usize, block_size: usize, kind: Kind) -> KvCache {
        KvCache::new(
            self.cfg.layers,
            blocks,
            block_size,
            self.kv_heads,
            self.cfg.head_dim,
            (kind, self.device),
        )
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        if kernels::on_host(x) {
            return kernels::rms_norm(x, weight, self.cfg.eps);
        }
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        x * (var + self.cfg.eps).rsqrt() * weight
    }

    /// Rotates adjacent pairs of each query and key head of the step's `[tokens, (heads +
    /// 2 · kv heads) · d]` QKV product in place, by each token's position.
    fn rope(&self, qkv: &mut Tensor, positions: &Tensor) {
        let rotated = (self.heads + self.kv_heads) as usize;
        if kernels::on_host(qkv) {
            return kernels::rope(qkv, positions, &self.cos, &self.sin, rotated);
        }
        let n = qkv.size()[0];
        let d = self.cfg.head_dim;
        let mut x = qkv.narrow(1, 0, rotated as i64 * d);
        let pairs = x.view([n, rotated as i64, d / 2, 2]);
        let (cos, sin) = (
            self.cos.index_select(0, positions).unsqueeze(1),
            self.sin.index_select(0, positions).unsqueeze(1),
        );
        let (a, b) = (pairs.select(3, 0), pairs.select(3, 1));
        let turned = Tensor::stack(&[&a * &cos - &b * &sin, &a * &sin + &b * &cos], 3);
        x.copy_(&turned.view([n, rotated as i64 * d]));
    }

    fn silu_mul(&self, gate_up: &Tensor) -> Tensor {
        if kernels::on_host(gate_up) {
            return kernels::silu_mul(gate_up, self.ffn);
        }
        gate_up.narrow(1, 0, self.ffn).silu() * gate_up.narrow(1, self.ffn, self.ffn)
    }

    /// Runs one step on this rank; rank 0 gets `[sequences, vocab]` logits of each
    /// sequence's last token, the others `None`.
    pub fn step(
        &self,
        step: &Step,
        cache: &mut KvCache,
        comm: &dyn Collective,
    ) -> Result<Option<Tensor>, ModelError> {
        let _guard = tch::no_grad_guard();
        let ids = step.tokens.get(0);
        let positions = step.tokens.get(1);
        let write = step.tokens.get(2);
        let seqs = Vec::<i64>::try_from(step.seqs.to_device(Device::Cpu).view([-1]))?;
        let seqs: Vec<[i64; 3]> = seqs.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect();
        let plan = Plan::new(&seqs, &step.rows, self.device)?;
        let shape = Heads {
            heads: self.heads as usize,
            kv_heads: self.kv_heads as usize,
            d: self.cfg.head_dim as usize,
        };
        let mut x = self.embed.lookup(&ids);
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm);
            let mut qkv = layer.qkv.apply(&h)?;
            self.rope(&mut qkv, &positions);
            cache.write(l, &write, &qkv);
            let attn = plan.attend(&qkv, &positions, cache, l, shape);
            let mut o = layer.out.apply(&attn)?;
            comm.all_reduce_sum(&mut o)?;
            x += o;
            let h = self.rms_norm(&x, &layer.ffn_norm);
            let act = self.silu_mul(&layer.gate_up.apply(&h)?);
            let mut y = layer.down.apply(&act)?;
            comm.all_reduce_sum(&mut y)?;
            x += y;
        }
        if self.shard.rank != 0 {
            return Ok(None);
        }
        let last = Tensor::from_slice(&seqs.iter().map(|s| s[0] + s[1] - 1).collect::<Vec<_>>())
            .to_device(self.device);
        let h = self.rms_norm(&x.index_select(0, &last), &self.norm);
        Ok(Some(self.embed.logits(&h)?))
    }
}
