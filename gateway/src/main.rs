use anyhow::Context;
use clap::Parser;
use rankway_gateway::app::{self, Listeners};
use rankway_gateway::config::Config;
use rankway_runtime::telemetry;

fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cfg.io_threads {
        rt.worker_threads(n.into());
    }
    let rt = rt.enable_all().build().context("tokio runtime")?;
    rt.block_on(async {
        let telemetry = telemetry::init(&cfg.telemetry, "rankway-gateway")?;
        let listeners = Listeners::bind(&cfg).await?;
        let result = app::run(cfg, listeners, rankway_runtime::shutdown::signal_received()).await;
        // After the drain: the spans of the last requests are flushed too.
        telemetry.shutdown().await;
        Ok(result?)
    })
}
