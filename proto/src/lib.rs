//! Generated gRPC types of Rankway's protocols.
//!
//! - [`inference`]: the Open Inference Protocol v2 (`inference.GRPCInferenceService`),
//!   wire compatible with KServe and Triton clients.
//! - [`worker`]: `rankway.worker.v1.Worker`, between the gateway and a group's rank 0.
//! - [`telemetry`]: logs and OpenTelemetry traces, and how trace context travels over
//!   these protocols; shared by both binaries.
//! - [`shutdown`]: the signal both binaries drain on.

#![forbid(unsafe_code)]

/// Open Inference Protocol v2, package `inference`.
pub mod inference {
    tonic::include_proto!("inference");
}

/// Gateway ↔ rank 0 protocol, package `rankway.worker.v1`.
pub mod worker {
    tonic::include_proto!("rankway.worker.v1");
}

pub mod codec;
pub mod shutdown;
pub mod telemetry;
