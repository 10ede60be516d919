//! The group protocol: how rank 0 drives every rank through each forward pass.
//!
//! For every step rank 0 sends a fixed-size header (op, batch id, the kind and shape of
//! each input tensor), then the input tensors; all ranks then run the same forward,
//! whose tensor-parallel layers all-reduce inside. The header travels as an all-reduce
//! (rank 0 contributes the values, the others zeros) rather than a broadcast: every rank
//! must take part, so a lost rank fails the very next step — including the heartbeat
//! rank 0 sends when idle — instead of going unnoticed in a socket buffer.

use tch::{Kind, Tensor};

use crate::dist::{Collective, CollectiveError};
use crate::models::{Model, ModelError, Prepared};

const HEADER_LEN: usize = 32;
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
}

/// One step's header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub op: Op,
    pub batch_id: u64,
    pub tensors: Vec<(Kind, Vec<i64>)>,
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
        }
    }

    /// Layout: [op, batch_id, n, then per tensor: kind, ndim, dims (MAX_DIMS slots)].
    pub fn encode(&self) -> Result<Tensor, ModelError> {
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
        Ok(Tensor::from_slice(&v))
    }

    pub fn decode(t: &Tensor) -> Result<Self, CollectiveError> {
        let bad = |m: String| CollectiveError {
            op: "header",
            message: m,
        };
        let v = Vec::<i64>::try_from(t).map_err(|e| bad(e.to_string()))?;
        let op = match v.first() {
            Some(1) => Op::Batch,
            Some(2) => Op::Heartbeat,
            Some(3) => Op::Shutdown,
            other => {
                return Err(bad(format!(
                    "unknown op {other:?}: ranks disagree on the protocol"
                )));
            }
        };
        let n = v[2] as usize;
        if n > MAX_TENSORS {
            return Err(bad(format!("header announces {n} tensors")));
        }
        let tensors = (0..n)
            .map(|i| {
                let at = 3 + i * (2 + MAX_DIMS);
                let kind = code_kind(v[at]).ok_or_else(|| bad(format!("unknown tensor kind {}", v[at])))?;
                let ndim = (v[at + 1] as usize).min(MAX_DIMS);
                Ok((kind, v[at + 2..at + 2 + ndim].to_vec()))
            })
            .collect::<Result<_, CollectiveError>>()?;
        Ok(Self {
            op,
            batch_id: v[1] as u64,
            tensors,
        })
    }
}

/// Rank 0: sends `header` to every rank (see the module doc for why an all-reduce).
pub fn send_header(comm: &dyn Collective, header: &Header) -> Result<(), ModelError> {
    if comm.shard().world == 1 {
        return Ok(());
    }
    let mut t = header.encode()?;
    comm.all_reduce_sum(&mut t)?;
    Ok(())
}

/// Rank 0: runs one batch on the whole group and returns rank 0's output.
pub fn lead_batch(
    comm: &dyn Collective,
    model: &dyn Model,
    batch_id: u64,
    batch: &mut Prepared,
) -> Result<Tensor, ModelError> {
    if comm.shard().world > 1 {
        let header = Header {
            op: Op::Batch,
            batch_id,
            tensors: batch.tensors.iter().map(|t| (t.kind(), t.size())).collect(),
        };
        send_header(comm, &header)?;
        for t in batch.tensors.iter_mut() {
            comm.broadcast(t, 0)?;
        }
    }
    model.forward(batch, comm)
}

/// Followers: serve rank 0's steps until it shuts down (Ok) or a collective fails (Err).
/// `on_step` sees every header, for liveness tracking and logs.
pub fn follow(
    comm: &dyn Collective,
    model: &dyn Model,
    mut on_step: impl FnMut(&Header),
) -> Result<(), ModelError> {
    loop {
        let mut t = Tensor::zeros([HEADER_LEN as i64], (Kind::Int64, tch::Device::Cpu));
        comm.all_reduce_sum(&mut t)?;
        let header = Header::decode(&t)?;
        on_step(&header);
        match header.op {
            Op::Heartbeat => continue,
            Op::Shutdown => return Ok(()),
            Op::Batch => {
                let tensors = header
                    .tensors
                    .iter()
                    .map(|(kind, shape)| {
                        let mut t = Tensor::zeros(shape.as_slice(), (*kind, tch::Device::Cpu));
                        comm.broadcast(&mut t, 0).map(|()| t)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let rows = tensors
                    .first()
                    .map_or(0, |t| t.size().first().copied().unwrap_or(0) as usize);
                let batch = Prepared {
                    rows,
                    tensors,
                    token_counts: None,
                };
                let _output = model.forward(&batch, comm)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            op: Op::Batch,
            batch_id: 77,
            tensors: vec![(Kind::Int64, vec![3, 9]), (Kind::Float, vec![3, 256])],
        };
        assert_eq!(Header::decode(&h.encode().unwrap()).unwrap(), h);
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
        };
        assert!(too_many.encode().is_err());
    }
}
