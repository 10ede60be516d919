//! `rankway-worker serve`: one rank of a group. Rank 0 serves `rankway.worker.v1.Worker`
//! and drives the group; the other ranks follow it. Every rank serves grpc.health.v1.
//!
//! Exit status: 0 after a clean shutdown (a signal, or rank 0 releasing the group);
//! non-zero when the group breaks, so a supervisor (Kubernetes, `launch`) restarts it.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use rankway_runtime::keys::{GrpcAuthLayer, KeyFile};
use rankway_runtime::listen::Listener;
use tokio::net::TcpListener;

use crate::collective::c10d::ProcessGroup;
use crate::collective::observed::Observed;
use crate::collective::{Collective, Shard, SingleRank};
use crate::config::ServeArgs;
use crate::engine::ModelThread;
use crate::engine::embedding::{self, EngineOptions, Loader};
use crate::formats::gguf::Gguf;
use crate::generate::engine::{self as gen_engine, GenLoader, GenOptions};
use crate::generate::schedule::Limits;
use crate::generate::service::GenService;
use crate::host;
use crate::metrics::WorkerMetrics;
use crate::models::llama::tokenizer::ChatTokenizer;
use crate::models::llama::{Llama, LlamaConfig, Weights};
use crate::models::{self, Architecture, ModelError, PassLimits};
use crate::server::{Engine, LIVENESS_SERVICE, WorkerService, track_health};
use crate::stats::EngineStats;

/// A variant with a source names only its own step: the cause follows in the error
/// chain (`{:#}`), which the binary logs whole.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("cannot start the model thread: {0}")]
    Thread(std::io::Error),
    #[error("model thread failed")]
    Model(#[from] ModelError),
    #[error("model thread panicked")]
    Panicked,
    #[error("gRPC server")]
    Transport(#[from] tonic::transport::Error),
}

const TOKEN_REFUSED: &str =
    "a valid token is required: send `authorization: Bearer TOKEN` (the gateway's --worker-token-file)";

/// Calls open without the token: the kubelet's and the gateway's health probes.
fn is_health_check(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })
}

/// Serves until `shutdown` resolves (then drains) or the model thread ends.
pub async fn serve(args: ServeArgs, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let listener = bind(args.listen).await?;
    serve_on(listener, args, shutdown).await
}

/// Joins the group; a group of one needs no rendezvous.
fn joiner(
    args: &ServeArgs,
    shard: Shard,
    metrics: Arc<WorkerMetrics>,
) -> impl FnOnce() -> Result<Box<dyn Collective>, ModelError> + Send + 'static {
    let device = args.model.device;
    let join = args.rendezvous.join_options(shard, device);
    move || {
        if shard.world == 1 {
            return Ok(Box::new(SingleRank(device)) as Box<dyn Collective>);
        }
        tracing::info!(rank = shard.rank, world_size = shard.world, master = %format!("{}:{}", join.master_addr, join.master_port), "joining the group");
        let pg = ProcessGroup::join(&join)?;
        tracing::info!(rank = shard.rank, world_size = shard.world, "joined the group");
        Ok(Box::new(Observed::new(pg, metrics)) as Box<dyn Collective>)
    }
}

/// Loads this rank's shard (a bad world size fails here, before anyone waits on us),
/// then joins the group.
fn loader(args: &ServeArgs, shard: Shard, metrics: Arc<WorkerMetrics>) -> Loader {
    let model_cfg = args.model.config();
    let join = joiner(args, shard, metrics);
    Box::new(move || Ok((models::load(&model_cfg, shard)?, join()?)))
}

/// Starts this rank's generative model thread; rank 0 also gets the service.
fn start_generative(
    args: &ServeArgs,
    gguf: &Path,
    weights: Weights,
    shard: Shard,
    threads: usize,
    metrics: Arc<WorkerMetrics>,
) -> Result<(Arc<EngineStats>, ModelThread, Option<Engine>), ServeError> {
    let file = Gguf::open(gguf)?;
    // A group size the heads do not divide is refused here, before the rendezvous.
    let cfg = LlamaConfig::from_gguf(&file)?;
    cfg.check_world(shard.world)
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let g = &args.model.generation;
    let context = match g.max_sequence_tokens {
        0 => cfg.context,
        n => n.min(cfg.context),
    };
    let opts = GenOptions {
        torch_threads: threads,
        heartbeat: args.rendezvous.heartbeat_interval,
        limits: Limits {
            max_batch_tokens: g.max_batch_tokens,
            max_running: g.max_running_sequences,
            max_waiting: g.max_waiting_sequences,
            context,
        },
        kv_tokens: g.kv_cache_tokens,
        block_size: g.kv_block_tokens as usize,
        kv_cache_dtype: g.kv_cache_dtype,
    };
    if opts.kv_tokens < opts.block_size {
        return Err(ServeError::Config(format!(
            "--kv-cache-tokens {} holds less than one block of {} tokens",
            opts.kv_tokens, opts.block_size
        )));
    }
    let join = joiner(args, shard, metrics.clone());
    let (path, device) = (gguf.to_path_buf(), args.model.device);
    let (_, why) = host::weights(args.model.weights, device);
    tracing::info!(weights = %weights.name(), why, "generative model's matrices");
    let load: GenLoader = Box::new(move || {
        let model = Llama::load(&path, shard, device, weights)?;
        crate::shim::trim_heap();
        Ok((model, join()?))
    });
    if shard.rank != 0 {
        let (stats, thread) = gen_engine::spawn_follower(load, opts).map_err(ServeError::Thread)?;
        return Ok((stats, thread, None));
    }
    let tokenizer = Arc::new(ChatTokenizer::from_gguf(&file)?);
    let model_cfg = args.model.config();
    let (handle, thread) =
        gen_engine::spawn_leader(load, opts, tokenizer.eos_id, model_cfg.name, model_cfg.version)
            .map_err(ServeError::Thread)?;
    let stats = handle.stats().clone();
    let ttft = metrics.track_generation(handle.gen_stats().clone());
    Ok((
        stats,
        thread,
        Some(Engine::Generative(GenService::new(handle, tokenizer, ttft))),
    ))
}

/// Like [`serve`], on a listener the caller bound (tests bind port 0 first).
pub async fn serve_on(
    listener: TcpListener,
    args: ServeArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: args.listen,
        source,
    })?;
    let shard = args.rendezvous.shard().map_err(ServeError::Config)?;
    let token = match &args.token_file {
        Some(path) => Some(KeyFile::load(path).map_err(|e| ServeError::Config(e.to_string()))?),
        None => None,
    };
    let threads = args
        .model
        .torch_threads(args.rendezvous.local_world_size as usize);
    let metrics = Arc::new(WorkerMetrics::new(&args.group, shard.rank, shard.world));
    let metrics_listener = bind(args.metrics_listen).await?;
    let metrics_addr = metrics_listener.local_addr().map_err(|source| ServeError::Bind {
        addr: args.metrics_listen,
        source,
    })?;
    let (stats, thread, engine) = match args.model.config().architecture {
        Architecture::Llama { gguf, weights } => {
            start_generative(&args, &gguf, weights, shard, threads, metrics.clone())?
        }
        _ if shard.rank == 0 => {
            let opts = EngineOptions {
                torch_threads: threads,
                capacity: args.queue_capacity,
                heartbeat: args.rendezvous.heartbeat_interval,
                pass_limits: PassLimits {
                    rows: args.sub_batch_rows as usize,
                    tokens: args.sub_batch_tokens as usize,
                    pass_cost_tokens: PassLimits::PASS_COST_TOKENS,
                },
                inline_max: args.inline_max,
            };
            let load = loader(&args, shard, metrics.clone());
            let (engine, thread) =
                embedding::spawn_leader(load, opts, metrics.clone()).map_err(ServeError::Thread)?;
            (engine.stats().clone(), thread, Some(Engine::Embedding(engine)))
        }
        _ => {
            let load = loader(&args, shard, metrics.clone());
            let (stats, thread) =
                embedding::spawn_follower(load, threads, metrics.clone()).map_err(ServeError::Thread)?;
            (stats, thread, None)
        }
    };
    let worker = engine.map(|e| WorkerService::new(e, args.group.clone(), shard.world as u32).into_server());

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(LIVENESS_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let health_task = tokio::spawn(track_health(reporter, stats.clone(), stop_rx.clone()));
    let metrics_listener = Listener::new(
        metrics_listener,
        "metrics",
        &args.connections,
        &metrics.connections,
    );
    let tls_files = args.tls.files().map_err(|e| ServeError::Config(e.to_string()))?;
    let tls_config = args
        .tls
        .config(tls_files.as_ref(), &[b"h2"])
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let tls_reloader = tls_files.map(|f| f.spawn_reloader(args.tls.tls_reload_interval));
    let grpc_listener =
        Listener::new(listener, "grpc", &args.connections, &metrics.connections).with_tls(tls_config);
    let metrics_task = tokio::spawn(crate::metrics::serve(
        metrics_listener,
        metrics,
        stats.clone(),
        stop_rx.clone(),
    ));
    tracing::info!(%addr, %metrics_addr, group = %args.group, rank = shard.rank, world_size = shard.world, model = %args.model.served_name(), torch_threads = threads, onednn = crate::collective::c10d::onednn_enabled(), "worker listening");

    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
    let watcher = std::thread::spawn(move || {
        let result = thread.join();
        let _ = ended_tx.send(());
        result
    });

    let mut stop_server = stop_rx.clone();
    let token_reloader = token
        .as_ref()
        .map(|t| t.spawn_reloader(args.token_reload_interval));
    let server = args
        .connections
        .grpc_server()
        .layer(rankway_runtime::grpc_errors::grpc_request_errors(
            rankway_proto::worker::MAX_MESSAGE_BYTES,
        ))
        .layer(GrpcAuthLayer::new(token, is_health_check, TOKEN_REFUSED))
        .add_service(health)
        .add_optional_service(worker)
        .serve_with_incoming_shutdown(grpc_listener.into_coalesced_incoming(), async move {
            let _ = stop_server.wait_for(|stop| *stop).await;
        });
    let server = tokio::spawn(server);

    let model_ended = tokio::select! {
        _ = shutdown => false,
        _ = ended_rx => true,
    };
    // Not ready first, so balancers stop sending; then stop accepting and drain.
    let _ = stop_tx.send(true);
    if model_ended {
        tracing::warn!(
            failure = stats.failure().unwrap_or("none"),
            "model thread ended; shutting down"
        );
    } else {
        tracing::info!("shutting down: draining in-flight batches");
    }
    match tokio::time::timeout(args.drain_timeout, server).await {
        Ok(joined) => joined.map_err(|_| ServeError::Panicked)??,
        Err(_) => tracing::warn!(drain_timeout = ?args.drain_timeout, "drain timed out"),
    }
    health_task.abort();
    metrics_task.abort();
    for r in [token_reloader, tls_reloader].into_iter().flatten() {
        r.abort();
    }
    finish(model_ended, watcher, &stats)
}

/// The process's result: the model thread's failure if it failed.
fn finish(
    model_ended: bool,
    watcher: std::thread::JoinHandle<std::thread::Result<Result<(), ModelError>>>,
    stats: &Arc<EngineStats>,
) -> Result<(), ServeError> {
    if !model_ended {
        // A signal: the model thread ends when the server drops its handle (rank 0
        // releases the followers) or with the process (followers).
        return Ok(());
    }
    match watcher.join() {
        Ok(Ok(result)) => result.map_err(ServeError::from),
        _ => Err(ServeError::Model(ModelError::Load(
            stats.failure().unwrap_or("panicked").to_owned(),
        ))),
    }
}
