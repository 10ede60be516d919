//! The group protocol: how rank 0 drives every rank through each forward pass.
//!
//! For every step rank 0 sends a fixed-size header (op, batch id, the kind and shape of
//! each input tensor), then the input tensors; all ranks then run the same forward,
//! whose tensor-parallel layers all-reduce inside. The header travels as an all-reduce
//! (rank 0 contributes the values, the others zeros) rather than a broadcast: every rank
//! must take part, so a lost rank fails the very next step — including the heartbeat
//! rank 0 sends when idle — instead of going unnoticed in a socket buffer.
//!
//! The header also carries rank 0's trace context (trace id, span id, sampled flag), so
//! each follower's `forward` span joins the trace of the batch it computes. The `forward`
//! spans are made only when traces are exported (`telemetry::TRACE_ONLY`).

use std::time::Instant;

use rankway_runtime::telemetry::{self, TRACE_ONLY, TraceParent};
use tch::{Kind, Tensor};

use crate::collective::{Collective, CollectiveError};
use crate::metrics::WorkerMetrics;
use crate::models::{Model, ModelError, Prepared};

const HEADER_LEN: usize = 36;
/// Where the trace context sits: trace id (two words), span id, flags.
const TRACE_AT: usize = 32;
const MAX_TENSORS: usize = 4;
const MAX_DIMS: usize = 5;

/// What the followers are asked to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Receive the inputs and run a forward pass.
    Batch = 1,
    /// Nothing to do; proves every rank is still there.
    Heartbeat = 2,
    /// Rank 0 is shutting down cleanly: exit with success.
    Shutdown = 3,
    /// Receive a generative step (tokens, sequences, cache rows) and run it.
    Step = 4,
}

/// One step's header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub op: Op,
    pub batch_id: u64,
    pub tensors: Vec<(Kind, Vec<i64>)>,
    /// The span the followers' spans are children of, when the step is traced.
    pub trace: Option<TraceParent>,
}

fn kind_code(kind: Kind) -> Result<i64, ModelError> {
    match kind {
        Kind::Int64 => Ok(1),
        Kind::Float => Ok(2),
        other => Err(ModelError::InvalidInput(format!(
            "cannot send a {other:?} tensor to the group"
        ))),
    }
}

fn code_kind(code: i64) -> Option<Kind> {
    match code {
        1 => Some(Kind::Int64),
        2 => Some(Kind::Float),
        _ => None,
    }
}

impl Header {
    pub fn control(op: Op) -> Self {
        Self {
            op,
            batch_id: 0,
            tensors: Vec::new(),
            trace: None,
        }
    }

    /// Layout: [op, batch_id, n, then per tensor: kind, ndim, dims (MAX_DIMS slots)],
    /// and at TRACE_AT: trace id high and low words, span id, flags (1 = traced, 2 =
    /// sampled). Each value is an i64 bit pattern: the all-reduce adds only zeros to it.
    pub fn encode(&self) -> Result<Tensor, ModelError> {
        Ok(Tensor::from_slice(&self.encode_words()?))
    }

    fn encode_words(&self) -> Result<Vec<i64>, ModelError> {
        if self.tensors.len() > MAX_TENSORS {
            return Err(ModelError::InvalidInput(format!(
                "at most {MAX_TENSORS} tensors per step"
            )));
        }
        let mut v = vec![0i64; HEADER_LEN];
        v[0] = self.op as i64;
        v[1] = self.batch_id as i64;
        v[2] = self.tensors.len() as i64;
        for (i, (kind, shape)) in self.tensors.iter().enumerate() {
            if shape.len() > MAX_DIMS {
                return Err(ModelError::InvalidInput(format!(
                    "at most {MAX_DIMS} dimensions per tensor"
                )));
            }
            let at = 3 + i * (2 + MAX_DIMS);
            v[at] = kind_code(*kind)?;
            v[at + 1] = shape.len() as i64;
            v[at + 2..at + 2 + shape.len()].copy_from_slice(shape);
        }
        if let Some(t) = self.trace {
            v[TRACE_AT] = (t.trace_id >> 64) as u64 as i64;
            v[TRACE_AT + 1] = t.trace_id as u64 as i64;
            v[TRACE_AT + 2] = t.span_id as i64;
            v[TRACE_AT + 3] = 1 | if t.sampled { 2 } else { 0 };
        }
        Ok(v)
    }

    pub fn decode(t: &Tensor) -> Result<Self, CollectiveError> {
        let bad = |m: String| CollectiveError {
            op: "header",
            message: m,
        };
        let v = Vec::<i64>::try_from(t.to_device(tch::Device::Cpu)).map_err(|e| bad(e.to_string()))?;
        Self::decode_words(&v).map_err(bad)
    }

    /// [`Header::decode`] of the header's words: any words are refused or decoded.
    fn decode_words(v: &[i64]) -> Result<Self, String> {
        if v.len() != HEADER_LEN {
            return Err(format!("header of {} words, not {HEADER_LEN}", v.len()));
        }
        let op = match v.first() {
            Some(1) => Op::Batch,
            Some(2) => Op::Heartbeat,
            Some(3) => Op::Shutdown,
            Some(4) => Op::Step,
            other => {
                return Err(format!("unknown op {other:?}: ranks disagree on the protocol"));
            }
        };
        let n = v[2] as usize;
        if n > MAX_TENSORS {
            return Err(format!("header announces {n} tensors"));
        }
        let tensors = (0..n)
            .map(|i| {
                let at = 3 + i * (2 + MAX_DIMS);
                let kind = code_kind(v[at]).ok_or_else(|| format!("unknown tensor kind {}", v[at]))?;
                let ndim = (v[at + 1] as usize).min(MAX_DIMS);
                Ok((kind, v[at + 2..at + 2 + ndim].to_vec()))
            })
            .collect::<Result<_, String>>()?;
        let flags = v[TRACE_AT + 3];
        let trace = (flags & 1 == 1).then(|| TraceParent {
            trace_id: (u128::from(v[TRACE_AT] as u64) << 64) | u128::from(v[TRACE_AT + 1] as u64),
            span_id: v[TRACE_AT + 2] as u64,
            sampled: flags & 2 == 2,
        });
        Ok(Self {
            op,
            batch_id: v[1] as u64,
            tensors,
            trace,
        })
    }
}

/// Rank 0: sends `header` to every rank (see the module doc for why an all-reduce).
pub fn send_header(comm: &dyn Collective, header: &Header) -> Result<(), ModelError> {
    if comm.shard().world == 1 {
        return Ok(());
    }
    let mut t = header.encode()?.to_device(comm.device());
    comm.all_reduce_sum(&mut t)?;
    Ok(())
}

/// Runs the model on `batch`, timing it into the metrics.
fn forward(
    model: &dyn Model,
    batch: &Prepared,
    comm: &dyn Collective,
    metrics: &WorkerMetrics,
) -> Result<Tensor, ModelError> {
    let started = Instant::now();
    let output = model.forward(batch, comm)?;
    metrics.observe_forward(started.elapsed());
    Ok(output)
}

/// Rank 0: runs one batch on the whole group and returns rank 0's output. Its `forward`
/// span is a child of the current span (the batch's gRPC call).
pub fn lead_batch(
    comm: &dyn Collective,
    model: &dyn Model,
    batch_id: u64,
    batch: &mut Prepared,
    metrics: &WorkerMetrics,
) -> Result<Tensor, ModelError> {
    let span = tracing::info_span!(target: TRACE_ONLY, "forward", rank = 0, batch_id, rows = batch.rows);
    let _entered = span.enter();
    // Prepared on the CPU (tokenizing, decoding); computed on the group's device.
    for t in batch.tensors.iter_mut() {
        *t = t.to_device(comm.device());
    }
    send_work(
        comm,
        Op::Batch,
        batch_id,
        &mut batch.tensors,
        TraceParent::of(&span),
    )?;
    forward(model, batch, comm, metrics)
}

/// Rank 0: announces a step (`Op::Batch` or `Op::Step`) and sends its tensors, already
/// on the group's device, to every rank. Nothing to do in a group of one.
pub fn send_work(
    comm: &dyn Collective,
    op: Op,
    batch_id: u64,
    tensors: &mut [Tensor],
    trace: Option<TraceParent>,
) -> Result<(), ModelError> {
    if comm.shard().world == 1 {
        return Ok(());
    }
    let header = Header {
        op,
        batch_id,
        tensors: tensors.iter().map(|t| (t.kind(), t.size())).collect(),
        trace,
    };
    send_header(comm, &header)?;
    for t in tensors.iter_mut() {
        comm.broadcast(t, 0)?;
    }
    Ok(())
}

/// Followers: the tensors `header` announces, from rank 0.
fn receive_work(comm: &dyn Collective, header: &Header) -> Result<Vec<Tensor>, CollectiveError> {
    header
        .tensors
        .iter()
        .map(|(kind, shape)| {
            let mut t = Tensor::zeros(shape.as_slice(), (*kind, comm.device()));
            comm.broadcast(&mut t, 0).map(|()| t)
        })
        .collect()
}

/// Followers of an embedding group: run each batch of rank 0's on `model`.
pub fn follow(
    comm: &dyn Collective,
    model: &dyn Model,
    metrics: &WorkerMetrics,
    on_step: impl FnMut(&Header),
) -> Result<(), ModelError> {
    follow_with(comm, Op::Batch, on_step, |tensors| {
        let rows = tensors
            .first()
            .map_or(0, |t| t.size().first().copied().unwrap_or(0) as usize);
        let batch = Prepared {
            rows,
            tensors,
            token_counts: None,
        };
        forward(model, &batch, comm, metrics).map(drop)
    })
}

/// Followers: serve rank 0's steps until it shuts down (Ok) or a collective fails (Err).
/// Each step of kind `work` (`Op::Batch` or `Op::Step`) goes to `compute` with its
/// tensors; a step of the other kind means the ranks run different models, an error.
/// `on_step` sees every header, for liveness tracking and logs.
pub fn follow_with(
    comm: &dyn Collective,
    work: Op,
    mut on_step: impl FnMut(&Header),
    mut compute: impl FnMut(Vec<Tensor>) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let rank = comm.shard().rank;
    loop {
        let mut t = Tensor::zeros([HEADER_LEN as i64], (Kind::Int64, comm.device()));
        comm.all_reduce_sum(&mut t)?;
        let header = Header::decode(&t)?;
        on_step(&header);
        match header.op {
            Op::Heartbeat => continue,
            Op::Shutdown => return Ok(()),
            op if op == work => {
                let span =
                    tracing::info_span!(target: TRACE_ONLY, "forward", rank, batch_id = header.batch_id);
                if let Some(parent) = header.trace {
                    telemetry::set_parent(&span, parent.context());
                }
                let _entered = span.enter();
                compute(receive_work(comm, &header)?)?;
            }
            other => {
                return Err(CollectiveError {
                    op: "header",
                    message: format!(
                        "rank 0 sent {other:?} to a follower serving {work:?}: the ranks run different models"
                    ),
                }
                .into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_step_header_decoder() {
        use proptest::prelude::*;
        let word = prop_oneof![-2i64..8, any::<i64>()];
        let words = prop_oneof![
            proptest::collection::vec(word.clone(), HEADER_LEN..=HEADER_LEN),
            proptest::collection::vec(word, 0..HEADER_LEN + 3),
        ];
        rankway_runtime::fuzz::run("step header decoder", words, |v| {
            let _ = Header::decode_words(&v);
        });
        // Every header rank 0 can encode decodes to itself on the other ranks.
        let op = prop::sample::select(vec![Op::Batch, Op::Heartbeat, Op::Shutdown, Op::Step]);
        let tensor = (
            prop::sample::select(vec![Kind::Int64, Kind::Float]),
            proptest::collection::vec(any::<i64>(), 0..=MAX_DIMS),
        );
        let trace = (any::<u128>(), any::<u64>(), any::<bool>()).prop_map(|(trace_id, span_id, sampled)| {
            TraceParent {
                trace_id,
                span_id,
                sampled,
            }
        });
        let header = (
            op,
            any::<u64>(),
            proptest::collection::vec(tensor, 0..=MAX_TENSORS),
            proptest::option::of(trace),
        )
            .prop_map(|(op, batch_id, tensors, trace)| Header {
                op,
                batch_id,
                tensors,
                trace,
            });
        rankway_runtime::fuzz::run("step header round trip", header, |h| {
            let words = h.encode_words().expect("within the limits");
            assert_eq!(Header::decode_words(&words).unwrap(), h);
        });
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            op: Op::Batch,
            batch_id: 77,
            tensors: vec![(Kind::Int64, vec![3, 9]), (Kind::Float, vec![3, 256])],
            trace: None,
        };
        assert_eq!(Header::decode(&h.encode().unwrap()).unwrap(), h);
        // Trace ids use all 128 bits; span ids all 64.
        let traced = Header {
            trace: Some(TraceParent {
                trace_id: u128::MAX - 5,
                span_id: u64::MAX - 7,
                sampled: true,
            }),
            ..h.clone()
        };
        assert_eq!(Header::decode(&traced.encode().unwrap()).unwrap(), traced);
        let unsampled = Header {
            trace: Some(TraceParent {
                trace_id: 1,
                span_id: 2,
                sampled: false,
            }),
            ..h
        };
        assert_eq!(Header::decode(&unsampled.encode().unwrap()).unwrap(), unsampled);
        let c = Header::control(Op::Heartbeat);
        assert_eq!(Header::decode(&c.encode().unwrap()).unwrap(), c);
    }

    #[test]
    fn garbage_headers_are_errors() {
        let zeros = Tensor::zeros([HEADER_LEN as i64], (Kind::Int64, tch::Device::Cpu));
        assert!(Header::decode(&zeros).unwrap_err().message.contains("unknown op"));
        let too_many = Header {
            op: Op::Batch,
            batch_id: 1,
            tensors: vec![(Kind::Float, vec![1]); 5],
            trace: None,
        };
        assert!(too_many.encode().is_err());
    }
}
