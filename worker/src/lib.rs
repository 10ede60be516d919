//! Rankway worker: serves one tensor-parallel shard of a model with libtorch.
//!
//! Layout: [`config`] (flags), [`models`] (MiniLM, synthetic MLP; no wire types),
//! [`collective`] (collectives between ranks, the c10d binding, their measuring wrapper),
//! [`rendezvous`] (how a rank finds its group), [`group`] (the protocol rank 0 drives),
//! [`engine`] (the model thread), [`stats`] (what the model thread reports), [`wire`]
//! (models' types ⇄ `rankway.worker.v1`), [`server`] (gRPC), [`metrics`] (Prometheus),
//! [`serve`] (the `serve` command), [`bench`] (the `bench` command), [`launch`] (the
//! local launcher).

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
pub mod stats;
pub mod wire;
