use clap::Parser;
use rankway_gateway::app::{self, Listeners};
use rankway_gateway::config::Config;
use rankway_proto::telemetry;

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let telemetry = telemetry::init(&cfg.telemetry, "rankway-gateway")?;
    let listeners = Listeners::bind(&cfg).await?;
    let result = app::run(cfg, listeners, shutdown_signal()).await;
    // After the drain: the spans of the last requests are flushed too.
    telemetry.shutdown().await;
    Ok(result?)
}
