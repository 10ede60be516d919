//! What both Rankway binaries run with, apart from the wire types (`rankway-proto`):
//!
//! - [`telemetry`]: logs and OpenTelemetry traces, and how trace context travels over
//!   HTTP headers, gRPC metadata and the group's step header;
//! - [`shutdown`]: the signal both binaries drain on.

#![forbid(unsafe_code)]

pub mod shutdown;
pub mod telemetry;
