//! Host policy: what this machine's CPU and cores make of the command line's choices
//! (which weights `--dtype auto` loads, whether libtorch uses oneDNN, how many threads a
//! rank takes). The command line (`config`) only parses; these decide.

use clap::ValueEnum;

use crate::models::Architecture;
use crate::models::llama::Weights;

/// How a generative model's matrices are held and multiplied (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// bfloat16 on a CPU with AVX512-BF16 (oneDNN's fast kernels), float32 otherwise and
    /// on CUDA (not yet measured on a GPU).
    Auto,
    /// The file's values exactly: the numerics of the reference tests.
    Float32,
    /// Half the bytes per step; logits move by about 0.1.
    Bfloat16,
}

/// Whether libtorch uses oneDNN for the CPU operators it has kernels for (`--onednn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OneDnn {
    /// On for bfloat16 weights, whose CPU matrix products libtorch runs on oneDNN; off
    /// for float32, where these models (MiniLM, the MLP) would use it for GELU alone,
    /// at a cost per call above what it saves at their sizes.
    Auto,
    /// On for every model.
    On,
    /// Off for every model.
    Off,
}

/// The weights a rank on `device` loads for `dtype`; every rank of a group resolves
/// `auto` itself.
pub fn weights(dtype: Dtype, device: tch::Device) -> Weights {
    match dtype {
        Dtype::Float32 => Weights::Float32,
        Dtype::Bfloat16 => Weights::BFloat16,
        Dtype::Auto if device == tch::Device::Cpu && cpu_has_bf16() => Weights::BFloat16,
        Dtype::Auto => Weights::Float32,
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_bf16() -> bool {
    false
}

/// Whether libtorch may use oneDNN for a model of `architecture`: `auto` only for
/// bfloat16 weights, whose CPU matrix products libtorch runs on oneDNN.
pub fn onednn(choice: OneDnn, architecture: &Architecture) -> bool {
    match choice {
        OneDnn::On => true,
        OneDnn::Off => false,
        OneDnn::Auto => matches!(
            architecture,
            Architecture::Llama {
                weights: Weights::BFloat16,
                ..
            }
        ),
    }
}

/// libtorch threads for one of `ranks_on_host` ranks sharing the cores this process may use.
pub fn torch_threads(ranks_on_host: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / ranks_on_host.max(1)).max(1)
}
