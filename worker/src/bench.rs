//! `rankway-worker bench`: batched throughput of the model in process, with no network,
//! the ceiling the gateway's throughput is measured against.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rankway_proto::codec::encode_bytes_elements;
use rankway_proto::worker::{DataType, Tensor as WireTensor};
use serde::Serialize;

use crate::config::{BenchArgs, ModelKind};
use crate::dist::{Shard, SingleRank};
use crate::engine::{self, EngineError, EngineOptions};
use crate::metrics::WorkerMetrics;
use crate::models;

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

fn inputs(args: &BenchArgs, batch: usize) -> Vec<WireTensor> {
    match args.model.model {
        ModelKind::Minilm => {
            let texts: Vec<&str> = SENTENCES.iter().cycle().take(batch).copied().collect();
            vec![WireTensor {
                name: models::minilm::INPUT.into(),
                datatype: DataType::Bytes as i32,
                shape: vec![batch as i64],
                data: encode_bytes_elements(&texts).into(),
            }]
        }
        ModelKind::Mlp => {
            let hidden = args.model.mlp_hidden as usize;
            let values: Vec<u8> = (0..batch * hidden)
                .flat_map(|i| ((i % 17) as f32 / 17.0).to_le_bytes())
                .collect();
            vec![WireTensor {
                name: models::mlp::INPUT.into(),
                datatype: DataType::Fp32 as i32,
                shape: vec![batch as i64, hidden as i64],
                data: values.into(),
            }]
        }
    }
}

pub fn run(args: &BenchArgs) -> Result<Vec<BenchRow>, EngineError> {
    let model_args = args.model.clone();
    let opts = EngineOptions {
        torch_threads: args.model.torch_threads(1),
        capacity: 1,
        heartbeat: Duration::MAX,
    };
    let (engine, _thread) = engine::spawn_leader(
        Box::new(move |_| {
            let model = models::load(&model_args, Shard::SINGLE)?;
            Ok((
                model,
                Box::new(SingleRank(model_args.device)) as Box<dyn crate::dist::Collective>,
            ))
        }),
        opts,
        Arc::new(WorkerMetrics::new("bench", Shard::SINGLE)),
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
