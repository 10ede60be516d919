//! What the gateway knows of a model (its signature, learnt from the groups serving it)
//! and the checks every request passes before it may join a batch. A request that is
//! wrong must fail on its own here, never inside a batch where it would fail others.

use rankway_proto::codec::decode_bytes_elements;
use rankway_proto::worker::{DataType, ModelInfo, Tensor, TensorSpec};

use crate::error::ApiError;

/// A request that passed validation: inputs in the model's order, and its row count.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub inputs: Vec<Tensor>,
    pub rows: usize,
}

fn dtype_name(code: i32) -> &'static str {
    DataType::try_from(code).map_or("an unknown type", |d| d.oip_name())
}

/// Checks `inputs` against the model's signature and orders them as the model lists them.
pub fn validate(info: &ModelInfo, mut inputs: Vec<Tensor>) -> Result<ValidRequest, ApiError> {
    let bad = |m: String| Err(ApiError::InvalidInput(m));
    for t in &inputs {
        if !info.inputs.iter().any(|s| s.name == t.name) {
            let names: Vec<_> = info.inputs.iter().map(|s| s.name.as_str()).collect();
            return bad(format!(
                "model {:?} has no input {:?}; its inputs are {names:?}",
                info.name, t.name
            ));
        }
        if inputs.iter().filter(|o| o.name == t.name).count() > 1 {
            return bad(format!("input {:?} is given more than once", t.name));
        }
    }
    let mut ordered = Vec::with_capacity(info.inputs.len());
    let mut rows: Option<i64> = None;
    for spec in &info.inputs {
        let Some(pos) = inputs.iter().position(|t| t.name == spec.name) else {
            return bad(format!("missing input {:?} of model {:?}", spec.name, info.name));
        };
        let t = inputs.swap_remove(pos);
        check_tensor(spec, &t)?;
        match rows {
            Some(r) if r != t.shape[0] => {
                return bad(format!(
                    "inputs disagree on the batch size: {r} vs {} in {:?}",
                    t.shape[0], t.name
                ));
            }
            _ => rows = Some(t.shape[0]),
        }
        ordered.push(t);
    }
    let rows = rows.unwrap_or(0) as usize;
    if info.max_batch_size > 0 && rows > info.max_batch_size as usize {
        return bad(format!(
            "request has {rows} rows; model {:?} takes at most {} per request",
            info.name, info.max_batch_size
        ));
    }
    Ok(ValidRequest {
        inputs: ordered,
        rows,
    })
}

fn check_tensor(spec: &TensorSpec, t: &Tensor) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::InvalidInput(m));
    if t.datatype != spec.datatype {
        return bad(format!(
            "input {:?} must be {}, got {}",
            t.name,
            dtype_name(spec.datatype),
            dtype_name(t.datatype)
        ));
    }
    let fits = t.shape.len() == spec.shape.len()
        && t.shape
            .iter()
            .zip(&spec.shape)
            .all(|(&got, &want)| want == -1 || got == want);
    if !fits {
        return bad(format!(
            "input {:?} has shape {:?}; expected {:?} where -1 is the batch size",
            t.name, t.shape, spec.shape
        ));
    }
    if t.shape.iter().any(|&d| d < 0) {
        return bad(format!(
            "input {:?} has a negative dimension in {:?}",
            t.name, t.shape
        ));
    }
    if t.shape.first() == Some(&0) {
        return bad(format!("input {:?} is empty: give at least one element", t.name));
    }
    let elements: i64 = t.shape.iter().product();
    match spec.datatype().element_size() {
        Some(size) => {
            let want = elements as usize * size;
            if t.data.len() != want {
                return bad(format!(
                    "input {:?} of shape {:?} needs {want} bytes of data, got {}",
                    t.name,
                    t.shape,
                    t.data.len()
                ));
            }
        }
        None => {
            let parts = decode_bytes_elements(&t.data)
                .map_err(|e| ApiError::InvalidInput(format!("input {:?}: {e}", t.name)))?;
            if parts.len() as i64 != elements {
                return bad(format!(
                    "input {:?} of shape {:?} holds {} elements, expected {elements}",
                    t.name,
                    t.shape,
                    parts.len()
                ));
            }
            // BYTES inputs of Rankway's models are text.
            for (i, p) in parts.iter().enumerate() {
                if let Err(e) = std::str::from_utf8(p) {
                    return bad(format!("input {:?} element {i} is not valid UTF-8: {e}", t.name));
                }
            }
        }
    }
    Ok(())
}

/// The first text input and the embedding output, for the OpenAI embeddings route.
pub fn text_embedding_io(info: &ModelInfo) -> Result<(&TensorSpec, &TensorSpec), ApiError> {
    let input = info
        .inputs
        .iter()
        .find(|s| s.datatype == DataType::Bytes as i32 && s.shape == [-1]);
    let output = info
        .outputs
        .iter()
        .find(|s| s.datatype == DataType::Fp32 as i32 && s.shape.len() == 2);
    match (input, output, info.inputs.len()) {
        (Some(i), Some(o), 1) => Ok((i, o)),
        _ => Err(ApiError::InvalidInput(format!(
            "model {:?} is not a text embedding model; use /v2/models/{}/infer",
            info.name, info.name
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankway_proto::codec::encode_bytes_elements;

    fn info() -> ModelInfo {
        ModelInfo {
            name: "minilm".into(),
            inputs: vec![TensorSpec {
                name: "text".into(),
                datatype: DataType::Bytes as i32,
                shape: vec![-1],
            }],
            outputs: vec![TensorSpec {
                name: "embedding".into(),
                datatype: DataType::Fp32 as i32,
                shape: vec![-1, 384],
            }],
            max_batch_size: 4,
            ..Default::default()
        }
    }

    fn text(shape: Vec<i64>, data: Vec<u8>) -> Tensor {
        Tensor {
            name: "text".into(),
            datatype: DataType::Bytes as i32,
            shape,
            data: data.into(),
        }
    }

    fn err(r: Result<ValidRequest, ApiError>) -> String {
        match r {
            Err(ApiError::InvalidInput(m)) => m,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_good_request() {
        let v = validate(&info(), vec![text(vec![2], encode_bytes_elements(&["a", "b"]))]).unwrap();
        assert_eq!(v.rows, 2);
    }

    #[test]
    fn rejects_each_kind_of_bad_input() {
        let i = info();
        assert!(err(validate(&i, vec![])).contains("missing input \"text\""));
        let mut wrong_type = text(vec![1], vec![0; 4]);
        wrong_type.datatype = DataType::Fp32 as i32;
        assert!(err(validate(&i, vec![wrong_type])).contains("must be BYTES, got FP32"));
        assert!(
            err(validate(
                &i,
                vec![text(vec![1, 1], encode_bytes_elements(&["a"]))]
            ))
            .contains("shape")
        );
        assert!(err(validate(&i, vec![text(vec![0], vec![])])).contains("empty"));
        assert!(
            err(validate(&i, vec![text(vec![2], encode_bytes_elements(&["a"]))]))
                .contains("holds 1 elements")
        );
        assert!(
            err(validate(
                &i,
                vec![text(vec![1], encode_bytes_elements(&[&[0xff, 0xfe][..]]))]
            ))
            .contains("UTF-8")
        );
        let five = encode_bytes_elements(&["a"; 5]);
        assert!(err(validate(&i, vec![text(vec![5], five)])).contains("at most 4"));
        let mut unknown = text(vec![1], encode_bytes_elements(&["a"]));
        unknown.name = "txt".into();
        assert!(err(validate(&i, vec![unknown])).contains("no input \"txt\""));
    }

    #[test]
    fn finds_text_embedding_io() {
        let i = info();
        let (inp, out) = text_embedding_io(&i).unwrap();
        assert_eq!((inp.name.as_str(), out.name.as_str()), ("text", "embedding"));
    }
}
