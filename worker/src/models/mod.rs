//! Models a worker can serve, written once for one rank or a tensor-parallel group.
//!
//! A batch goes through three steps: [`Model::prepare`] (rank 0 only: validate and
//! tokenize the inputs), [`Model::forward`] (every rank, with collectives), and
//! [`Model::outputs`] (rank 0 only: back to host tensors). Models speak only their own
//! types ([`types`]); the gRPC edge converts.

pub mod gguf;
pub mod llama;
pub mod minilm;
pub mod mlp;
pub mod safetensors;
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
    /// Tokens per row after truncation, for text models.
    pub token_counts: Option<Vec<i64>>,
}

impl Prepared {
    /// Rows `start..start + len` (every tensor's first dimension is the rows).
    pub fn rows_range(&self, start: usize, len: usize) -> Prepared {
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
