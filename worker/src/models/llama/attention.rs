//! Attention of a step's query tokens over the paged [`KvCache`]. Decoding sequences (one
//! query each) read their keys and values where the cache holds them, on the host
//! ([`kernels::decode_attention`]); elsewhere (a GPU) they are gathered and batched,
//! padded to the longest context. Prefills attend causally over their own positions, one
//! sequence at a time, through libtorch's batched products.

use tch::{Device, Kind, Tensor};

use super::KvCache;
use crate::models::kernels::{self, Decode, Heads};

struct Prefill {
    /// First query token in the step, query tokens.
    queries: (i64, i64),
    rows: Tensor,
}

/// Decodes gathered for libtorch's batched products (devices other than the host).
struct Batched {
    /// Index of each decoding sequence's query token in the step.
    query: Tensor,
    /// `[b, context]` cache rows.
    rows: Tensor,
    /// `[b, 1, 1, 1, context]`: padding positions past each sequence's length.
    hidden: Tensor,
}

/// How a step's sequences are grouped for attention, the same on every rank.
pub(super) struct Plan {
    /// The step's `[sequences, max context]` cache rows, on the host.
    rows: Vec<i64>,
    width: usize,
    /// (query token, sequence, context) of each decoding sequence.
    decodes: Vec<(usize, usize, usize)>,
    batched: Option<Batched>,
    prefills: Vec<Prefill>,
}

impl Plan {
    /// `seqs` are the step's (first token, query tokens, context after the step).
    pub(super) fn new(seqs: &[[i64; 3]], rows: &Tensor, device: Device) -> Result<Self, tch::TchError> {
        let width = rows.size().get(1).copied().unwrap_or(0) as usize;
        let mut decodes = Vec::new();
        let mut prefills = Vec::new();
        for (i, &[start, len, ctx]) in seqs.iter().enumerate() {
            if len == 1 {
                decodes.push((start as usize, i, ctx as usize));
            } else {
                prefills.push(Prefill {
                    queries: (start, len),
                    rows: rows.get(i as i64).narrow(0, 0, ctx),
                });
            }
        }
        let batched = (device != Device::Cpu && !decodes.is_empty()).then(|| {
            let longest = decodes.iter().map(|d| d.2).max().expect("non-empty") as i64;
            let pick = |f: fn(&(usize, usize, usize)) -> usize| {
                Tensor::from_slice(&decodes.iter().map(|d| f(d) as i64).collect::<Vec<_>>()).to_device(device)
            };
            let lens = pick(|d| d.2).view([-1, 1, 1, 1, 1]);
            Batched {
                query: pick(|d| d.0),
                rows: rows.index_select(0, &pick(|d| d.1)).narrow(1, 0, longest),
                hidden: Tensor::arange(longest, (Kind::Int64, device))
                    .view([1, 1, 1, 1, -1])
                    .ge_tensor(&lens),
            }
        });
        let host_rows = if device == Device::Cpu {
            Vec::<i64>::try_from(rows.contiguous().view([-1]))?
        } else {
            Vec::new()
        };
        Ok(Self {
            rows: host_rows,
            width,
            decodes,
            batched,
            prefills,
        })
    }

    /// Attention of every query token of the step: `[tokens, heads · d]` from the step's
    /// QKV product (RoPE applied, keys and values already in the cache).
    pub(super) fn attend(
        &self,
        qkv: &Tensor,
        positions: &Tensor,
        cache: &KvCache,
        layer: usize,
        shape: Heads,
    ) -> Tensor {
        let Heads { heads, kv_heads, d } = shape;
        let (h, kvh, d) = (heads as i64, kv_heads as i64, d as i64);
        let rep = h / kvh;
        let n = qkv.size()[0];
        let q = qkv.narrow(1, 0, h * d).view([n, h, d]);
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = Tensor::zeros([n, h * d], (Kind::Float, qkv.device()));
        let (keys, values) = cache.layer(layer);
        if kernels::on_host(qkv) {
            let decodes: Vec<Decode<'_>> = self
                .decodes
                .iter()
                .map(|&(token, seq, ctx)| Decode {
                    token,
                    rows: &self.rows[seq * self.width..][..ctx],
                })
                .collect();
            kernels::decode_attention(qkv, keys, values, &decodes, shape, &mut out);
        }
        let out3 = out.view([n, h, d]);
        if let Some(dec) = &self.batched {
            let b = dec.query.size()[0];
            let c = dec.rows.size()[1];
            let qd = q.index_select(0, &dec.query).view([b, kvh, rep, 1, d]);
            let (k, v) = gather(keys, values, &dec.rows);
            let k = k.view([b, c, kvh, d]).permute([0, 2, 1, 3]).unsqueeze(2);
            let v = v.view([b, c, kvh, d]).permute([0, 2, 1, 3]).unsqueeze(2);
            let scores = qd.matmul(&k.transpose(-1, -2)) * scale;
            let scores = scores.masked_fill(&dec.hidden, f64::NEG_INFINITY);
            let att = scores.softmax(-1, Kind::Float).matmul(&v);
            let _ = out3
                .shallow_clone()
                .index_copy_(0, &dec.query, &att.view([b, kvh * rep, d]));
        }
        for p in &self.prefills {
            let (start, len) = p.queries;
            let c = p.rows.size()[0];
            let qp = q
                .narrow(0, start, len)
                .view([len, kvh, rep, d])
                .permute([1, 2, 0, 3]);
            let (k, v) = gather(keys, values, &p.rows);
            let k = k.view([c, kvh, d]).permute([1, 0, 2]).unsqueeze(1);
            let v = v.view([c, kvh, d]).permute([1, 0, 2]).unsqueeze(1);
            let key_pos = Tensor::arange(c, (Kind::Int64, qkv.device())).unsqueeze(0);
            let hidden = key_pos.gt_tensor(&positions.narrow(0, start, len).unsqueeze(1));
            let scores = qp.matmul(&k.transpose(-1, -2)) * scale;
            let scores = scores.masked_fill(&hidden, f64::NEG_INFINITY);
            let att = scores.softmax(-1, Kind::Float).matmul(&v);
            out3.narrow(0, start, len)
                .copy_(&att.permute([2, 0, 1, 3]).reshape([len, kvh * rep, d]));
        }
        out
    }
}

/// Keys and values at `rows` (any shape), as float32 `[rows.numel(), kv heads, d]`.
fn gather(keys: &Tensor, values: &Tensor, rows: &Tensor) -> (Tensor, Tensor) {
    let flat = rows.reshape([-1]);
    let read = |cache: &Tensor| cache.index_select(0, &flat).to_kind(Kind::Float);
    (read(keys), read(values))
}
