//! Generated gRPC types of Rankway's protocols.
//!
//! - [`inference`]: the Open Inference Protocol v2 (`inference.GRPCInferenceService`),
//!   wire compatible with KServe and Triton clients.
//! - [`worker`]: `rankway.worker.v1.Worker`, between the gateway and a group's rank 0.
//! - [`codec`]: the raw tensor layout both sides use (little-endian numbers, length-prefixed
//!   `BYTES` elements);
//! - [`limits`]: the rules of a request that the gateway and rank 0 both enforce, each
//!   written once with its message.
//!
//! Logs, traces and the shutdown signal are the other crate both binaries share,
//! `rankway-runtime`: the wire stays free of the OpenTelemetry stack.

#![forbid(unsafe_code)]

/// Open Inference Protocol v2, package `inference`.
pub mod inference {
    tonic::include_proto!("inference");
}

/// Gateway ↔ rank 0 protocol, package `rankway.worker.v1`.
pub mod worker {
    tonic::include_proto!("rankway.worker.v1");

    /// Largest gRPC message either side of `rankway.worker.v1` sends or accepts.
    pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

    /// Metadata key rank 0 sets on an error for a batch it refused before running it
    /// (not ready, queue full): the gateway may retry such a batch on another group.
    pub const NOT_STARTED_KEY: &str = "rankway-not-started";
}

pub mod codec;
pub mod limits;

use std::time::Duration;

/// A caller's deadline from gRPC's `grpc-timeout` (e.g. `250m` = 250 ms), if set; the
/// error names the malformed value.
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Result<Option<Duration>, String> {
    let Some(v) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || format!("malformed grpc-timeout {v:?}");
    let s = v.to_str().map_err(|_| bad())?;
    // At most 8 digits and a unit, as the gRPC spec allows.
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
mod fuzz_targets {
    use proptest::prelude::*;

    use rankway_runtime::fuzz::run;

    #[test]
    fn fuzz_grpc_timeout_parser() {
        let value = prop_oneof![
            "[0-9]{0,12}[HMSmunx]?",
            "[ -~]{0,16}",
            any::<u64>().prop_map(|n| format!("{n}S")),
        ];
        run("grpc-timeout parser", value, |v| {
            let mut m = tonic::metadata::MetadataMap::new();
            let Ok(v) = v.parse() else { return };
            m.insert("grpc-timeout", v);
            if let Ok(Some(d)) = crate::grpc_timeout(&m) {
                // Within what 8 digits of hours allow.
                assert!(d <= std::time::Duration::from_secs(99_999_999 * 3600));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&m).unwrap(), None);
        m.insert("grpc-timeout", "250m".parse().unwrap());
        assert_eq!(grpc_timeout(&m).unwrap(), Some(Duration::from_millis(250)));
        m.insert("grpc-timeout", "3S".parse().unwrap());
        assert_eq!(grpc_timeout(&m).unwrap(), Some(Duration::from_secs(3)));
        m.insert("grpc-timeout", "12x".parse().unwrap());
        assert!(grpc_timeout(&m).unwrap_err().contains("malformed grpc-timeout"));
    }
}
