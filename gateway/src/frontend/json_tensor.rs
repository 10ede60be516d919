//! OIP v2 JSON tensors ↔ the raw little-endian tensors the gateway carries.

use rankway_proto::codec::{decode_bytes_elements, push_bytes_element};
use rankway_proto::worker::{DataType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ApiError, shown};

/// One input of an OIP JSON request; `parameters` are accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct JsonInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    pub data: Value,
}

/// `data` of an output tensor, flat in row-major order.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum JsonData {
    Bool(Vec<bool>),
    Int(Vec<i64>),
    Float(Vec<f64>),
    Fp32(Vec<f32>),
    Text(Vec<String>),
}

#[derive(Debug, Serialize)]
pub struct JsonOutput {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
    pub data: JsonData,
}

/// Flattens nested JSON arrays in row-major order.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

pub fn input_to_tensor(input: JsonInput) -> Result<Tensor, ApiError> {
    let bad = |m: String| ApiError::InvalidInput(m);
    let name = input.name;
    let dtype = DataType::from_oip_name(&input.datatype).ok_or_else(|| {
        bad(format!(
            "input {}: unknown datatype {}",
            shown(&name),
            shown(&input.datatype)
        ))
    })?;
    let mut values = Vec::new();
    flatten(&input.data, &mut values);
    let expected: i64 = input.shape.iter().product();
    if input.shape.iter().any(|&d| d < 0) || values.len() as i64 != expected {
        return Err(bad(format!(
            "input {name:?}: shape {:?} needs {expected} elements, data has {}",
            input.shape,
            values.len()
        )));
    }
    let kind_err = |i: usize, want: &str| bad(format!("input {name:?}: element {i} is not {want}"));
    let mut data = Vec::new();
    for (i, v) in values.iter().enumerate() {
        match dtype {
            DataType::Bytes => {
                let s = v.as_str().ok_or_else(|| kind_err(i, "a string"))?;
                push_bytes_element(&mut data, s.as_bytes());
            }
            DataType::Fp32 => {
                let x = v.as_f64().ok_or_else(|| kind_err(i, "a number"))?;
                data.extend_from_slice(&(x as f32).to_le_bytes());
            }
            DataType::Fp64 => {
                let x = v.as_f64().ok_or_else(|| kind_err(i, "a number"))?;
                data.extend_from_slice(&x.to_le_bytes());
            }
            DataType::Int64 => {
                let x = v.as_i64().ok_or_else(|| kind_err(i, "a 64-bit integer"))?;
                data.extend_from_slice(&x.to_le_bytes());
            }
            DataType::Int32 => {
                let x = v
                    .as_i64()
                    .and_then(|x| i32::try_from(x).ok())
                    .ok_or_else(|| kind_err(i, "a 32-bit integer"))?;
                data.extend_from_slice(&x.to_le_bytes());
            }
            DataType::Bool => {
                let x = v.as_bool().ok_or_else(|| kind_err(i, "a boolean"))?;
                data.push(u8::from(x));
            }
            other => {
                return Err(bad(format!(
                    "input {name:?}: datatype {} is not accepted in JSON by this gateway",
                    other.oip_name()
                )));
            }
        }
    }
    Ok(Tensor {
        name,
        datatype: dtype as i32,
        shape: input.shape,
        data: data.into(),
    })
}

fn le_values<const N: usize, T>(data: &[u8], f: fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunk of N bytes")))
        .collect()
}

pub fn tensor_to_output(t: &Tensor) -> Result<JsonOutput, ApiError> {
    let dtype = t.datatype();
    let data = match dtype {
        DataType::Fp32 => JsonData::Fp32(le_values(&t.data, f32::from_le_bytes)),
        DataType::Fp64 => JsonData::Float(le_values(&t.data, f64::from_le_bytes)),
        DataType::Int64 => JsonData::Int(le_values(&t.data, i64::from_le_bytes)),
        DataType::Int32 => JsonData::Int(le_values(&t.data, |b| i64::from(i32::from_le_bytes(b)))),
        DataType::Bool => JsonData::Bool(t.data.iter().map(|&b| b != 0).collect()),
        DataType::Bytes => JsonData::Text(
            decode_bytes_elements(&t.data)
                .map_err(|e| ApiError::Internal(format!("output {:?}: {e}", t.name)))?
                .into_iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect(),
        ),
        other => {
            return Err(ApiError::Internal(format!(
                "output {:?} has datatype {} that JSON answers do not carry",
                t.name,
                other.oip_name()
            )));
        }
    };
    Ok(JsonOutput {
        name: t.name.clone(),
        datatype: dtype.oip_name(),
        shape: t.shape.clone(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(v: Value) -> Result<Tensor, ApiError> {
        input_to_tensor(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn nested_fp32_round_trips() {
        let t = input(json!({"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2.5], [3, -4]]}))
            .unwrap();
        let out = serde_json::to_value(tensor_to_output(&t).unwrap()).unwrap();
        assert_eq!(out["data"], json!([1.0, 2.5, 3.0, -4.0]));
        assert_eq!(out["shape"], json!([2, 2]));
    }

    #[test]
    fn bad_json_tensors_are_refused() {
        let e = input(json!({"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a"]})).unwrap_err();
        assert!(e.to_string().contains("needs 2 elements, data has 1"), "{e}");
        let e = input(json!({"name": "t", "shape": [1], "datatype": "BYTES", "data": [5]})).unwrap_err();
        assert!(e.to_string().contains("not a string"), "{e}");
        let e = input(json!({"name": "t", "shape": [1], "datatype": "STRING", "data": ["a"]})).unwrap_err();
        assert!(e.to_string().contains("unknown datatype"), "{e}");
    }
}
