//! all-MiniLM-L6-v2: a 6-layer BERT encoder with mean pooling and L2 normalisation,
//! sharded Megatron-style.
//!
//! Tensor parallelism: each rank owns `heads / world` attention heads (rows of the Q, K,
//! V projections, columns of the attention output projection) and `intermediate / world`
//! units of the MLP (rows of the up projection, columns of the down projection). The two
//! row-parallel projections produce partial sums, reduced with one all-reduce each; their
//! biases are added once, after the reduction. Embeddings and layer norms are replicated.

use std::path::Path;

use rankway_proto::limits::check_text_bytes;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::{DType, HostTensor, Model, ModelConfig, ModelError, Prepared, Signature, TensorSpec, Values};
use crate::collective::{Collective, Shard};
use crate::formats::safetensors::ShardReader;

pub const INPUT: &str = "text";
pub const OUTPUT: &str = "embedding";
pub const TOKENS: &str = "token_count";

#[derive(Debug, Deserialize)]
struct BertConfig {
    hidden_size: i64,
    num_attention_heads: i64,
    num_hidden_layers: i64,
    intermediate_size: i64,
    layer_norm_eps: f64,
    max_position_embeddings: i64,
    hidden_act: String,
}

#[derive(Debug, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

struct Layer {
    q_w: Tensor,
    q_b: Tensor,
    k_w: Tensor,
    k_b: Tensor,
    v_w: Tensor,
    v_b: Tensor,
    attn_out_w: Tensor,
    attn_out_b: Tensor,
    attn_ln: (Tensor, Tensor),
    up_w: Tensor,
    up_b: Tensor,
    down_w: Tensor,
    down_b: Tensor,
    out_ln: (Tensor, Tensor),
}

pub struct MiniLm {
    signature: Signature,
    tokenizer: Tokenizer,
    max_seq_length: usize,
    max_text_bytes: usize,
    hidden: i64,
    local_heads: i64,
    head_dim: i64,
    eps: f64,
    word_emb: Tensor,
    pos_emb: Tensor,
    type_emb: Tensor,
    emb_ln: (Tensor, Tensor),
    layers: Vec<Layer>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Load(format!("{}: {e}", path.display())))
}

/// This rank's view of `model.safetensors`, placed on the model's device.
struct Weights(ShardReader, Device);

impl Weights {
    fn full(&self, name: &str) -> Result<Tensor, ModelError> {
        Ok(self.0.full(name)?.to_device(self.1))
    }

    /// `len` entries of `dim` starting at `start`: only this rank's part is read.
    fn slice(&self, name: &str, dim: usize, range: (i64, i64)) -> Result<Tensor, ModelError> {
        Ok(self.0.slice(name, dim, range)?.to_device(self.1))
    }

    fn layer_norm(&self, prefix: &str) -> Result<(Tensor, Tensor), ModelError> {
        Ok((
            self.full(&format!("{prefix}.weight"))?,
            self.full(&format!("{prefix}.bias"))?,
        ))
    }
}

impl MiniLm {
    pub fn load(dir: &Path, served: &ModelConfig, shard: Shard) -> Result<Self, ModelError> {
        let device = served.device;
        let cfg: BertConfig = read_json(&dir.join("config.json"))?;
        let st: SentenceBertConfig = read_json(&dir.join("sentence_bert_config.json"))?;
        if cfg.hidden_act != "gelu" {
            return Err(ModelError::Load(format!(
                "unsupported hidden_act {:?} (only \"gelu\")",
                cfg.hidden_act
            )));
        }
        super::check_divisible("the attention heads", cfg.num_attention_heads, shard)?;
        super::check_divisible("the MLP intermediate size", cfg.intermediate_size, shard)?;

        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| ModelError::Load(format!("tokenizer.json: {e}")))?;
        // tokenizer.json pads every text to 128 and truncates at 128. sentence-transformers
        // instead pads to the longest text of the batch and truncates at max_seq_length.
        let max_seq_length = st.max_seq_length.min(cfg.max_position_embeddings as usize);
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| ModelError::Load(format!("tokenizer truncation: {e}")))?;

        let weights = Weights(ShardReader::open(&dir.join("model.safetensors"))?, device);
        let head_dim = cfg.hidden_size / cfg.num_attention_heads;
        let local_heads = cfg.num_attention_heads / shard.world as i64;
        let heads = shard.range(cfg.num_attention_heads);
        let qkv_rows = (heads.0 * head_dim, heads.1 * head_dim);
        let inter = shard.range(cfg.intermediate_size);

        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                let w = |n: &str| format!("{p}.{n}");
                Ok(Layer {
                    q_w: weights.slice(&w("attention.self.query.weight"), 0, qkv_rows)?,
                    q_b: weights.slice(&w("attention.self.query.bias"), 0, qkv_rows)?,
                    k_w: weights.slice(&w("attention.self.key.weight"), 0, qkv_rows)?,
                    k_b: weights.slice(&w("attention.self.key.bias"), 0, qkv_rows)?,
                    v_w: weights.slice(&w("attention.self.value.weight"), 0, qkv_rows)?,
                    v_b: weights.slice(&w("attention.self.value.bias"), 0, qkv_rows)?,
                    attn_out_w: weights.slice(&w("attention.output.dense.weight"), 1, qkv_rows)?,
                    attn_out_b: weights.full(&w("attention.output.dense.bias"))?,
                    attn_ln: weights.layer_norm(&w("attention.output.LayerNorm"))?,
                    up_w: weights.slice(&w("intermediate.dense.weight"), 0, inter)?,
                    up_b: weights.slice(&w("intermediate.dense.bias"), 0, inter)?,
                    down_w: weights.slice(&w("output.dense.weight"), 1, inter)?,
                    down_b: weights.full(&w("output.dense.bias"))?,
                    out_ln: weights.layer_norm(&w("output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;

        let signature = super::signature(
            served,
            "tch-bert",
            vec![TensorSpec::new(INPUT, DType::Bytes, &[-1])],
            vec![
                TensorSpec::new(OUTPUT, DType::Fp32, &[-1, cfg.hidden_size]),
                TensorSpec::new(TOKENS, DType::Int64, &[-1]),
            ],
            format!(
                "tp={} heads/rank={local_heads} intermediate/rank={}",
                shard.world, inter.1
            ),
        );
        Ok(Self {
            signature,
            tokenizer,
            max_seq_length,
            max_text_bytes: served.max_text_bytes,
            hidden: cfg.hidden_size,
            local_heads,
            head_dim,
            eps: cfg.layer_norm_eps,
            word_emb: weights.full("embeddings.word_embeddings.weight")?,
            pos_emb: weights.full("embeddings.position_embeddings.weight")?,
            type_emb: weights.full("embeddings.token_type_embeddings.weight")?,
            emb_ln: weights.layer_norm("embeddings.LayerNorm")?,
            layers,
        })
    }

    /// Longest input (in tokens) a text is truncated to.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    fn layer_norm(&self, x: &Tensor, (w, b): &(Tensor, Tensor)) -> Tensor {
        x.layer_norm([self.hidden], Some(w), Some(b), self.eps, false)
    }

    fn attention(&self, x: &Tensor, mask_add: &Tensor, l: &Layer) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let split = |w: &Tensor, bias: &Tensor| {
            x.linear(w, Some(bias))
                .view([b, t, self.local_heads, self.head_dim])
                .transpose(1, 2)
        };
        let (q, k, v) = (
            split(&l.q_w, &l.q_b),
            split(&l.k_w, &l.k_b),
            split(&l.v_w, &l.v_b),
        );
        let scores = q.matmul(&k.transpose(-1, -2)) / (self.head_dim as f64).sqrt() + mask_add;
        let ctx = scores.softmax(-1, Kind::Float).matmul(&v);
        ctx.transpose(1, 2)
            .contiguous()
            .view([b, t, self.local_heads * self.head_dim])
            .linear::<Tensor>(&l.attn_out_w, None)
    }
}

impl Model for MiniLm {
    fn signature(&self) -> Signature {
        self.signature.clone()
    }

    fn prepare(&self, inputs: &[HostTensor]) -> Result<Prepared, ModelError> {
        let sig = &self.signature;
        let input = super::expect_input(inputs, &sig.inputs[0], sig.max_batch_size)?;
        let Values::Elements(elements) = &input.values else {
            return Err(ModelError::InvalidInput(format!(
                "input {INPUT:?} must hold one text per element"
            )));
        };
        if elements.len() as i64 != input.rows() {
            return Err(ModelError::InvalidInput(format!(
                "input {INPUT:?} has shape {:?} but holds {} elements",
                input.shape,
                elements.len()
            )));
        }
        check_text_bytes(elements, self.max_text_bytes)
            .map_err(|e| ModelError::InvalidInput(e.to_string()))?;
        let texts = elements
            .iter()
            .enumerate()
            .map(|(i, e)| {
                std::str::from_utf8(e)
                    .map_err(|err| ModelError::InvalidInput(format!("text {i} is not valid UTF-8: {err}")))
            })
            .collect::<Result<Vec<&str>, _>>()?;
        let encodings = self
            .tokenizer
            .encode_batch(texts, true)
            .map_err(|e| ModelError::InvalidInput(format!("tokenizer: {e}")))?;
        let rows = encodings.len();
        let len = encodings.first().map_or(0, |e| e.len());
        let mut ids = Vec::with_capacity(rows * len);
        let mut mask = Vec::with_capacity(rows * len);
        let mut counts = Vec::with_capacity(rows);
        for e in &encodings {
            ids.extend(e.get_ids().iter().map(|&v| i64::from(v)));
            mask.extend(e.get_attention_mask().iter().map(|&v| i64::from(v)));
            counts.push(e.get_attention_mask().iter().map(|&v| i64::from(v)).sum());
        }
        let shape = [rows as i64, len as i64];
        Ok(Prepared {
            rows,
            tensors: vec![
                Tensor::from_slice(&ids).view(shape),
                Tensor::from_slice(&mask).view(shape),
            ],
            token_counts: Some(counts),
        })
    }

    fn forward(&self, batch: &Prepared, comm: &dyn Collective) -> Result<Tensor, ModelError> {
        let [ids, mask] = batch.tensors.as_slice() else {
            return Err(ModelError::InvalidInput(
                "expected token ids and attention mask".into(),
            ));
        };
        let t = ids.size()[1];
        let positions = Tensor::arange(t, (Kind::Int64, ids.device()));
        let embed = |table: &Tensor, idx: &Tensor| Tensor::embedding(table, idx, -1, false, false);
        let x =
            embed(&self.word_emb, ids) + embed(&self.pos_emb, &positions).unsqueeze(0) + self.type_emb.get(0);
        let mut x = self.layer_norm(&x, &self.emb_ln);

        // Additive mask: 0 where attended, the most negative float where padded (as
        // Hugging Face BERT does), broadcast over heads and query positions.
        let maskf = mask.to_kind(Kind::Float);
        let mask_add = ((&maskf - 1.0) * f64::from(f32::MAX)).view([-1, 1, 1, t]);

        for l in &self.layers {
            let mut attn = self.attention(&x, &mask_add, l);
            comm.all_reduce_sum(&mut attn)?;
            x = self.layer_norm(&(attn + &l.attn_out_b + &x), &l.attn_ln);

            let mut mlp = x
                .linear(&l.up_w, Some(&l.up_b))
                .gelu("none")
                .linear::<Tensor>(&l.down_w, None);
            comm.all_reduce_sum(&mut mlp)?;
            x = self.layer_norm(&(mlp + &l.down_b + &x), &l.out_ln);
        }

        let m = maskf.unsqueeze(-1);
        let pooled = (&x * &m).sum_dim_intlist(1, false, Kind::Float)
            / m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9);
        let norm = pooled.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
        Ok(pooled / norm)
    }

    fn outputs(&self, batch: &Prepared, output: Tensor) -> Result<Vec<HostTensor>, ModelError> {
        let counts = batch.token_counts.as_deref().unwrap_or_default();
        Ok(vec![
            super::f32_output(OUTPUT, &output)?,
            HostTensor::i64(TOKENS, counts),
        ])
    }

    fn warmup_inputs(&self) -> Vec<HostTensor> {
        vec![HostTensor::texts(
            INPUT,
            &["Rankway warms up.", "Every rank takes part in every batch."],
        )]
    }
}
