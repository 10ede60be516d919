//! What the gateway knows of a model (its signature, learnt from the groups serving it)
//! and the checks every request passes before it may join a batch. A request that is
//! wrong must fail on its own here, never inside a batch where it would fail others.

use rankway_proto::codec::decode_bytes_elements;
use rankway_proto::limits::check_text_bytes;
use rankway_proto::worker::{DataType, ModelInfo, Tensor, TensorSpec};

use crate::error::{ApiError, shown, shown_shape};

/// A request that passed validation: inputs in the model's order, and its row count.
#[derive(Debug, Clone)]
pub struct ValidInfer {
    pub inputs: Vec<Tensor>,
    pub rows: usize,
}

fn dtype_name(code: i32) -> &'static str {
    DataType::try_from(code).map_or("an unknown type", |d| d.oip_name())
}

/// Checks `inputs` against the model's signature and orders them as the model lists them.
pub fn validate(
    info: &ModelInfo,
    mut inputs: Vec<Tensor>,
    max_text_bytes: usize,
) -> Result<ValidInfer, ApiError> {
    let bad = |m: String| Err(ApiError::InvalidInput(m));
    for t in &inputs {
        if !info.inputs.iter().any(|s| s.name == t.name) {
            let names: Vec<_> = info.inputs.iter().map(|s| s.name.as_str()).collect();
            return bad(format!(
                "model {:?} has no input {}; its inputs are {names:?}",
                info.name,
                shown(&t.name)
            ));
        }
        if inputs.iter().filter(|o| o.name == t.name).count() > 1 {
            return bad(format!("input {} is given more than once", shown(&t.name)));
        }
    }
    let mut ordered = Vec::with_capacity(info.inputs.len());
    let mut rows: Option<i64> = None;
    for spec in &info.inputs {
        let Some(pos) = inputs.iter().position(|t| t.name == spec.name) else {
            return bad(format!("missing input {:?} of model {:?}", spec.name, info.name));
        };
        let t = inputs.swap_remove(pos);
        check_tensor(spec, &t, max_text_bytes)?;
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
    Ok(ValidInfer {
        inputs: ordered,
        rows,
    })
}

fn check_tensor(spec: &TensorSpec, t: &Tensor, max_text_bytes: usize) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::InvalidInput(m));
    if t.shape.first() == Some(&0) {
        return bad(format!("input {:?} is empty: give at least one element", t.name));
    }
    let parts = conforms("input", spec, t).map_err(ApiError::InvalidInput)?;
    // BYTES inputs of Rankway's models are text, of a bounded length.
    if let Some(texts) = &parts {
        check_text_bytes(texts, max_text_bytes)
            .map_err(|e| ApiError::TooLarge(format!("input {:?}: {e}", t.name)))?;
    }
    for (i, p) in parts.iter().flatten().enumerate() {
        if let Err(e) = std::str::from_utf8(p) {
            return bad(format!("input {:?} element {i} is not valid UTF-8: {e}", t.name));
        }
    }
    Ok(())
}

/// Whether `t` (an input or output, as `role` says) has the datatype and shape `spec`
/// declares (-1: any size) and data to match; a BYTES tensor's elements, decoded. The
/// message says what is wrong.
fn conforms<'a>(role: &str, spec: &TensorSpec, t: &'a Tensor) -> Result<Option<Vec<&'a [u8]>>, String> {
    if t.datatype != spec.datatype {
        return Err(format!(
            "{role} {:?} must be {}, got {}",
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
        return Err(format!(
            "{role} {:?} has shape {}; expected {:?} where -1 is the batch size",
            t.name,
            shown_shape(&t.shape),
            spec.shape
        ));
    }
    if t.shape.iter().any(|&d| d < 0) {
        return Err(format!(
            "{role} {:?} has a negative dimension in {:?}",
            t.name, t.shape
        ));
    }
    let elements = t
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
        .ok_or_else(|| format!("{role} {:?}: shape {:?} is too large", t.name, t.shape))?;
    match spec.datatype().element_size() {
        Some(size) => {
            let want = elements.checked_mul(size);
            if want != Some(t.data.len()) {
                return Err(format!(
                    "{role} {:?} of shape {:?} needs {} bytes of data, got {}",
                    t.name,
                    t.shape,
                    want.map_or_else(|| "more".to_owned(), |w| w.to_string()),
                    t.data.len()
                ));
            }
            Ok(None)
        }
        None => {
            let parts = decode_bytes_elements(&t.data).map_err(|e| format!("{role} {:?}: {e}", t.name))?;
            if parts.len() != elements {
                return Err(format!(
                    "{role} {:?} of shape {:?} holds {} elements, expected {elements}",
                    t.name,
                    t.shape,
                    parts.len()
                ));
            }
            Ok(Some(parts))
        }
    }
}

/// Checks a group's answer to a batch of `rows` rows against the model's signature: every
/// declared output once, of its datatype and shape, `rows` rows, data to match. A reply
/// that fails is the group's fault (502 / INTERNAL), for that batch only.
pub fn check_reply(info: &ModelInfo, outputs: &[Tensor], rows: usize) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::BadReply(m));
    if outputs.len() != info.outputs.len() {
        return bad(format!(
            "{} outputs for model {:?}, which declares {}",
            outputs.len(),
            info.name,
            info.outputs.len()
        ));
    }
    for spec in &info.outputs {
        let mut named = outputs.iter().filter(|t| t.name == spec.name);
        let (Some(t), None) = (named.next(), named.next()) else {
            return bad(format!("output {:?} is missing or repeated", spec.name));
        };
        conforms("output", spec, t).map_err(ApiError::BadReply)?;
        if t.shape.first() != Some(&(rows as i64)) {
            return bad(format!(
                "output {:?} has shape {:?} for a batch of {rows} rows",
                t.name, t.shape
            ));
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
    // [-1, dimension]: one vector per text, of a positive dimension.
    let output = info
        .outputs
        .iter()
        .find(|s| s.datatype == DataType::Fp32 as i32 && s.shape.len() == 2 && s.shape[1] > 0);
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

    /// [`validate`] with texts of at most 1 KiB.
    fn check(info: &ModelInfo, inputs: Vec<Tensor>) -> Result<ValidInfer, ApiError> {
        validate(info, inputs, 1024)
    }

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

    fn err(r: Result<ValidInfer, ApiError>) -> String {
        match r {
            Err(ApiError::InvalidInput(m)) => m,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }

    fn embedding(shape: Vec<i64>, bytes: usize) -> Tensor {
        Tensor {
            name: "embedding".into(),
            datatype: DataType::Fp32 as i32,
            shape,
            data: vec![0; bytes].into(),
        }
    }

    fn bad_reply(r: Result<(), ApiError>) -> String {
        match r {
            Err(ApiError::BadReply(m)) => m,
            other => panic!("expected BadReply, got {other:?}"),
        }
    }

    #[test]
    fn replies_must_match_the_signature() {
        let i = info();
        check_reply(&i, &[embedding(vec![2, 384], 2 * 384 * 4)], 2).unwrap();
        let cases = [
            (
                vec![embedding(vec![3, 384], 3 * 384 * 4)],
                "for a batch of 2 rows",
            ),
            (vec![embedding(vec![2, 0], 0)], "expected [-1, 384]"),
            (
                vec![embedding(vec![2, 384], 100)],
                "needs 3072 bytes of data, got 100",
            ),
            (vec![embedding(vec![-2, 384], 0)], "negative dimension"),
            (vec![embedding(vec![i64::MAX, 384], 8)], "too large"),
            (vec![], "0 outputs"),
            (
                vec![embedding(vec![2, 384], 3072), embedding(vec![2, 384], 3072)],
                "2 outputs",
            ),
        ];
        for (outputs, want) in cases {
            let m = bad_reply(check_reply(&i, &outputs, 2));
            assert!(m.contains(want), "{m:?} lacks {want:?}");
        }
        let mut renamed = embedding(vec![2, 384], 3072);
        renamed.name = "other".into();
        assert!(bad_reply(check_reply(&i, &[renamed], 2)).contains("missing or repeated"));
        let mut wrong_type = embedding(vec![2, 384], 3072);
        wrong_type.datatype = DataType::Fp64 as i32;
        assert!(bad_reply(check_reply(&i, &[wrong_type], 2)).contains("must be FP32, got FP64"));
    }

    #[test]
    fn an_embedding_of_no_dimension_is_not_a_text_embedding_model() {
        let mut i = info();
        i.outputs[0].shape = vec![-1, 0];
        assert!(text_embedding_io(&i).is_err());
    }

    #[test]
    fn texts_over_the_limit_are_too_large() {
        let long = "é".repeat(513);
        match check(
            &info(),
            vec![text(vec![2], encode_bytes_elements(&["a", long.as_str()]))],
        ) {
            Err(ApiError::TooLarge(m)) => assert!(m.contains("text 1 is 1026 bytes"), "{m}"),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_good_request() {
        let v = check(&info(), vec![text(vec![2], encode_bytes_elements(&["a", "b"]))]).unwrap();
        assert_eq!(v.rows, 2);
    }

    #[test]
    fn rejects_each_kind_of_bad_input() {
        let i = info();
        assert!(err(check(&i, vec![])).contains("missing input \"text\""));
        let mut wrong_type = text(vec![1], vec![0; 4]);
        wrong_type.datatype = DataType::Fp32 as i32;
        assert!(err(check(&i, vec![wrong_type])).contains("must be BYTES, got FP32"));
        assert!(err(check(&i, vec![text(vec![1, 1], encode_bytes_elements(&["a"]))])).contains("shape"));
        assert!(err(check(&i, vec![text(vec![0], vec![])])).contains("empty"));
        assert!(
            err(check(&i, vec![text(vec![2], encode_bytes_elements(&["a"]))])).contains("holds 1 elements")
        );
        assert!(
            err(check(
                &i,
                vec![text(vec![1], encode_bytes_elements(&[&[0xff, 0xfe][..]]))]
            ))
            .contains("UTF-8")
        );
        let five = encode_bytes_elements(&["a"; 5]);
        assert!(err(check(&i, vec![text(vec![5], five)])).contains("at most 4"));
        let mut unknown = text(vec![1], encode_bytes_elements(&["a"]));
        unknown.name = "txt".into();
        assert!(err(check(&i, vec![unknown])).contains("no input \"txt\""));
    }

    #[test]
    fn finds_text_embedding_io() {
        let i = info();
        let (inp, out) = text_embedding_io(&i).unwrap();
        assert_eq!((inp.name.as_str(), out.name.as_str()), ("text", "embedding"));
    }
}
