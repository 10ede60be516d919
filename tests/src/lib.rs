//! Rankway's system tests and their harness. The harness starts the real
//! `rankway-worker` and `rankway-gateway` binaries on loopback (port 0, addresses read
//! back from their JSON logs) and stops them when dropped; by role:
//!
//! - [`process`]: the binaries, a child process and its log, ports, signals;
//! - [`worker`]: one rank, a launched group, health;
//! - [`gateway`]: the gateway and the HTTP calls made of it;
//! - [`references`]: the answers the models are held to;
//! - [`dns`]: a DNS server for the leaders' name;
//! - [`fake_worker`]: a rank 0 that answers what a test scripts, for the gateway's
//!   handling of replies no real worker sends;
//! - [`otlp`]: an OTLP receiver that keeps the spans it is sent.
//!
//! The scenarios are in `tests/` (one test binary, `system`); the worker's own tests,
//! which start no gateway, are in `worker/tests/`.

pub mod dns;
pub mod fake_worker;
pub mod gateway;
pub mod otlp;
pub mod process;
pub mod references;
pub mod worker;

pub use dns::*;
pub use gateway::*;
pub use process::*;
pub use references::*;
pub use worker::*;
