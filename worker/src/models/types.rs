//! The models' own view of tensors and signatures. No wire type appears here: the gRPC
//! edge (`crate::wire`) converts from and to `rankway.worker.v1` once, in each direction.

use std::path::PathBuf;

use bytes::Bytes;

/// Element type of a model input or output, named as the Open Inference Protocol names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Bool,
    Uint8,
    Int8,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    /// Variable-length elements (text or binary), one per tensor element.
    Bytes,
}

impl DType {
    /// The OIP name, e.g. `FP32`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::Uint8 => "UINT8",
            DType::Int8 => "INT8",
            DType::Int32 => "INT32",
            DType::Int64 => "INT64",
            DType::Fp16 => "FP16",
            DType::Fp32 => "FP32",
            DType::Fp64 => "FP64",
            DType::Bytes => "BYTES",
        }
    }
}

/// What a tensor holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// Fixed-size numbers, little-endian, row-major.
    Raw(Bytes),
    /// One byte string per element (a `Bytes` tensor).
    Elements(Vec<Bytes>),
}

/// `values` as one little-endian byte buffer.
fn le_bytes<T: Copy, const N: usize>(values: &[T], to_le: fn(T) -> [u8; N]) -> Bytes {
    values.iter().flat_map(|&v| to_le(v)).collect::<Vec<u8>>().into()
}

/// A named tensor on the host: an input before `prepare`, an output after `outputs`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
    pub values: Values,
}

impl HostTensor {
    /// An FP32 tensor of `shape` holding `values`.
    pub fn f32(name: &str, shape: Vec<i64>, values: &[f32]) -> Self {
        Self {
            name: name.to_owned(),
            dtype: DType::Fp32,
            shape,
            values: Values::Raw(le_bytes(values, f32::to_le_bytes)),
        }
    }

    /// A one-dimensional INT64 tensor.
    pub fn i64(name: &str, values: &[i64]) -> Self {
        Self {
            name: name.to_owned(),
            dtype: DType::Int64,
            shape: vec![values.len() as i64],
            values: Values::Raw(le_bytes(values, i64::to_le_bytes)),
        }
    }

    /// A one-dimensional `Bytes` tensor of texts.
    pub fn texts<T: AsRef<str>>(name: &str, texts: &[T]) -> Self {
        Self {
            name: name.to_owned(),
            dtype: DType::Bytes,
            shape: vec![texts.len() as i64],
            values: Values::Elements(
                texts
                    .iter()
                    .map(|t| Bytes::copy_from_slice(t.as_ref().as_bytes()))
                    .collect(),
            ),
        }
    }

    /// Rows: the first dimension (0 for a scalar).
    pub fn rows(&self) -> i64 {
        self.shape.first().copied().unwrap_or(0)
    }
}

/// One input or output of a model; -1 in `shape` marks the batch dimension.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    pub fn new(name: &str, dtype: DType, shape: &[i64]) -> Self {
        Self {
            name: name.to_owned(),
            dtype,
            shape: shape.to_vec(),
        }
    }
}

/// What a loaded model is and takes: reported to the gateway, which validates requests
/// against it.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub name: String,
    pub version: String,
    /// e.g. "tch-bert" or "tch-mlp".
    pub platform: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// How the weights are split over the ranks, e.g. "tp=2 heads/rank=6".
    pub shard_layout: String,
    /// Largest batch (rows) in one call.
    pub max_batch_size: u32,
}

/// Which network to build, and from what.
#[derive(Debug, Clone, PartialEq)]
pub enum Architecture {
    /// all-MiniLM-L6-v2 from the files in `dir`.
    MiniLm { dir: PathBuf },
    /// The synthetic MLP.
    Mlp(super::mlp::MlpConfig),
    /// A generative LLaMA-family decoder from a GGUF file ([`super::llama`]); it runs on
    /// the generation engine, not through [`super::Model`].
    Llama {
        gguf: PathBuf,
        weights: super::llama::Weights,
    },
}

/// Everything a model needs to load, independent of how it was configured.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// Name and version the model is served under.
    pub name: String,
    pub version: String,
    pub max_batch_size: u32,
    /// Longest text a text model takes, in bytes, checked before tokenizing.
    pub max_text_bytes: usize,
    /// Where the weights and the group's tensors live.
    pub device: tch::Device,
}
