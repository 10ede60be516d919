use clap::Parser;
use rankway_gateway::app::{self, Listeners};
use rankway_gateway::config::Config;
use rankway_runtime::telemetry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let telemetry = telemetry::init(&cfg.telemetry, "rankway-gateway")?;
    let listeners = Listeners::bind(&cfg).await?;
    let result = app::run(cfg, listeners, rankway_runtime::shutdown::signal_received()).await;
    // After the drain: the spans of the last requests are flushed too.
    telemetry.shutdown().await;
    Ok(result?)
}
