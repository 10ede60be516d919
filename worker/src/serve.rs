//! `rankway-worker serve`: load the model on its thread, serve gRPC, drain on signal.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::ServeArgs;
use crate::dist::{Shard, SingleRank};
use crate::engine;
use crate::models;
use crate::server::{WorkerService, track_health};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the model thread: {0}")]
    Thread(std::io::Error),
    #[error("model thread failed: {0}")]
    Model(#[from] models::ModelError),
    #[error("model thread panicked")]
    Panicked,
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` resolves (then drains) or the model thread fails (then
/// returns its error, so the process exits non-zero and is restarted).
pub async fn serve(args: ServeArgs, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.listen,
            source,
        })?;
    serve_on(listener, args, shutdown).await
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
    let model_args = args.model.clone();
    let (engine, thread) = engine::spawn(
        Box::new(move || {
            let model = models::load(&model_args, Shard::SINGLE)?;
            Ok((model, Box::new(SingleRank) as Box<dyn crate::dist::Collective>))
        }),
        args.model.torch_threads(),
        args.queue_capacity,
    )
    .map_err(ServeError::Thread)?;
    let stats = engine.stats().clone();

    let (reporter, health) = tonic_health::server::health_reporter();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let health_task = tokio::spawn(track_health(reporter, stats.clone(), stop_rx.clone()));
    tracing::info!(%addr, group = %args.group, model = %args.model.served_name(), "worker listening");

    // The model thread ends only on failure while the server holds its sender.
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
    let watcher = std::thread::spawn(move || {
        let result = thread.join();
        let _ = failed_tx.send(());
        result
    });

    let mut stop_for_server = stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(WorkerService::new(engine, args.group.clone()).into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = stop_for_server.wait_for(|stop| *stop).await;
        });
    let drain_timeout = args.drain_timeout;
    let server = tokio::spawn(server);

    let model_failed = tokio::select! {
        _ = shutdown => false,
        _ = failed_rx => true,
    };
    // Not ready first, so balancers stop sending; then stop accepting and drain.
    let _ = stop_tx.send(true);
    tracing::info!(model_failed, "shutting down: draining in-flight batches");
    match tokio::time::timeout(drain_timeout, server).await {
        Ok(joined) => joined.map_err(|_| ServeError::Panicked)??,
        Err(_) => tracing::warn!(?drain_timeout, "drain timed out; exiting with batches in flight"),
    }
    health_task.abort();
    if model_failed {
        return match watcher.join() {
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Ok(Ok(()))) => Ok(()),
            _ => Err(ServeError::Panicked),
        };
    }
    Ok(())
}
