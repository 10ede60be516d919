use anyhow::Context;
use clap::Parser;
use rankway_worker::config::{Cli, Command, LogFormat};
use rankway_worker::{bench, launch, serve};

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Logs a failure as one line (the group's restart policy reads the exit status).
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "exiting with failure");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
            rt.block_on(serve::serve(args, shutdown_signal()))?;
        }
        Command::Launch(args) => {
            let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
            rt.block_on(launch::launch(args, shutdown_signal()));
        }
        Command::Bench(args) => {
            let rows = bench::run(&args)?;
            if args.json {
                for row in &rows {
                    println!("{}", serde_json::to_string(row)?);
                }
            } else {
                println!(
                    "{:>10} {:>10} {:>14} {:>14}",
                    "batch", "batches", "rows/s", "ms/batch"
                );
                for r in &rows {
                    println!(
                        "{:>10} {:>10} {:>14.1} {:>14.2}",
                        r.batch_size, r.batches, r.rows_per_sec, r.mean_batch_ms
                    );
                }
            }
        }
    }
    Ok(())
}
