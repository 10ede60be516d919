//! Rankway worker: serves one tensor-parallel shard of a model with libtorch; rank 0 of a
//! group drives it.
//!
//! Layout: [`config`] (the command line), [`host`] (what this CPU makes of it: weights,
//! oneDNN, threads), [`models`] (MiniLM, the synthetic MLP, the LLaMA decoder, how its
//! matrices are held and the host kernels between them; no wire types), [`formats`]
//! (GGUF and safetensors files), [`collective`] (collectives between ranks, the c10d
//! binding, their measuring wrapper), [`rendezvous`] (how a rank finds its group),
//! [`group`] (the step protocol rank 0 drives), [`engine`] (the model-thread kernel and
//! the embedding engine), [`generate`] (the generative engine, its scheduler and
//! sampling, streamed text, `Generate`), [`stats`] (what the model thread reports),
//! [`wire`] (models' types ⇄ `rankway.worker.v1`), [`server`] (gRPC), [`metrics`]
//! (Prometheus), [`serve`] (the `serve` command), [`bench`] (the `bench` command),
//! [`launch`] (the local launcher); `shim` takes the C++ shims' error messages and trims
//! the heap after a load.

#![deny(unsafe_code)]

pub mod bench;
pub mod collective;
pub mod config;
pub mod engine;
pub mod formats;
pub mod generate;
pub mod group;
pub mod host;
pub mod launch;
pub mod metrics;
pub mod models;
pub mod rendezvous;
pub mod serve;
pub mod server;
mod shim;
pub mod stats;
pub mod wire;
