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

/// REST header carrying the client's timeout in seconds (fractions allowed).
pub const REQUEST_TIMEOUT_HEADER: &str = "request-timeout";

/// The client's timeout from `Request-Timeout: <seconds>`, if it sent one.
pub fn rest_timeout(headers: &http::HeaderMap) -> Result<Option<std::time::Duration>, ApiError> {
    let Some(v) = headers.get(REQUEST_TIMEOUT_HEADER) else {
        return Ok(None);
    };
    let secs = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .ok_or_else(|| {
            ApiError::InvalidInput(format!(
                "Request-Timeout must be a positive number of seconds, got {v:?}"
            ))
        })?;
    Ok(Some(std::time::Duration::from_secs_f64(secs.min(1e9))))
}

/// The client's deadline from gRPC's `grpc-timeout` (e.g. `250m` = 250 ms), if set.
pub fn grpc_timeout(
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Option<std::time::Duration>, ApiError> {
    use std::time::Duration;
    let Some(v) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || ApiError::InvalidInput(format!("malformed grpc-timeout {v:?}"));
    let s = v.to_str().map_err(|_| bad())?;
    if s.len() < 2 || s.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timeouts_parse() {
        let mut h = http::HeaderMap::new();
        assert_eq!(rest_timeout(&h).unwrap(), None);
        h.insert(REQUEST_TIMEOUT_HEADER, "1.5".parse().unwrap());
        assert_eq!(rest_timeout(&h).unwrap(), Some(Duration::from_millis(1500)));
        h.insert(REQUEST_TIMEOUT_HEADER, "-2".parse().unwrap());
        assert!(rest_timeout(&h).is_err());

        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&m).unwrap(), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(grpc_timeout(&m).unwrap(), Some(Duration::from_secs(3)));
        m.insert("grpc-timeout", "12x".parse().unwrap());
        assert!(grpc_timeout(&m).is_err());
    }
}
