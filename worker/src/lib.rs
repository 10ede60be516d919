//! Rankway worker: serves one tensor-parallel shard of a model with libtorch.
//!
//! Layout: [`config`] (flags), [`models`] (MiniLM, synthetic MLP), [`dist`] (collectives
//! between ranks), [`engine`] (the model thread), [`server`] (gRPC), [`serve`] (the
//! `serve` command), [`bench`] (the `bench` command).

pub mod bench;
pub mod config;
pub mod dist;
pub mod engine;
pub mod models;
pub mod serve;
pub mod server;
