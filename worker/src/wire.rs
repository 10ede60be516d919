//! The one place the worker converts between `rankway.worker.v1` and the models' own
//! types: requests' tensors on the way in (checked against their dtype and shape, so a
//! malformed tensor never reaches the model thread, let alone a follower), outputs and
//! signatures on the way out.

use rankway_proto::codec::{decode_bytes_elements, encode_bytes_elements};
use rankway_proto::worker::{self as pb, DataType};

use crate::models::{DType, HostTensor, Signature, TensorSpec, Values};
use crate::stats::Phase;

fn dtype_from_wire(d: DataType) -> Option<DType> {
    Some(match d {
        DataType::Bool => DType::Bool,
        DataType::Uint8 => DType::Uint8,
        DataType::Int8 => DType::Int8,
        DataType::Int32 => DType::Int32,
        DataType::Int64 => DType::Int64,
        DataType::Fp16 => DType::Fp16,
        DataType::Fp32 => DType::Fp32,
        DataType::Fp64 => DType::Fp64,
        DataType::Bytes => DType::Bytes,
        DataType::Unspecified => return None,
    })
}

fn dtype_to_wire(d: DType) -> DataType {
    match d {
        DType::Bool => DataType::Bool,
        DType::Uint8 => DataType::Uint8,
        DType::Int8 => DataType::Int8,
        DType::Int32 => DataType::Int32,
        DType::Int64 => DataType::Int64,
        DType::Fp16 => DataType::Fp16,
        DType::Fp32 => DataType::Fp32,
        DType::Fp64 => DataType::Fp64,
        DType::Bytes => DataType::Bytes,
    }
}

/// A request's tensor as the models take it; the error says what is wrong with it.
pub fn tensor_from_wire(t: pb::Tensor) -> Result<HostTensor, String> {
    let wire_dtype = DataType::try_from(t.datatype).unwrap_or_default();
    let dtype = dtype_from_wire(wire_dtype)
        .ok_or_else(|| format!("input {:?} has an unknown datatype ({})", t.name, t.datatype))?;
    if t.shape.iter().any(|&d| d < 0) {
        return Err(format!(
            "input {:?} has a negative dimension in {:?}",
            t.name, t.shape
        ));
    }
    let elements = t
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
        .ok_or_else(|| format!("input {:?}: shape {:?} is too large", t.name, t.shape))?;
    let values = match wire_dtype.element_size() {
        Some(size) => {
            if elements.checked_mul(size) != Some(t.data.len()) {
                return Err(format!(
                    "input {:?} of shape {:?} needs {elements} x {size} bytes of {}, got {}",
                    t.name,
                    t.shape,
                    dtype.name(),
                    t.data.len()
                ));
            }
            Values::Raw(t.data)
        }
        None => {
            let found = decode_bytes_elements(&t.data).map_err(|e| format!("input {:?}: {e}", t.name))?;
            if found.len() != elements {
                return Err(format!(
                    "input {:?} has shape {:?} but holds {} elements",
                    t.name,
                    t.shape,
                    found.len()
                ));
            }
            Values::Elements(found.into_iter().map(|e| t.data.slice_ref(e)).collect())
        }
    };
    Ok(HostTensor {
        name: t.name,
        dtype,
        shape: t.shape,
        values,
    })
}

pub fn tensor_to_wire(t: HostTensor) -> pb::Tensor {
    pb::Tensor {
        name: t.name,
        datatype: dtype_to_wire(t.dtype) as i32,
        shape: t.shape,
        data: match t.values {
            Values::Raw(data) => data,
            Values::Elements(elements) => encode_bytes_elements(&elements).into(),
        },
    }
}

fn spec_to_wire(s: &TensorSpec) -> pb::TensorSpec {
    pb::TensorSpec {
        name: s.name.clone(),
        datatype: dtype_to_wire(s.dtype) as i32,
        shape: s.shape.clone(),
    }
}

pub fn signature_to_wire(s: &Signature) -> pb::ModelInfo {
    pb::ModelInfo {
        name: s.name.clone(),
        version: s.version.clone(),
        platform: s.platform.clone(),
        inputs: s.inputs.iter().map(spec_to_wire).collect(),
        outputs: s.outputs.iter().map(spec_to_wire).collect(),
        shard_layout: s.shard_layout.clone(),
        max_batch_size: s.max_batch_size,
    }
}

pub fn phase_to_wire(p: Phase) -> pb::RankPhase {
    match p {
        Phase::Joining => pb::RankPhase::Joining,
        Phase::Warming => pb::RankPhase::Warming,
        Phase::Ready => pb::RankPhase::Ready,
        Phase::Broken => pb::RankPhase::Broken,
        Phase::Stopped => pb::RankPhase::Unspecified,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(datatype: DataType, shape: Vec<i64>, data: Vec<u8>) -> pb::Tensor {
        pb::Tensor {
            name: "x".into(),
            datatype: datatype as i32,
            shape,
            data: data.into(),
        }
    }

    #[test]
    fn tensors_round_trip() {
        let texts = HostTensor::texts("text", &["a", "", "ünï"]);
        assert_eq!(tensor_from_wire(tensor_to_wire(texts.clone())).unwrap(), texts);
        let floats = HostTensor::f32("input", vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(tensor_from_wire(tensor_to_wire(floats.clone())).unwrap(), floats);
    }

    #[test]
    fn malformed_tensors_are_refused_with_a_reason() {
        let short = tensor_from_wire(wire(DataType::Fp32, vec![1, 2], vec![0; 7])).unwrap_err();
        assert!(short.contains("needs 2 x 4 bytes of FP32, got 7"), "{short}");
        let count =
            tensor_from_wire(wire(DataType::Bytes, vec![2], encode_bytes_elements(&["a"]))).unwrap_err();
        assert!(count.contains("holds 1 elements"), "{count}");
        let cut = tensor_from_wire(wire(DataType::Bytes, vec![1], vec![9, 0, 0, 0, b'a'])).unwrap_err();
        assert!(cut.contains("declares 9 bytes"), "{cut}");
        let unknown = tensor_from_wire(wire(DataType::Unspecified, vec![1], vec![0])).unwrap_err();
        assert!(unknown.contains("unknown datatype"), "{unknown}");
        let negative = tensor_from_wire(wire(DataType::Fp32, vec![-1], vec![])).unwrap_err();
        assert!(negative.contains("negative dimension"), "{negative}");
    }
}
