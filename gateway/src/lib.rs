//! Rankway gateway: a stateless front end (OIP v2 over REST and gRPC, the OpenAI API)
//! that batches embedding requests, streams generations, and sends both to rank 0 of a
//! ready worker group.
//!
//! Layout: [`config`] (flags), [`frontend`] (by protocol: OIP and OpenAI, and the
//! operator's routes), [`inference`] (the core every front end calls: readiness,
//! metadata, inference and generation), [`validation`] (requests checked into typed
//! values), [`batcher`] (per-model dynamic batching), [`pool`] (groups, their health,
//! leases, routing and failover), [`discovery`] (groups from DNS), [`metrics`],
//! [`error`] (the one error type and its mapping to HTTP and gRPC), [`request_id`]
//! (request spans, ids and metrics), [`auth`] (API keys), [`timer`] (a timer finer than
//! Tokio's millisecond, for the queue delay), [`app`] (assembly and shutdown).

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod batcher;
pub mod config;
pub mod discovery;
pub mod error;
pub mod frontend;
pub mod inference;
pub mod metrics;
pub mod pool;
pub mod request_id;
pub mod timer;
pub mod validation;
