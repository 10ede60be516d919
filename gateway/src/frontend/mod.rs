//! Front ends: OIP v2 over REST ([`rest`]) and gRPC ([`grpc`]), OpenAI embeddings
//! ([`openai`]). They translate wire formats; the work happens in [`crate::state`].

pub mod grpc;
pub mod json_tensor;
pub mod openai;
pub mod rest;

use rankway_proto::worker::Tensor;

use crate::error::ApiError;

/// Keeps only the outputs the client asked for (all when it named none).
pub fn select_outputs(outputs: Vec<Tensor>, requested: &[String]) -> Result<Vec<Tensor>, ApiError> {
    if requested.is_empty() {
        return Ok(outputs);
    }
    requested
        .iter()
        .map(|name| {
            outputs.iter().find(|t| &t.name == name).cloned().ok_or_else(|| {
                let have: Vec<_> = outputs.iter().map(|t| t.name.as_str()).collect();
                ApiError::InvalidInput(format!(
                    "unknown output {name:?}; the model's outputs are {have:?}"
                ))
            })
        })
        .collect()
}
