//! Command line of `rankway-worker`: every flag has an environment fallback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::generate::engine::KvCacheDtype;
use crate::host::{self, OneDnn, WeightsChoice};
use crate::models::mlp::MlpConfig;
use crate::models::{Architecture, ModelConfig};

/// Rankway worker: runs a model shard with libtorch; rank 0 of a group serves
/// `rankway.worker.v1.Worker` to the gateway.
#[derive(Debug, Parser)]
#[command(name = "rankway-worker", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub telemetry: rankway_runtime::telemetry::TelemetryArgs,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
pub enum Command {
    /// Load the model and serve batches over gRPC.
    #[command(
        after_help = "Also read from the environment, by NCCL itself (the cuda build with \
                            --dist-backend nccl): NCCL_* (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE, \
                            NCCL_DEBUG)."
    )]
    Serve(ServeArgs),
    /// Measure in-process batched throughput of the loaded model (no network).
    Bench(BenchArgs),
    /// Start groups of ranks on this host like torchrun; restart a group when a rank dies.
    Launch(crate::launch::LaunchArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelKind {
    /// all-MiniLM-L6-v2 sentence embeddings (BERT encoder, mean pooling, L2 norm).
    Minilm,
    /// Synthetic tensor-parallel MLP with seeded weights, for tests and benchmarks.
    Mlp,
    /// SmolLM2-135M-Instruct, a generative LLaMA-family decoder (from --gguf).
    Smollm2,
}

/// Which model to load and how to run libtorch.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model to serve.
    #[arg(long, env = "RANKWAY_MODEL", value_enum, default_value_t = ModelKind::Minilm)]
    pub model: ModelKind,
    /// Folder with the MiniLM files (model.safetensors, tokenizer.json, config.json,
    /// sentence_bert_config.json); `scripts/setup.sh` unpacks it into models/minilm.
    #[arg(long, env = "RANKWAY_MODEL_DIR", default_value = "models/minilm")]
    pub model_dir: PathBuf,
    /// Name the model is served under (default: the model kind, e.g. "minilm").
    #[arg(long, env = "RANKWAY_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Version the model is served as (OIP's model_version in every answer).
    #[arg(long, env = "RANKWAY_MODEL_VERSION", default_value = "1")]
    pub model_version: String,
    /// The GGUF file of a generative model; `scripts/setup.sh` puts SmolLM2's there.
    #[arg(
        long,
        env = "RANKWAY_GGUF",
        default_value = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub gguf: PathBuf,
    /// Kind of the generative model's matrices (the GGUF is dequantized, then held as
    /// this kind); MiniLM and the MLP always run in float32. The start-up log says what
    /// `auto` chose and why.
    #[arg(long, visible_alias = "dtype", env = "RANKWAY_WEIGHTS", value_enum, default_value_t = WeightsChoice::Auto)]
    pub weights: WeightsChoice,
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Width of the synthetic MLP (input and output features).
    #[arg(long, env = "RANKWAY_MLP_HIDDEN", default_value_t = 256)]
    pub mlp_hidden: i64,
    /// Number of blocks of the synthetic MLP.
    #[arg(long, env = "RANKWAY_MLP_LAYERS", default_value_t = 4)]
    pub mlp_layers: i64,
    /// Seed of the synthetic MLP's weights; every rank must use the same one.
    #[arg(long, env = "RANKWAY_MLP_SEED", default_value_t = 42)]
    pub mlp_seed: i64,
    /// libtorch intra-op threads (default: the cores this process may use divided by
    /// LOCAL_WORLD_SIZE, so ranks sharing a host do not thrash).
    #[arg(long, env = "RANKWAY_TORCH_THREADS")]
    pub torch_threads: Option<usize>,
    /// Whether libtorch may use oneDNN on the CPU, for the whole process. `auto`: only
    /// for bfloat16 weights (its matrix products). In float32 these models would use it
    /// for GELU alone, setting up a kernel on every call, which costs more than it saves
    /// at their sizes (docs/worker.md).
    #[arg(long, env = "RANKWAY_ONEDNN", value_enum, default_value_t = OneDnn::Auto)]
    pub onednn: OneDnn,
    /// Largest batch (rows) accepted in one call.
    #[arg(long, env = "RANKWAY_MAX_BATCH_SIZE", default_value_t = 256)]
    pub max_batch_size: u32,
    /// Longest text MiniLM takes, in bytes; a longer one is refused (INVALID_ARGUMENT)
    /// before it is tokenized, so a batch's tokenizing time and memory are bounded. The
    /// gateway refuses longer texts first (its `--max-text-bytes`, same default).
    #[arg(long, env = "RANKWAY_MAX_TEXT_BYTES", default_value_t = rankway_proto::limits::DEFAULT_MAX_TEXT_BYTES)]
    pub max_text_bytes: usize,
    /// Where the weights and the group's tensors live: cpu, cuda (GPU 0, a pod's one
    /// GPU) or cuda:N. CUDA needs the worker's `cuda` build and a visible GPU.
    #[arg(long, env = "RANKWAY_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: tch::Device,
}

/// How a generative group batches and caches (rank 0 schedules; every rank allocates
/// the cache for its own KV heads).
#[derive(Debug, Clone, Args)]
pub struct GenerationArgs {
    /// Tokens one step may compute: every admitted prompt plus one per running sequence.
    /// A prompt longer than this is refused.
    #[arg(long, env = "RANKWAY_MAX_BATCH_TOKENS", default_value_t = 2048)]
    pub max_batch_tokens: usize,
    /// Sequences decoding together at most.
    #[arg(long, env = "RANKWAY_MAX_RUNNING_SEQUENCES", default_value_t = 32)]
    pub max_running_sequences: usize,
    /// Sequences that may wait for room; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "RANKWAY_MAX_WAITING_SEQUENCES", default_value_t = 128)]
    pub max_waiting_sequences: usize,
    /// KV cache size in tokens, shared by all sequences (each holds blocks for its tokens
    /// so far; the youngest is preempted when it runs short). SmolLM2 costs 30 layers x 2 x (3 / world) KV heads x 64 x 4 bytes =
    /// 46 KiB per token on one rank, 15 KiB per rank in a group of 3 (half of each with
    /// --kv-cache-dtype bfloat16).
    #[arg(long, env = "RANKWAY_KV_CACHE_TOKENS", default_value_t = 16384)]
    pub kv_cache_tokens: usize,
    /// How the KV cache stores keys and values: float32, or bfloat16 for half the memory
    /// per token (twice the tokens in the same RAM) at the cost of rounding each cached
    /// key and value to 8 bits of mantissa; attention still computes in float32. Every
    /// rank of a group should use the same.
    #[arg(long, env = "RANKWAY_KV_CACHE_DTYPE", value_enum, default_value_t = KvCacheDtype::Float32)]
    pub kv_cache_dtype: KvCacheDtype,
    /// Tokens per cache block.
    #[arg(long, env = "RANKWAY_KV_BLOCK_TOKENS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub kv_block_tokens: u16,
    /// Longest sequence (prompt plus max_tokens) accepted; 0 means the model's context.
    #[arg(long, env = "RANKWAY_MAX_SEQUENCE_TOKENS", default_value_t = 0)]
    pub max_sequence_tokens: usize,
}

fn parse_device(s: &str) -> Result<tch::Device, String> {
    match s.split_once(':') {
        None if s == "cpu" => Ok(tch::Device::Cpu),
        None if s == "cuda" => Ok(tch::Device::Cuda(0)),
        Some(("cuda", n)) => n
            .parse()
            .map(tch::Device::Cuda)
            .map_err(|_| format!("bad GPU index {n:?} in {s:?}")),
        _ => Err(format!("expected cpu, cuda or cuda:N, got {s:?}")),
    }
}

impl ModelArgs {
    pub fn served_name(&self) -> String {
        self.model_name.clone().unwrap_or_else(|| {
            self.model
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default()
        })
    }

    /// The model as `crate::models` loads it, free of command-line types.
    pub fn config(&self) -> ModelConfig {
        let architecture = match self.model {
            ModelKind::Minilm => Architecture::MiniLm {
                dir: self.model_dir.clone(),
            },
            ModelKind::Mlp => Architecture::Mlp(MlpConfig {
                hidden: self.mlp_hidden,
                layers: self.mlp_layers,
                seed: self.mlp_seed,
            }),
            ModelKind::Smollm2 => Architecture::Llama {
                gguf: self.gguf.clone(),
                weights: host::weights(self.weights, self.device).0,
            },
        };
        ModelConfig {
            architecture,
            name: self.served_name(),
            version: self.model_version.clone(),
            max_batch_size: self.max_batch_size,
            max_text_bytes: self.max_text_bytes,
            device: self.device,
        }
    }

    /// `--onednn` resolved for this model ([`host::onednn`]).
    pub fn onednn(&self) -> bool {
        host::onednn(self.onednn, &self.config().architecture)
    }

    /// `--torch-threads`, or this host's share for one of `ranks_on_host` ranks.
    pub fn torch_threads(&self, ranks_on_host: usize) -> usize {
        self.torch_threads
            .unwrap_or_else(|| host::torch_threads(ranks_on_host))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub rendezvous: crate::rendezvous::RendezvousArgs,
    /// Address of the gRPC server: rankway.worker.v1.Worker on rank 0, grpc.health.v1 on
    /// every rank.
    #[arg(long, env = "RANKWAY_LISTEN", default_value = "0.0.0.0:9000")]
    pub listen: SocketAddr,
    /// Address of the Prometheus metrics server (GET /metrics), on every rank.
    #[arg(long, env = "RANKWAY_METRICS_LISTEN", default_value = "0.0.0.0:9400")]
    pub metrics_listen: SocketAddr,
    /// Name of this group, reported in GroupStatus.
    #[arg(long, env = "RANKWAY_GROUP", default_value = "default")]
    pub group: String,
    /// Batches that may wait for the model thread; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "RANKWAY_QUEUE_CAPACITY", default_value_t = 8)]
    pub queue_capacity: usize,
    /// Rows per forward pass on rank 0: a larger batch runs as several passes, and the
    /// passes left are abandoned once its caller has gone (its deadline passed or it
    /// cancelled), counted in rankway_worker_abandoned_batches_total.
    #[arg(long, env = "RANKWAY_SUB_BATCH_ROWS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub sub_batch_rows: u32,
    /// Tokens per forward pass of a text model on rank 0, padding included (rows × the
    /// pass's longest text); a text longer than this goes alone. Texts go longest first,
    /// each pass padded to its own longest, and a long text is cut apart from short ones
    /// where that saves padding (docs/worker.md). The default is 32 of MiniLM's
    /// longest texts (256 tokens).
    #[arg(long, env = "RANKWAY_SUB_BATCH_TOKENS", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    pub sub_batch_tokens: u32,
    /// In a group of one rank, a batch of no more rows than a pass runs on the gRPC thread
    /// that received it instead of going to the model thread, when the model thread is
    /// idle with nothing queued and recent batches took less than this to compute.
    /// Handing a batch over costs two thread wake-ups, which on a loaded host can cost
    /// more than such a batch; running it holds the gRPC thread (health checks, other
    /// calls) for as long. 0 turns it off.
    #[arg(long, env = "RANKWAY_INLINE_MAX", value_parser = humantime::parse_duration, default_value = "250us")]
    pub inline_max: Duration,
    /// Threads of the async runtime serving gRPC and metrics. Rank 0 makes one call per
    /// batch, and the cores belong to libtorch: one thread keeps the servers off them and
    /// saves the cross-thread wake-ups a second thread costs every request (one thread
    /// runs Tokio's current-thread scheduler).
    #[arg(long, env = "RANKWAY_IO_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub io_threads: u16,
    /// How long a graceful shutdown waits for in-flight batches.
    #[arg(long, env = "RANKWAY_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    /// File of tokens (one per line) of which every call to rankway.worker.v1.Worker
    /// must carry one as `authorization: Bearer TOKEN` metadata (the gateway's
    /// --worker-token-file); grpc.health.v1 stays open for probes. Read again when it
    /// changes. Without it, anyone who reaches the port may call it.
    #[arg(long, env = "RANKWAY_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// How often --token-file is checked for changes.
    #[arg(long, env = "RANKWAY_TOKEN_RELOAD_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub token_reload_interval: Duration,
    #[command(flatten)]
    pub connections: rankway_runtime::listen::ConnectionArgs,
    #[command(flatten)]
    pub tls: rankway_runtime::tls::TlsArgs,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch_sizes: Vec<usize>,
    /// Time spent measuring each batch size.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Print one JSON object per batch size instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Generative models: ranks of the measured group (threads of this process over a
    /// c10d Gloo group on loopback); the batch sizes are concurrent sequences.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub world: u16,
    /// Generative models: tokens each sequence generates.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::llama::Weights;

    #[test]
    fn weights_resolve_per_device_and_choice() {
        let cpu = |c| host::weights(c, tch::Device::Cpu).0;
        assert_eq!(cpu(WeightsChoice::F32), Weights::Float32);
        assert_eq!(cpu(WeightsChoice::Bf16), Weights::BFloat16);
        assert_eq!(cpu(WeightsChoice::F16), Weights::Float16);
        assert_eq!(cpu(WeightsChoice::Int8), Weights::Int8);
        assert_eq!(
            host::weights(WeightsChoice::Auto, tch::Device::Cuda(0)).0,
            Weights::Float32
        );
        let auto = if std::arch::is_x86_feature_detected!("avx512bf16") {
            Weights::BFloat16
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            Weights::Float16
        } else {
            Weights::Float32
        };
        assert_eq!(cpu(WeightsChoice::Auto), auto);
        let weights = |flags: &[&str]| {
            let argv = ["rankway-worker", "serve", "--model", "smollm2"]
                .iter()
                .chain(flags);
            let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not serve")
            };
            let Architecture::Llama { weights, .. } = args.model.config().architecture else {
                panic!("not a generative model")
            };
            weights
        };
        assert_eq!(weights(&["--weights", "f32"]), Weights::Float32);
        assert_eq!(weights(&["--weights", "int8"]), Weights::Int8);
        // The flag's and the values' older names still parse.
        assert_eq!(weights(&["--dtype", "float32"]), Weights::Float32);
        assert_eq!(weights(&["--weights", "bfloat16"]), Weights::BFloat16);
        assert!(Cli::try_parse_from(["rankway-worker", "serve", "--weights", "fp8"]).is_err());
    }

    #[test]
    fn onednn_auto_follows_the_weights() {
        let model_args = |flags: &[&str]| {
            let argv = ["rankway-worker", "serve"].iter().chain(flags);
            match Cli::try_parse_from(argv).unwrap().command {
                Command::Serve(args) => args.model,
                _ => panic!("not serve"),
            }
        };
        assert!(!model_args(&[]).onednn(), "MiniLM runs float32");
        assert!(!model_args(&["--model", "mlp"]).onednn());
        assert!(model_args(&["--model", "smollm2", "--weights", "bf16"]).onednn());
        assert!(!model_args(&["--model", "smollm2", "--weights", "f32"]).onednn());
        assert!(!model_args(&["--model", "smollm2", "--weights", "f16"]).onednn());
        assert!(model_args(&["--model", "mlp", "--onednn", "on"]).onednn());
        assert!(!model_args(&["--model", "smollm2", "--weights", "bf16", "--onednn", "off"]).onednn());
        assert!(Cli::try_parse_from(["rankway-worker", "serve", "--onednn", "yes"]).is_err());
    }

    #[test]
    fn serve_defaults() {
        let cli = Cli::try_parse_from(["rankway-worker", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.listen.port(), 9000);
        assert_eq!(args.model.served_name(), "minilm");
        assert!(Cli::try_parse_from(["rankway-worker", "serve", "--model", "gpt"]).is_err());
        assert_eq!(args.model.device, tch::Device::Cpu);
        assert_eq!(args.model.generation.kv_cache_dtype.kind(), tch::Kind::Float);
        let cli = Cli::try_parse_from(["rankway-worker", "serve", "--kv-cache-dtype", "bfloat16"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.model.generation.kv_cache_dtype.kind(), tch::Kind::BFloat16);
        assert_eq!(
            args.model.generation.kv_cache_dtype.to_string(),
            "bfloat16",
            "logged as spelled"
        );
        assert!(Cli::try_parse_from(["rankway-worker", "serve", "--kv-cache-dtype", "fp8"]).is_err());
    }

    #[test]
    fn devices_parse_and_absent_gpus_are_refused() {
        assert_eq!(parse_device("cpu"), Ok(tch::Device::Cpu));
        assert_eq!(parse_device("cuda"), Ok(tch::Device::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(tch::Device::Cuda(3)));
        assert!(
            parse_device("gpu")
                .unwrap_err()
                .contains("expected cpu, cuda or cuda:N")
        );
        assert!(parse_device("cuda:x").unwrap_err().contains("bad GPU index"));
        // One past the last visible GPU (cuda:0 on a machine without one).
        let past = tch::Cuda::device_count() as usize;
        let cli = Cli::try_parse_from(["rankway-worker", "serve", &format!("--device=cuda:{past}")]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let err = crate::models::check_device(args.model.device).unwrap_err();
        assert!(err.contains(&format!("--device cuda:{past}")), "{err}");
        let cpu = Cli::try_parse_from(["rankway-worker", "serve"]).unwrap();
        let Command::Serve(cpu) = cpu.command else {
            panic!("not serve")
        };
        assert_eq!(crate::models::check_device(cpu.model.device), Ok(()));
        assert_eq!(cpu.model.config().version, "1");
    }
}
