//! The Open Inference Protocol v2: over REST ([`rest`], tensors as JSON by
//! [`json_tensor`]) with its generate extension ([`generate`]), and over gRPC ([`grpc`]),
//! whose `ModelStreamInfer` streams generations ([`grpc_stream`]). Errors take OIP's form.

pub mod generate;
pub mod grpc;
pub mod grpc_stream;
pub mod json_tensor;
pub mod rest;
