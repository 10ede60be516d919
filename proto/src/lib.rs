//! Generated gRPC types of Rankway's protocols.
//!
//! - [`inference`]: the Open Inference Protocol v2 (`inference.GRPCInferenceService`),
//!   wire compatible with KServe and Triton clients.
//! - [`worker`]: `rankway.worker.v1.Worker`, between the gateway and a group's rank 0.
//! - [`codec`]: the raw tensor layout both sides use (little-endian numbers, length-prefixed
//!   `BYTES` elements).
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
