use anyhow::Context;
use clap::Parser;
use rankway_runtime::executor;
use rankway_runtime::telemetry::{self, Telemetry, TelemetryArgs};
use rankway_worker::collective::c10d::set_onednn;
use rankway_worker::config::{Cli, Command, ModelKind};
use rankway_worker::generate::bench::GenBenchRow;
use rankway_worker::{bench, launch, serve};

/// Logs a failure as one line (the group's restart policy reads the exit status).
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "exiting with failure");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Installs logging (and tracing, which needs the runtime's reactor for its exporter).
fn init_telemetry(args: &TelemetryArgs) -> anyhow::Result<Telemetry> {
    Ok(telemetry::init(args, "rankway-worker")?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            set_onednn(args.model.onednn());
            let rt = executor::build(args.io_threads.into()).context("tokio runtime")?;
            rt.block_on(async {
                let telemetry = init_telemetry(&cli.telemetry)?;
                launch::follow_launcher()?; // block_on runs this on the main thread
                let result = serve::serve(args, rankway_runtime::shutdown::signal_received()).await;
                // After the drain: the spans of the last batches are flushed too.
                telemetry.shutdown().await;
                Ok::<_, anyhow::Error>(result?)
            })?;
        }
        Command::Launch(args) => {
            let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
            rt.block_on(async {
                let _logs = init_telemetry(&TelemetryArgs {
                    otlp_endpoint: None, // the ranks it starts export their own spans
                    ..cli.telemetry
                })?;
                launch::launch(args, rankway_runtime::shutdown::signal_received()).await;
                Ok::<_, anyhow::Error>(())
            })?;
        }
        Command::Bench(args) => {
            set_onednn(args.model.onednn());
            // In process, no spans to export.
            let _logs = init_telemetry(&TelemetryArgs {
                otlp_endpoint: None,
                ..cli.telemetry
            })?;
            if args.model.model == ModelKind::Smollm2 {
                print_generation(&rankway_worker::generate::bench::run(&args)?, args.json)?;
                return Ok(());
            }
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

fn print_generation(rows: &[GenBenchRow], json: bool) -> anyhow::Result<()> {
    if json {
        for row in rows {
            println!("{}", serde_json::to_string(row)?);
        }
        return Ok(());
    }
    println!(
        "{:>6} {:>9} {:>8} {:>10} {:>8} {:>7} {:>10} {:>8}",
        "world", "dtype", "phase", "sequences", "tokens", "steps", "tokens/s", "ms/step"
    );
    for r in rows {
        println!(
            "{:>6} {:>9} {:>8} {:>10} {:>8} {:>7} {:>10.1} {:>8.1}",
            r.world, r.dtype, r.phase, r.sequences, r.tokens, r.steps, r.tokens_per_sec, r.ms_per_step
        );
    }
    Ok(())
}
