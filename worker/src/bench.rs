//! `rankway-worker bench`: batched throughput of the model in process, with no network,
//! the ceiling the gateway's throughput is measured against.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{BenchArgs, ModelKind};
use crate::engine::EngineError;
use crate::engine::embedding::{self, EngineOptions};
use crate::metrics::WorkerMetrics;
use crate::models::{self, HostTensor, PassLimits};

/// Sentences of mixed length, cycled to fill a batch.
const SENTENCES: [&str; 4] = [
    "The quick brown fox jumps over the lazy dog.",
    "A tensor-parallel group computes every batch on all of its ranks.",
    "Rankway batches requests from many clients before they reach the model.",
    "Short text.",
];

#[derive(Debug, Serialize)]
pub struct BenchRow {
    pub batch_size: usize,
    pub batches: usize,
    pub rows_per_sec: f64,
    pub mean_batch_ms: f64,
}

fn inputs(args: &BenchArgs, batch: usize) -> Vec<HostTensor> {
    match args.model.model {
        ModelKind::Minilm => {
            let texts: Vec<&str> = SENTENCES.iter().cycle().take(batch).copied().collect();
            vec![HostTensor::texts(models::minilm::INPUT, &texts)]
        }
        ModelKind::Smollm2 => Vec::new(), // measured by crate::generate::bench
        ModelKind::Mlp => {
            let hidden = args.model.mlp_hidden as usize;
            let values: Vec<f32> = (0..batch * hidden).map(|i| (i % 17) as f32 / 17.0).collect();
            vec![HostTensor::f32(
                models::mlp::INPUT,
                vec![batch as i64, hidden as i64],
                &values,
            )]
        }
    }
}

pub fn run(args: &BenchArgs) -> Result<Vec<BenchRow>, EngineError> {
    let model_cfg = args.model.config();
    let opts = EngineOptions {
        torch_threads: args.model.torch_threads(1),
        capacity: 1,
        heartbeat: Duration::MAX,
        // Each batch size as one forward pass.
        pass_limits: PassLimits::NONE,
        // Batches go through the model thread, as a group of more than one rank's do.
        inline_max: Duration::ZERO,
    };
    let (engine, _thread) = embedding::spawn_leader(
        embedding::single_rank(model_cfg),
        opts,
        Arc::new(WorkerMetrics::new("bench", 0, 1)),
    )
    .map_err(|e| EngineError::Stopped(e.to_string()))?;
    let mut rows = Vec::new();
    for &batch in &args.batch_sizes {
        let input = inputs(args, batch);
        engine.infer_blocking(input.clone())?; // warm this shape
        let started = Instant::now();
        let mut batches = 0;
        while started.elapsed() < args.duration || batches < 3 {
            engine.infer_blocking(input.clone())?;
            batches += 1;
        }
        let elapsed = started.elapsed().max(Duration::from_micros(1)).as_secs_f64();
        rows.push(BenchRow {
            batch_size: batch,
            batches,
            rows_per_sec: (batches * batch) as f64 / elapsed,
            mean_batch_ms: elapsed * 1e3 / batches as f64,
        });
    }
    Ok(rows)
}
