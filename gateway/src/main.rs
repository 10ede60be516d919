use anyhow::Context;
use clap::Parser;
use rankway_gateway::app::{self, Listeners};
use rankway_gateway::config::Config;
use rankway_runtime::{executor, telemetry};

fn main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let io_threads = cfg.io_threads.map_or_else(default_io_threads, usize::from);
    let rt = executor::build(io_threads).context("tokio runtime")?;
    rt.block_on(async {
        let telemetry = telemetry::init(&cfg.telemetry, "rankway-gateway")?;
        let listeners = Listeners::bind(&cfg).await?;
        let result = app::run(cfg, listeners, rankway_runtime::shutdown::signal_received()).await;
        // After the drain: the spans of the last requests are flushed too.
        telemetry.shutdown().await;
        Ok(result?)
    })
}

/// Half the cores this process may use (its CPU limit included), at least one: see
/// `--io-threads`.
fn default_io_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}
