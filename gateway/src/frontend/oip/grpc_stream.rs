//! Generative models over OIP gRPC, as Triton serves its decoupled LLM backends: the
//! request has a `text_input` BYTES tensor (one element) and sampling in its
//! `parameters` (`max_tokens`, `temperature`, `top_p`, `seed`, `stop`; `stream` is
//! accepted); each answer has a `text_output` BYTES tensor. `ModelStreamInfer` answers
//! one response per text delta, the last flagged `triton_final_response`; unary
//! `ModelInfer` answers the whole text.

use std::collections::HashMap;
use std::time::Duration;

use rankway_proto::codec::{decode_bytes_elements, encode_bytes_elements};
use rankway_proto::inference::infer_parameter::ParameterChoice;
use rankway_proto::inference::model_infer_response::InferOutputTensor;
use rankway_proto::inference::{InferParameter, ModelInferRequest, ModelInferResponse};
use rankway_proto::worker::DataType;

use crate::error::ApiError;
use crate::inference::Gateway;
use crate::inference::generate::{GenerateCall, Prompt};
use crate::inference::generation::{Finish, Generation, Usage};
use crate::request_id::RequestId;

/// Name of the text input and output tensors.
pub const TEXT_INPUT: &str = "text_input";
pub const TEXT_OUTPUT: &str = "text_output";

fn number(name: &str, p: &InferParameter) -> Result<f64, ApiError> {
    match &p.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) => Ok(*v as f64),
        Some(ParameterChoice::Uint64Param(v)) => Ok(*v as f64),
        Some(ParameterChoice::DoubleParam(v)) => Ok(*v),
        _ => Err(ApiError::invalid(format!("parameter '{name}' must be a number"))),
    }
}

fn integer(name: &str, p: &InferParameter) -> Result<u64, ApiError> {
    match &p.parameter_choice {
        Some(ParameterChoice::Int64Param(v)) if *v >= 0 => Ok(*v as u64),
        Some(ParameterChoice::Uint64Param(v)) => Ok(*v),
        _ => Err(ApiError::invalid(format!(
            "parameter '{name}' must be a non-negative integer"
        ))),
    }
}

/// The generation a `ModelInferRequest` asks for (already decoded from the wire; the
/// text input as the caller's `text` tensor bytes).
pub fn call(
    model: String,
    text: &[u8],
    parameters: &HashMap<String, InferParameter>,
    timeout: Option<Duration>,
    request_id: RequestId,
) -> Result<GenerateCall, ApiError> {
    let elements =
        decode_bytes_elements(text).map_err(|e| ApiError::invalid(format!("'{TEXT_INPUT}': {e}")))?;
    let [element] = elements.as_slice() else {
        return Err(ApiError::invalid(format!(
            "'{TEXT_INPUT}' must hold one text, got {}",
            elements.len()
        )));
    };
    let text = std::str::from_utf8(element)
        .map_err(|_| ApiError::invalid(format!("'{TEXT_INPUT}' is not valid UTF-8")))?;
    let mut call = GenerateCall {
        model,
        prompt: Prompt::Text(text.to_owned()),
        max_tokens: None,
        temperature: 0.0,
        top_p: None,
        seed: None,
        stop: Vec::new(),
        timeout,
        request_id,
    };
    for (name, p) in parameters {
        match name.as_str() {
            "max_tokens" => call.max_tokens = Some(u32::try_from(integer(name, p)?).unwrap_or(u32::MAX)),
            "temperature" => call.temperature = number(name, p)? as f32,
            "top_p" => call.top_p = Some(number(name, p)? as f32),
            "seed" => call.seed = Some(integer(name, p)?),
            "stop" => match &p.parameter_choice {
                Some(ParameterChoice::StringParam(s)) => call.stop = vec![s.clone()],
                _ => return Err(ApiError::invalid("parameter 'stop' must be a string")),
            },
            // tritonclient's LLM examples send it; every answer here streams on a stream.
            "stream" => {}
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(ApiError::invalid(format!("parameter '{shown}' is not supported")));
            }
        }
    }
    Ok(call)
}

/// One answer: `text` as `text_output`, and on the last one the final flag with the
/// finish reason and token usage as parameters.
pub fn response(
    model: &str,
    version: &str,
    id: &str,
    text: &str,
    last: Option<(Finish, Usage)>,
) -> ModelInferResponse {
    let mut parameters = HashMap::new();
    let param = |c: ParameterChoice| InferParameter {
        parameter_choice: Some(c),
    };
    parameters.insert(
        "triton_final_response".to_owned(),
        param(ParameterChoice::BoolParam(last.is_some())),
    );
    if let Some((finish, usage)) = last {
        parameters.insert(
            "finish_reason".to_owned(),
            param(ParameterChoice::StringParam(finish.as_str().into())),
        );
        parameters.insert(
            "prompt_tokens".to_owned(),
            param(ParameterChoice::Int64Param(i64::from(usage.prompt_tokens))),
        );
        parameters.insert(
            "completion_tokens".to_owned(),
            param(ParameterChoice::Int64Param(i64::from(usage.completion_tokens))),
        );
    }
    ModelInferResponse {
        model_name: model.to_owned(),
        model_version: version.to_owned(),
        id: id.to_owned(),
        parameters,
        outputs: vec![InferOutputTensor {
            name: TEXT_OUTPUT.into(),
            datatype: DataType::Bytes.oip_name().into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_output_contents: vec![encode_bytes_elements(&[text]).into()],
    }
}

/// Starts the generation a `ModelInferRequest` for a generative model asks for.
pub async fn start(
    state: &Gateway,
    req: &ModelInferRequest,
    timeout: Option<Duration>,
    request_id: RequestId,
) -> Result<Generation, ApiError> {
    let text = text_input(req)?;
    state
        .generate(call(
            req.model_name.clone(),
            &text,
            &req.parameters,
            timeout,
            request_id,
        )?)
        .await
}

/// The `text_input` of a request, raw (OIP BYTES layout), from either encoding.
pub fn text_input(req: &ModelInferRequest) -> Result<Vec<u8>, ApiError> {
    let Some(i) = req.inputs.iter().position(|t| t.name == TEXT_INPUT) else {
        return Err(ApiError::invalid(format!(
            "a generative model takes one BYTES input '{TEXT_INPUT}'"
        )));
    };
    if req.inputs.len() != 1 {
        return Err(ApiError::invalid(format!(
            "a generative model takes only '{TEXT_INPUT}', got {} inputs",
            req.inputs.len()
        )));
    }
    if req.inputs[i].datatype != "BYTES" {
        return Err(ApiError::invalid(format!(
            "'{TEXT_INPUT}' must be BYTES, got {}",
            crate::error::shown(&req.inputs[i].datatype)
        )));
    }
    if let Some(raw) = req.raw_input_contents.get(i) {
        return Ok(raw.to_vec());
    }
    let contents = req.inputs[i]
        .contents
        .as_ref()
        .map(|c| c.bytes_contents.clone())
        .unwrap_or_default();
    Ok(encode_bytes_elements(&contents))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_become_the_call_and_unknown_ones_are_refused() {
        let p = |c: ParameterChoice| InferParameter {
            parameter_choice: Some(c),
        };
        let mut params = HashMap::new();
        params.insert("max_tokens".to_owned(), p(ParameterChoice::Int64Param(12)));
        params.insert("temperature".to_owned(), p(ParameterChoice::DoubleParam(0.5)));
        params.insert("stop".to_owned(), p(ParameterChoice::StringParam(".".into())));
        params.insert("stream".to_owned(), p(ParameterChoice::BoolParam(true)));
        let text = encode_bytes_elements(&["hello"]);
        let c = call("m".into(), &text, &params, None, RequestId("r".into())).unwrap();
        assert_eq!(
            (c.max_tokens, c.temperature, c.stop.clone()),
            (Some(12), 0.5, vec![".".to_owned()])
        );
        params.insert("beam_width".to_owned(), p(ParameterChoice::Int64Param(2)));
        let err = call("m".into(), &text, &params, None, RequestId("r".into())).unwrap_err();
        assert!(
            err.to_string()
                .contains("parameter 'beam_width' is not supported"),
            "{err}"
        );
        let two = encode_bytes_elements(&["a", "b"]);
        let err = call("m".into(), &two, &HashMap::new(), None, RequestId("r".into())).unwrap_err();
        assert!(err.to_string().contains("must hold one text, got 2"), "{err}");
    }
}
