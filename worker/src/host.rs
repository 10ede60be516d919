//! Host policy: what this machine's CPU and cores make of the command line's choices
//! (which weights `--weights auto` loads, whether libtorch uses oneDNN, how many threads a
//! rank takes). The command line (`config`) only parses; these decide.

use clap::ValueEnum;

use crate::models::Architecture;
use crate::models::llama::Weights;

/// How a generative model's matrices are held and multiplied (`--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightsChoice {
    /// The kind measured fastest at 1 to 8 streams that keeps the reference's answers:
    /// bfloat16 with AVX512-BF16 (oneDNN's kernels), else float16 with AVX2 and F16C
    /// (fbgemm's kernels), else float32; float32 on CUDA (not yet measured on a GPU).
    Auto,
    /// The file's values exactly: the numerics of the reference tests.
    #[value(name = "f32", alias = "float32")]
    F32,
    /// Half the bytes per step; logits move by about 0.1. Fast only with AVX512-BF16.
    #[value(name = "bf16", alias = "bfloat16")]
    Bf16,
    /// fbgemm's float16 kernels (AVX2): about 2× float32's tokens/s at a few streams,
    /// slower at many; logits move by about 0.01. CPU only.
    #[value(name = "f16", alias = "float16")]
    F16,
    /// The fastest: a quarter of the bytes (the MLP's down projection in float16),
    /// fbgemm's int8 kernels; logits move by up to about 2, so greedy answers part from
    /// the reference's. CPU only.
    Int8,
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

/// The weights a rank on `device` loads for `choice`, and why; every rank of a group
/// resolves `auto` itself.
pub fn weights(choice: WeightsChoice, device: tch::Device) -> (Weights, &'static str) {
    match choice {
        WeightsChoice::F32 => (Weights::Float32, "asked for"),
        WeightsChoice::Bf16 => (Weights::BFloat16, "asked for"),
        WeightsChoice::F16 => (Weights::Float16, "asked for"),
        WeightsChoice::Int8 => (Weights::Int8, "asked for"),
        WeightsChoice::Auto if device != tch::Device::Cpu => {
            (Weights::Float32, "auto on a GPU: the only kind measured there")
        }
        WeightsChoice::Auto if cpu_has("avx512bf16") => (Weights::BFloat16, "auto: this CPU has AVX512-BF16"),
        WeightsChoice::Auto if cpu_has("avx2") && cpu_has("fma") && cpu_has("f16c") => (
            Weights::Float16,
            "auto: this CPU has AVX2, FMA and F16C and no AVX512-BF16",
        ),
        WeightsChoice::Auto => (
            Weights::Float32,
            "auto: this CPU has neither AVX512-BF16 nor AVX2",
        ),
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_has(feature: &str) -> bool {
    match feature {
        "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "f16c" => std::arch::is_x86_feature_detected!("f16c"),
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has(_feature: &str) -> bool {
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
