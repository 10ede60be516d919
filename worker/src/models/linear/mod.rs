//! A decoder's matrices as a rank holds them (`--weights`), and the one product the
//! model asks of them: `x · wᵀ` for a float32 `x`, float32 out. Norms, RoPE, attention
//! and the all-reduced sums stay float32 whichever kind the matrices are.

mod fbgemm;

pub use fbgemm::{Float16, Int8};

use tch::{Device, Kind, Tensor};

use crate::models::ModelError;

/// How a rank holds a decoder's matrices. The GGUF's values are dequantized to float32
/// first; the kinds below are made from those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// Exactly the file's values (the reference's numerics).
    Float32,
    /// Matrices rounded to bfloat16 and multiplied in bfloat16 (float32 accumulation,
    /// the product rounded to bfloat16): half the bytes a step reads. On CPUs with
    /// AVX512-BF16, oneDNN's kernels make a step faster than float32 (docs/generation.md),
    /// at a cost in logits of about 0.1.
    BFloat16,
    /// Matrices rounded to float16, multiplied by fbgemm's FP16 kernels (AVX2) with
    /// float32 inputs and accumulation; logits within about 0.01. Two bytes a value, but
    /// fbgemm's packed layout pads the inner dimension to its block (SmolLM2's 576 to
    /// 1024), so a rank's memory is about 0.9× float32's (measured). CPU only.
    Float16,
    /// Matrices quantized per row to 7-bit integers, multiplied by fbgemm's int8 kernels
    /// (AVX2; AVX-512 and VNNI where present) with each product's input quantized to
    /// uint8: about a third of float32's memory. The MLP's down projection stays float16
    /// ([`Weights::for_outlier_inputs`]). CPU only.
    Int8,
}

impl Weights {
    pub fn name(self) -> &'static str {
        match self {
            Weights::Float32 => "float32",
            Weights::BFloat16 => "bfloat16",
            Weights::Float16 => "float16",
            Weights::Int8 => "int8",
        }
    }

    /// The kind for a matrix whose inputs have outliers: SmolLM2's MLP activations reach
    /// 240× their RMS in a few channels (measured), which one uint8 scale per product
    /// cannot resolve (up to 16% error in that product, against 2–3% elsewhere), so int8
    /// gives way to float16 there.
    pub fn for_outlier_inputs(self) -> Weights {
        match self {
            Weights::Int8 => Weights::Float16,
            other => other,
        }
    }
}

/// One `[out, in]` matrix in the kind [`Weights`] chose.
pub enum Linear {
    /// float32 or bfloat16, multiplied by libtorch (MKL, or oneDNN for bfloat16).
    Dense(Tensor),
    Float16(Float16),
    Int8(Int8),
}

impl Linear {
    /// Takes a float32 `[out, in]` matrix (on the CPU) and holds it as `weights` on `device`.
    pub fn new(w: &Tensor, weights: Weights, device: Device) -> Result<Self, ModelError> {
        Ok(match weights {
            Weights::Int8 => Linear::Int8(Int8::quantize(&cpu_only(w, weights, device)?)?.0),
            Weights::Float16 => Linear::Float16(Float16::pack(&cpu_only(w, weights, device)?)?),
            dense => Linear::Dense(dense_matrix(w, dense, device)),
        })
    }

    /// `x · wᵀ` for a float32 `[rows, in]` `x`: `[rows, out]` float32.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            Linear::Dense(w) => Ok(dense_product(x, w)),
            Linear::Float16(m) => Ok(m.apply(x)?),
            Linear::Int8(m) => Ok(m.apply(x)?),
        }
    }
}

/// A tied embedding: the output projection, and the table its rows are looked up in by
/// token id.
pub struct Embedding {
    output: Linear,
    table: Table,
}

enum Table {
    /// float32 or bfloat16 (the output's own matrix), or float16.
    Dense(Tensor),
    /// The output's int8 values with their `[vocab, 1]` scales.
    Int8 { rows: Tensor, scales: Tensor },
}

impl Embedding {
    pub fn new(w: &Tensor, weights: Weights, device: Device) -> Result<Self, ModelError> {
        let (output, table) = match weights {
            Weights::Int8 => {
                let (output, rows) = Int8::quantize(&cpu_only(w, weights, device)?)?;
                let scales = output.scales().unsqueeze(1);
                (Linear::Int8(output), Table::Int8 { rows, scales })
            }
            Weights::Float16 => (
                Linear::new(w, weights, device)?,
                Table::Dense(w.to_kind(Kind::Half).to_device(device)),
            ),
            dense => {
                let m = dense_matrix(w, dense, device);
                (Linear::Dense(m.shallow_clone()), Table::Dense(m))
            }
        };
        Ok(Self { output, table })
    }

    /// The rows of `ids`, float32 `[ids, hidden]`.
    pub fn lookup(&self, ids: &Tensor) -> Tensor {
        match &self.table {
            Table::Dense(w) => w.index_select(0, ids).to_kind(Kind::Float),
            Table::Int8 { rows, scales } => {
                rows.index_select(0, ids).to_kind(Kind::Float) * scales.index_select(0, ids)
            }
        }
    }

    /// `[rows, vocab]` float32 logits of a float32 `h`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor, ModelError> {
        self.output.apply(h)
    }
}

fn dense_matrix(w: &Tensor, weights: Weights, device: Device) -> Tensor {
    let kind = if weights == Weights::BFloat16 {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    w.to_kind(kind).contiguous().to_device(device)
}

/// Kept `[out, in]` (the file's layout, nn.Linear's) and used as `x.mm(w.tr())`:
/// measured on 2 cores, MKL's kernels for a few rows against the transposed weight beat
/// an `[in, out]` copy (8 sequences: 113 -> 125 tokens/s).
fn dense_product(x: &Tensor, w: &Tensor) -> Tensor {
    match w.kind() {
        Kind::Float => x.mm(&w.tr()),
        kind => x.to_kind(kind).mm(&w.tr()).to_kind(Kind::Float),
    }
}

fn cpu_only(w: &Tensor, weights: Weights, device: Device) -> Result<Tensor, ModelError> {
    if device != Device::Cpu {
        return Err(ModelError::Load(format!(
            "{} weights run on fbgemm's CPU kernels; choose float32 or bfloat16 for {device:?}",
            weights.name()
        )));
    }
    Ok(w.to_kind(Kind::Float))
}
