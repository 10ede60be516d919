//! OpenAI-compatible `POST /v1/embeddings`, so LangChain/LangGraph embedding clients and
//! the official OpenAI SDKs work unchanged.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rankway_proto::codec::encode_bytes_elements;
use rankway_proto::worker::{DataType, Tensor};
use serde::{Deserialize, Serialize};

use super::OpenAiError;
use crate::error::{ApiError, shown};
use crate::frontend::http::{AppState, JsonRequest, Strings};
use crate::inference::InferCall;
use crate::request_id::WorkerTime;
use crate::validation::text_embedding_io;

/// Output that carries the token count of each text, when the model provides it.
const TOKEN_COUNT_OUTPUT: &str = "token_count";

#[derive(Debug, Deserialize)]
pub struct EmbeddingsRequest {
    pub(crate) input: Strings,
    pub(crate) model: String,
    #[serde(default)]
    pub(crate) encoding_format: Option<String>,
    #[serde(default)]
    pub(crate) dimensions: Option<u64>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct EmbeddingData {
    object: &'static str,
    index: usize,
    embedding: EmbeddingValue,
}

#[derive(Debug, Serialize)]
struct Usage {
    prompt_tokens: i64,
    total_tokens: i64,
}

#[derive(Debug, Serialize)]
struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<EmbeddingData>,
    model: String,
    usage: Usage,
}

/// Whether the answer is base64 (`encoding_format`), and the texts of `input`.
pub(crate) fn base64_and_texts(
    encoding_format: Option<&str>,
    input: Strings,
) -> Result<(bool, Vec<String>), ApiError> {
    let base64 = match encoding_format {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::InvalidInput(format!(
                "'encoding_format' must be \"float\" or \"base64\", got {}",
                shown(other)
            )));
        }
    };
    Ok((base64, texts(input)?))
}

/// `input` as OpenAI allows it for text (one string or a list of strings: [`Strings`]
/// refuses token arrays as it reads the body), not empty.
fn texts(Strings(texts): Strings) -> Result<Vec<String>, ApiError> {
    if texts.is_empty() {
        return Err(ApiError::InvalidInput("'input' must not be an empty list".into()));
    }
    Ok(texts)
}

pub async fn embeddings(
    State(state): State<AppState>,
    JsonRequest {
        body: req,
        timeout,
        request_id,
        ..
    }: JsonRequest<EmbeddingsRequest, OpenAiError>,
) -> Result<Response, OpenAiError> {
    let (base64, texts) = base64_and_texts(req.encoding_format.as_deref(), req.input)?;
    let info = state.ready_model(&req.model)?;
    let (input_spec, output_spec) = text_embedding_io(&info)?;
    let dim = output_spec.shape[1];
    if let Some(d) = req.dimensions.filter(|&d| d as i64 != dim) {
        return Err(ApiError::InvalidInput(format!(
            "'dimensions' {d} is not supported: model {:?} returns {dim}",
            req.model
        ))
        .into());
    }
    let output_name = output_spec.name.clone();
    let input = Tensor {
        name: input_spec.name.clone(),
        datatype: DataType::Bytes as i32,
        shape: vec![texts.len() as i64],
        data: encode_bytes_elements(&texts).into(),
    };
    let served = state
        .infer(InferCall {
            model: req.model.clone(),
            inputs: vec![input],
            outputs: Vec::new(),
            timeout,
            request_id,
        })
        .await?;
    let worker_time = WorkerTime(served.worker_time);
    let outputs = served.outputs;

    let find = |name: &str| outputs.iter().find(|t| t.name == name);
    let emb = find(&output_name)
        .ok_or_else(|| ApiError::Internal(format!("worker returned no {output_name:?} output")))?;
    let row_bytes = dim as usize * 4;
    let data = emb
        .data
        .chunks_exact(row_bytes)
        .enumerate()
        .map(|(index, row)| EmbeddingData {
            object: "embedding",
            index,
            embedding: if base64 {
                EmbeddingValue::Base64(base64::engine::general_purpose::STANDARD.encode(row))
            } else {
                EmbeddingValue::Float(
                    row.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect(),
                )
            },
        })
        .collect();
    let tokens: i64 = find(TOKEN_COUNT_OUTPUT)
        .map(|t| {
            t.data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .sum()
        })
        .unwrap_or(0);
    let mut resp = Json(EmbeddingsResponse {
        object: "list",
        data,
        model: req.model,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    })
    .into_response();
    resp.extensions_mut().insert(worker_time);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use serde_json::json;

    #[test]
    fn input_forms() {
        let parsed = |input: Value| {
            serde_json::from_value::<Strings>(input)
                .map_err(|e| e.to_string())
                .and_then(|s| texts(s).map_err(|e| e.to_string()))
        };
        assert_eq!(parsed(json!("a")).unwrap(), vec!["a"]);
        assert_eq!(parsed(json!(["a", "b"])).unwrap(), vec!["a", "b"]);
        assert!(parsed(json!([])).unwrap_err().contains("empty"));
        assert!(parsed(json!([1, 2])).unwrap_err().contains("token arrays"));
        assert!(parsed(json!([[1, 2]])).unwrap_err().contains("token arrays"));
        assert!(
            parsed(json!(5))
                .unwrap_err()
                .contains("a string or a list of strings")
        );
    }
}
