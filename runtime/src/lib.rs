//! What both Rankway binaries run with, apart from the wire types (`rankway-proto`):
//!
//! - [`executor`]: the Tokio runtime both serve on;
//! - [`coalesce`]: HTTP/2 sockets whose frames from different tasks leave in one write;
//! - [`telemetry`]: logs and OpenTelemetry traces, and how trace context travels over
//!   HTTP headers, gRPC metadata and the group's step header;
//! - [`keys`]: key files (API keys, the gateway-to-rank-0 token), reloaded on change;
//! - [`listen`]: how every listener accepts connections, within a cap and timeouts;
//! - [`grpc_errors`]: the codes a tonic server answers a malformed request message with;
//! - [`tls`]: TLS of the gateway's front ends, its certificate reloaded on change;
//! - [`shutdown`]: the signal both binaries drain on;
//! - [`sync`]: locks that a panic does not poison;
//! - `fuzz` (feature `fuzz`, tests only): the harness of every crate's fuzz targets.

#![forbid(unsafe_code)]

pub mod coalesce;
pub mod executor;
#[cfg(feature = "fuzz")]
pub mod fuzz;
pub mod grpc_errors;
pub mod keys;
pub mod listen;
pub mod shutdown;
pub mod sync;
pub mod telemetry;
pub mod tls;
