//! A batch's rows: the callers' inputs joined along the batch dimension, and the outputs
//! cut back into each caller's rows.

use bytes::Bytes;
use rankway_proto::codec::{decode_bytes_elements, encode_bytes_elements};
use rankway_proto::worker::Tensor;

use super::Entry;
use crate::error::ApiError;

/// Joins the entries' inputs along the batch dimension (inputs are in model order). A
/// batch of one request shares its buffers instead of copying them.
pub(super) fn concat_inputs(batch: &[Entry]) -> Vec<Tensor> {
    let first = &batch[0].request.inputs;
    if batch.len() == 1 {
        return first.clone();
    }
    (0..first.len())
        .map(|i| {
            let mut data = Vec::with_capacity(batch.iter().map(|e| e.request.inputs[i].data.len()).sum());
            let mut rows = 0;
            for e in batch {
                let t = &e.request.inputs[i];
                data.extend_from_slice(&t.data);
                rows += t.shape[0];
            }
            let mut shape = first[i].shape.clone();
            shape[0] = rows;
            Tensor {
                name: first[i].name.clone(),
                datatype: first[i].datatype,
                shape,
                data: data.into(),
            }
        })
        .collect()
}

/// Cuts each output of a batch into consecutive row ranges of `sizes`.
pub(super) fn split_outputs(outputs: Vec<Tensor>, sizes: &[usize]) -> Result<Vec<Vec<Tensor>>, ApiError> {
    let total: usize = sizes.iter().sum();
    let mut parts: Vec<Vec<Tensor>> = sizes.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for out in outputs {
        if out.shape.first().copied() != Some(total as i64) {
            return Err(ApiError::Internal(format!(
                "worker returned {:?} with shape {:?} for a batch of {total} rows",
                out.name, out.shape
            )));
        }
        let per_row: usize = out.shape[1..].iter().product::<i64>() as usize;
        let dtype = out.datatype();
        let mut offset = 0;
        let elements = match dtype.element_size() {
            Some(_) => None,
            None => Some(
                decode_bytes_elements(&out.data)
                    .map_err(|e| ApiError::Internal(format!("worker output {:?}: {e}", out.name)))?,
            ),
        };
        for (part, &rows) in parts.iter_mut().zip(sizes) {
            let mut shape = out.shape.clone();
            shape[0] = rows as i64;
            let data = match (&elements, dtype.element_size()) {
                (Some(el), _) => Bytes::from(encode_bytes_elements(
                    &el[offset * per_row..(offset + rows) * per_row],
                )),
                (None, Some(size)) => out
                    .data
                    .slice(offset * per_row * size..(offset + rows) * per_row * size),
                (None, None) => unreachable!("BYTES tensors were decoded above"),
            };
            part.push(Tensor {
                name: out.name.clone(),
                datatype: out.datatype,
                shape,
                data,
            });
            offset += rows;
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankway_proto::worker::DataType;

    #[test]
    fn split_keeps_each_callers_rows() {
        let values: Vec<u8> = (0..6u32).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let out = Tensor {
            name: "y".into(),
            datatype: DataType::Fp32 as i32,
            shape: vec![3, 2],
            data: values.into(),
        };
        let names = Tensor {
            name: "n".into(),
            datatype: DataType::Bytes as i32,
            shape: vec![3],
            data: encode_bytes_elements(&["a", "b", "c"]).into(),
        };
        let parts = split_outputs(vec![out, names], &[1, 2]).unwrap();
        assert_eq!(parts[0][0].shape, vec![1, 2]);
        assert_eq!(parts[1][0].shape, vec![2, 2]);
        let second: Vec<f32> = parts[1][0]
            .data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(second, vec![2.0, 3.0, 4.0, 5.0]);
        assert_eq!(
            decode_bytes_elements(&parts[1][1].data).unwrap(),
            vec![&b"b"[..], b"c"]
        );
    }

    #[test]
    fn split_rejects_a_wrong_row_count() {
        let out = Tensor {
            name: "y".into(),
            datatype: DataType::Fp32 as i32,
            shape: vec![2, 1],
            data: vec![0; 8].into(),
        };
        assert!(matches!(
            split_outputs(vec![out], &[1, 2]),
            Err(ApiError::Internal(_))
        ));
    }
}
