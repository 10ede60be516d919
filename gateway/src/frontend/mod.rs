//! Front ends, by protocol: [`oip`] (Open Inference Protocol v2 over REST and gRPC, and
//! its generate extension) and [`openai`] (embeddings, chat and completions), and the
//! operator's routes ([`admin`]). They translate a protocol into calls of the core
//! ([`crate::inference::Gateway`]) and its answers back; they never reach the worker
//! groups directly. [`router`] mounts the REST routes; [`http`] holds what the REST front
//! ends share.

pub mod admin;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod oip;
pub mod openai;
pub mod router;
