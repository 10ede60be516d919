//! Front ends: OIP v2 over REST ([`rest`]) and gRPC ([`grpc`]), OpenAI embeddings
//! ([`openai`]) and generation ([`completions`]), the operator's routes ([`admin`]). They translate a protocol into calls
//! of the core ([`crate::state::Gateway`]) and its answers back; they never reach the
//! worker groups directly. [`router`] mounts the REST routes; [`http`] holds what the REST front ends share.

pub mod admin;
pub mod completions;
#[cfg(test)]
mod fuzz;
pub mod grpc;
pub mod grpc_generate;
pub mod http;
pub mod json_tensor;
pub mod oip_generate;
pub mod openai;
pub mod rest;
pub mod router;
