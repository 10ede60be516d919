//! Rankway gateway: a stateless OIP v2 / OpenAI embeddings front end that batches
//! requests and sends each batch to rank 0 of a ready worker group.
//!
//! Layout: [`config`] (flags), [`frontend`] (REST, gRPC, OpenAI), [`state`] (the core
//! every front end calls), [`model`] (request validation), [`batcher`] (per-model
//! dynamic batching), [`pool`] (groups, health, capacity), [`metrics`], [`error`],
//! [`app`] (assembly and shutdown), [`auth`] (API keys), [`timer`] (a timer finer
//! than Tokio's millisecond, for the queue delay).

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod batcher;
pub mod config;
pub mod discovery;
pub mod error;
pub mod frontend;
pub mod metrics;
pub mod model;
pub mod pool;
pub mod request_id;
pub mod state;
pub mod timer;
