//! Models a worker can serve, written once for one rank or a tensor-parallel group.
//!
//! A batch goes through three steps: [`Model::prepare`] (rank 0 only: validate and
//! tokenize the wire tensors), [`Model::forward`] (every rank, with collectives), and
//! [`Model::outputs`] (rank 0 only: back to wire tensors).

pub mod minilm;
pub mod mlp;
pub mod safetensors;

use rankway_proto::worker::{DataType, ModelInfo, Tensor as WireTensor, TensorSpec};
use tch::Tensor;

use crate::config::{ModelArgs, ModelKind};
use crate::dist::{Collective, CollectiveError, Shard};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The request is wrong; the message says how.
    #[error("{0}")]
    InvalidInput(String),
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

pub trait Model: Send {
    fn info(&self) -> ModelInfo;
    fn prepare(&self, inputs: &[WireTensor]) -> Result<Prepared, ModelError>;
    fn forward(&self, batch: &Prepared, comm: &dyn Collective) -> Result<Tensor, ModelError>;
    fn outputs(&self, batch: &Prepared, output: Tensor) -> Result<Vec<WireTensor>, ModelError>;
    /// A small batch that exercises the whole forward pass, run before serving.
    fn warmup_inputs(&self) -> Vec<WireTensor>;
}

/// Loads the model named by `args`, holding the shard of the weights `shard` owns.
pub fn load(args: &ModelArgs, shard: Shard) -> Result<Box<dyn Model>, ModelError> {
    args.check_device().map_err(ModelError::Load)?;
    let name = args.served_name();
    Ok(match args.model {
        ModelKind::Minilm => Box::new(minilm::MiniLm::load(
            &args.model_dir,
            name,
            shard,
            args.max_batch_size,
            args.device,
        )?),
        ModelKind::Mlp => Box::new(mlp::Mlp::new(
            mlp::MlpConfig {
                hidden: args.mlp_hidden,
                layers: args.mlp_layers,
                seed: args.mlp_seed,
            },
            name,
            shard,
            args.max_batch_size,
            args.device,
        )?),
    })
}

pub(crate) fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.to_owned(),
        datatype: datatype as i32,
        shape: shape.to_vec(),
    }
}

/// Finds the single input `spec` names and checks its datatype, rank and fixed dims.
pub(crate) fn expect_input<'a>(
    inputs: &'a [WireTensor],
    spec: &TensorSpec,
    max_rows: u32,
) -> Result<&'a WireTensor, ModelError> {
    if inputs.len() != 1 {
        return Err(ModelError::InvalidInput(format!(
            "expected exactly one input {:?}, got {}",
            spec.name,
            inputs.len()
        )));
    }
    let t = &inputs[0];
    if t.name != spec.name {
        return Err(ModelError::InvalidInput(format!(
            "unexpected input {:?}: this model takes {:?}",
            t.name, spec.name
        )));
    }
    if t.datatype != spec.datatype {
        return Err(ModelError::InvalidInput(format!(
            "input {:?} must be {}, got {}",
            t.name,
            spec.datatype().oip_name(),
            DataType::try_from(t.datatype).map_or("an unknown type", |d| d.oip_name())
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
    if t.shape[0] > i64::from(max_rows) {
        return Err(ModelError::InvalidInput(format!(
            "batch of {} rows exceeds this worker's limit of {max_rows}",
            t.shape[0]
        )));
    }
    Ok(t)
}

/// A float tensor (on any device) as a wire tensor (little-endian f32).
pub(crate) fn f32_to_wire(name: &str, t: &Tensor) -> Result<WireTensor, ModelError> {
    let t = t
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Float)
        .contiguous();
    let values = Vec::<f32>::try_from(t.flatten(0, -1))?;
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(WireTensor {
        name: name.to_owned(),
        datatype: DataType::Fp32 as i32,
        shape: t.size(),
        data: data.into(),
    })
}

pub(crate) fn i64_to_wire(name: &str, values: &[i64]) -> WireTensor {
    WireTensor {
        name: name.to_owned(),
        datatype: DataType::Int64 as i32,
        shape: vec![values.len() as i64],
        data: values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
    }
}

/// A validated FP32 wire tensor as a tch tensor of the same shape.
pub(crate) fn wire_to_f32(t: &WireTensor) -> Result<Tensor, ModelError> {
    let expected: i64 = t.shape.iter().product::<i64>() * 4;
    if t.data.len() as i64 != expected {
        return Err(ModelError::InvalidInput(format!(
            "input {:?} of shape {:?} needs {expected} bytes of FP32 data, got {}",
            t.name,
            t.shape,
            t.data.len()
        )));
    }
    let values: Vec<f32> = t
        .data
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

pub(crate) fn model_info(
    name: &str,
    platform: &str,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    shard_layout: String,
    max_batch_size: u32,
) -> ModelInfo {
    ModelInfo {
        name: name.to_owned(),
        version: "1".to_owned(),
        platform: platform.to_owned(),
        inputs,
        outputs,
        shard_layout,
        max_batch_size,
    }
}
