//! OIP v2 JSON tensors ↔ the raw little-endian tensors the gateway carries.

use rankway_proto::codec::{decode_bytes_elements, push_bytes_element};
use rankway_proto::worker::{DataType, Tensor};
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{ApiError, shown, shown_shape};

/// One input of an OIP JSON request; `parameters` are accepted and ignored. `data` is
/// kept as the request's own text until the datatype is known, then read element by
/// element straight into the tensor's bytes: no `serde_json::Value` tree, which costs many
/// times the body's size for a long array of numbers (`tests/tests/hostile_input.rs`
/// measures the bound).
#[derive(Debug, Deserialize)]
pub struct JsonInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    pub data: Box<RawValue>,
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

/// Where the elements of a `data` array go, in row-major order, as `dtype` encodes them.
struct Elements {
    dtype: DataType,
    out: Vec<u8>,
    count: usize,
    /// At most this many elements (the shape's); more is an error at once.
    limit: usize,
    /// What was wrong with an element (serde_json's own errors quote values).
    error: Option<String>,
}

/// Copies `bytes` to the front of `buf`; their length.
fn write(buf: &mut [u8; 8], bytes: &[u8]) -> usize {
    buf[..bytes.len()].copy_from_slice(bytes);
    bytes.len()
}

/// Reads one JSON value of `data`: an array (nested arrays flatten) or an element.
struct Flatten<'a>(&'a mut Elements);

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Flatten<'_> {
    /// Appends an element's bytes; `None`: the element is not of the datatype.
    fn push<E: de::Error>(&mut self, bytes: Option<&[u8]>) -> Result<(), E> {
        let e = &mut *self.0;
        let problem = if e.count >= e.limit {
            format!("data has more elements than the shape's {}", e.limit)
        } else if let Some(bytes) = bytes {
            e.out.extend_from_slice(bytes);
            e.count += 1;
            return Ok(());
        } else {
            let want = match e.dtype {
                DataType::Int64 => "a 64-bit integer",
                DataType::Int32 => "a 32-bit integer",
                DataType::Bool => "a boolean",
                DataType::Bytes => "a string",
                _ => "a number",
            };
            format!("element {} is not {want}", e.count)
        };
        let err = E::custom(&problem);
        e.error = Some(problem);
        Err(err)
    }

    fn number<E: de::Error>(mut self, int: Option<i64>, float: f64) -> Result<(), E> {
        // Encoded on the stack: no allocation per element.
        let mut buf = [0u8; 8];
        let len = match self.0.dtype {
            DataType::Fp32 => Some(write(&mut buf, &(float as f32).to_le_bytes())),
            DataType::Fp64 => Some(write(&mut buf, &float.to_le_bytes())),
            DataType::Int64 => int.map(|x| write(&mut buf, &x.to_le_bytes())),
            DataType::Int32 => int
                .and_then(|x| i32::try_from(x).ok())
                .map(|x| write(&mut buf, &x.to_le_bytes())),
            _ => None,
        };
        self.push(len.map(|n| &buf[..n]))
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.number(Some(v), v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.number(i64::try_from(v).ok(), v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.number(None, v)
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<(), E> {
        let ok = self.0.dtype == DataType::Bool;
        self.push(ok.then_some(&[u8::from(v)][..]))
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<(), E> {
        if self.0.dtype != DataType::Bytes {
            return self.push(None);
        }
        let mut element = Vec::with_capacity(4 + v.len());
        push_bytes_element(&mut element, v.as_bytes());
        self.push(Some(&element))
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
    if !matches!(
        dtype,
        DataType::Bytes
            | DataType::Fp32
            | DataType::Fp64
            | DataType::Int64
            | DataType::Int32
            | DataType::Bool
    ) {
        return Err(bad(format!(
            "input {}: datatype {} is not accepted in JSON by this gateway",
            shown(&name),
            dtype.oip_name()
        )));
    }
    let expected = input
        .shape
        .iter()
        .try_fold(1usize, |n, &d| {
            usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
        })
        .ok_or_else(|| {
            bad(format!(
                "input {}: shape {} is not a valid shape",
                shown(&name),
                shown_shape(&input.shape)
            ))
        })?;
    let mut elements = Elements {
        dtype,
        out: Vec::new(),
        count: 0,
        limit: expected,
        error: None,
    };
    let mut de = serde_json::Deserializer::from_str(input.data.get());
    Flatten(&mut elements).deserialize(&mut de).map_err(|e| {
        let problem = elements
            .error
            .take()
            .unwrap_or_else(|| crate::frontend::http::json_error(&e));
        bad(format!("input {}: {problem}", shown(&name)))
    })?;
    if elements.count != expected {
        return Err(bad(format!(
            "input {}: shape {} needs {expected} elements, data has {}",
            shown(&name),
            shown_shape(&input.shape),
            elements.count
        )));
    }
    Ok(Tensor {
        name,
        datatype: dtype as i32,
        shape: input.shape,
        data: elements.out.into(),
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

    fn input(v: serde_json::Value) -> Result<Tensor, ApiError> {
        input_to_tensor(serde_json::from_str(&v.to_string()).unwrap())
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
        for (datatype, data, want) in [
            ("BYTES", json!([true]), "element 0 is not a string"),
            ("BOOL", json!(["yes"]), "element 0 is not a boolean"),
            ("INT64", json!([1.5]), "element 0 is not a 64-bit integer"),
            (
                "INT32",
                json!([1, 3_000_000_000u64]),
                "element 1 is not a 32-bit integer",
            ),
            ("FP32", json!([[1], ["x"]]), "element 1 is not a number"),
        ] {
            let shape = if datatype == "INT32" || datatype == "FP32" {
                2
            } else {
                1
            };
            let e = input(json!({"name": "t", "shape": [shape], "datatype": datatype, "data": data}))
                .unwrap_err();
            assert!(e.to_string().contains(want), "{datatype}: {e}");
        }
        let e = input(json!({"name": "t", "shape": [1], "datatype": "FP32", "data": [1, 2]})).unwrap_err();
        assert!(e.to_string().contains("more elements than the shape's 1"), "{e}");
        let e = input(json!({"name": "t", "shape": [1], "datatype": "STRING", "data": ["a"]})).unwrap_err();
        assert!(e.to_string().contains("unknown datatype"), "{e}");
    }
}
