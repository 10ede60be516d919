//! The decoder's arithmetic between its matrix products, on the CPU: plain loops over the
//! tensors' own memory instead of a chain of libtorch operators. A step of SmolLM2 ran
//! about 75 operators a layer (norms, RoPE, the int8 input scaling, a gathered copy of
//! every decoding sequence's keys and values); each costs a dispatch and a temporary
//! whatever its size, and at one sequence they took more time than the matrices
//! (docs/generation.md, "The step on the host"). Here each is one pass with no temporary
//! but its output, and decode attention reads keys and values where the paged cache
//! holds them.
//!
//! Inner loops are written for the compiler to vectorise (eight independent lanes), and
//! compiled twice: for AVX2 with FMA, used when the CPU has them, and for the baseline.
//! Only CPU float32 tensors (and bfloat16 caches) come here; other devices keep
//! libtorch's operators ([`super::llama`]).
#![allow(unsafe_code)]

use std::any::Any;
use std::ffi::c_void;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

unsafe extern "C" {
    fn rw_parallel_for(n: i64, grain: i64, f: extern "C" fn(*mut c_void, i64, i64), ctx: *mut c_void);
}

/// Runs `f` over `0..n` split into ranges of at least `grain` on libtorch's intra-op
/// threads (`parallel_shim.cpp`); on the calling thread alone when `n <= grain`. A panic
/// in `f` is caught on its thread and resumed here.
fn parallel_for<F: Fn(Range<usize>) + Sync>(n: usize, grain: usize, f: F) {
    struct Ctx<'a, F> {
        f: &'a F,
        panic: Mutex<Option<Box<dyn Any + Send>>>,
    }
    extern "C" fn run<F: Fn(Range<usize>) + Sync>(ctx: *mut c_void, begin: i64, end: i64) {
        // SAFETY: `ctx` is the `Ctx<F>` below, alive until `rw_parallel_for` returns; it is
        // only read (the mutex guards the one write).
        let ctx = unsafe { &*(ctx as *const Ctx<'_, F>) };
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| (ctx.f)(begin as usize..end as usize))) {
            *ctx.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
    }
    if n <= grain {
        return f(0..n);
    }
    let ctx = Ctx {
        f: &f,
        panic: Mutex::new(None),
    };
    // SAFETY: the shim calls `run::<F>` with `ctx` on ranges covering `0..n` and returns
    // after every call has; `F: Sync` lets those calls share `f` across threads.
    unsafe {
        rw_parallel_for(
            n as i64,
            grain as i64,
            run::<F>,
            &ctx as *const Ctx<'_, F> as *mut c_void,
        )
    };
    if let Some(p) = ctx.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(p);
    }
}

/// A pointer to memory that parallel tasks write in disjoint parts.
#[derive(Clone, Copy)]
struct Disjoint(*mut f32);
// SAFETY: each task writes only its own part (the users below say which), so sharing the
// pointer between threads makes no data race.
unsafe impl Sync for Disjoint {}

impl Disjoint {
    /// `len` values from `at`, for the one task that writes them.
    ///
    /// # Safety
    /// `at + len` lies inside the memory, and no other task touches those values while the
    /// slice lives.
    unsafe fn part<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: the caller's contract above.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

/// An element type the loops read from tensors, and the libtorch kind that holds it
/// (bfloat16 as its raw 16 bits).
trait Element: Copy {
    const KIND: Kind;
}

impl Element for f32 {
    const KIND: Kind = Kind::Float;
}

impl Element for u16 {
    const KIND: Kind = Kind::BFloat16;
}

impl Element for i64 {
    const KIND: Kind = Kind::Int64;
}

/// A contiguous CPU tensor's elements.
fn elements<T: Element>(t: &Tensor) -> &[T] {
    check(t, T::KIND);
    // SAFETY: `t` is a contiguous CPU tensor of `T`'s kind (checked), so `numel` values of
    // `T` start at its data pointer and live as long as the borrow of `t`.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel()) }
}

/// As [`elements`], writable. Callers pass tensors they made and hold alone (no view of
/// the same storage is read while the slice lives).
fn elements_mut<T: Element>(t: &mut Tensor) -> &mut [T] {
    check(t, T::KIND);
    // SAFETY: as in `elements`; the exclusive borrow of `t` and the callers' rule above
    // keep the slice the only access to that memory while it lives.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel()) }
}

fn f32s(t: &Tensor) -> &[f32] {
    elements(t)
}

fn f32s_mut(t: &mut Tensor) -> &mut [f32] {
    elements_mut(t)
}

/// The layout these loops assume; a violation is a bug in the caller, not bad input.
fn check(t: &Tensor, kind: Kind) {
    assert!(
        t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous(),
        "kernels take contiguous {kind:?} CPU tensors, not {:?} {:?} (contiguous: {})",
        t.kind(),
        t.device(),
        t.is_contiguous()
    );
}

/// Whether a tensor can take the loops here (else libtorch's operators).
pub fn on_host(t: &Tensor) -> bool {
    t.device() == Device::Cpu
}

/// Runs `$body` (a block of `#[inline(always)]` helpers' calls, returning nothing) compiled
/// for AVX2 with FMA when the CPU has them, for the baseline otherwise. The closure is
/// inlined into the AVX2 function (its one caller), so its loops get those instructions.
macro_rules! dispatch {
    ($body:block) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            fn fast(f: impl FnOnce()) {
                f()
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                unsafe { fast(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}

const LANES: usize = 8;

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out += p · v`.
#[inline(always)]
fn axpy(out: &mut [f32], p: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o = p.mul_add(*x, *o);
    }
}

#[inline(always)]
fn bf16_to_f32(v: u16) -> f32 {
    f32::from_bits(u32::from(v) << 16)
}

/// Round to nearest even, as libtorch's conversion does (no NaN reaches a cache).
#[inline(always)]
fn f32_to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// `x / rms(x) · weight` of each `[hidden]` row of a `[rows, hidden]` `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let mut out = x.empty_like();
    let (xs, w) = (f32s(x), f32s(weight));
    let hidden = w.len();
    let eps = eps as f32;
    dispatch!({
        for (row, o) in xs
            .chunks_exact(hidden)
            .zip(f32s_mut(&mut out).chunks_exact_mut(hidden))
        {
            let inv = 1.0 / (dot(row, row) / hidden as f32 + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(row).zip(w) {
                *o = x * inv * w;
            }
        }
    });
    out
}

/// Rotates adjacent pairs `(2i, 2i + 1)` of the first `heads` heads of each row of a
/// `[tokens, ≥ heads · d]` `qkv` in place, by its token's angles: `cos` and `sin` are
/// `[positions, d / 2]`.
pub fn rope(qkv: &mut Tensor, positions: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) {
    let width = qkv.size()[1] as usize;
    let half = cos.size()[1] as usize;
    let (pos, cos, sin) = (elements::<i64>(positions), f32s(cos), f32s(sin));
    let rows = f32s_mut(qkv);
    dispatch!({
        for (row, &p) in rows.chunks_exact_mut(width).zip(pos) {
            let p = p as usize;
            let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
            for head in row[..heads * 2 * half].chunks_exact_mut(2 * half) {
                for ((pair, c), s) in head.chunks_exact_mut(2).zip(c).zip(s) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        }
    });
}

/// `silu(gate) · up` of a `[rows, 2 · ffn]` product holding gate then up: `[rows, ffn]`.
pub fn silu_mul(gate_up: &Tensor, ffn: i64) -> Tensor {
    let rows = gate_up.size()[0];
    let mut out = Tensor::empty([rows, ffn], (Kind::Float, Device::Cpu));
    let f = ffn as usize;
    let gu = f32s(gate_up);
    dispatch!({
        for (row, o) in gu.chunks_exact(2 * f).zip(f32s_mut(&mut out).chunks_exact_mut(f)) {
            let (gate, up) = row.split_at(f);
            for ((o, g), u) in o.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
    });
    out
}

/// The cache's storage of one layer, `[rows, kv heads, d]`.
pub enum CacheRows<'a> {
    F32(&'a [f32]),
    BF16(&'a [u16]),
}

impl<'a> CacheRows<'a> {
    pub fn of(t: &'a Tensor) -> Self {
        match t.kind() {
            Kind::BFloat16 => CacheRows::BF16(elements(t)),
            _ => CacheRows::F32(f32s(t)),
        }
    }

    /// `len` values from `at`, as float32 into `buf`.
    #[inline(always)]
    fn read<'b>(&'b self, at: usize, len: usize, buf: &'b mut [f32]) -> &'b [f32] {
        match self {
            CacheRows::F32(v) => &v[at..at + len],
            CacheRows::BF16(v) => {
                for (b, x) in buf.iter_mut().zip(&v[at..at + len]) {
                    *b = bf16_to_f32(*x);
                }
                &buf[..len]
            }
        }
    }
}

/// Stores rows of `src` (`[tokens, width]`, the step's QKV product; each row's
/// `width_of_kv` values from `from`) at cache rows `rows` of `cache` (`[rows, width_of_kv]`).
pub fn write_rows(cache: &mut Tensor, rows: &Tensor, src: &Tensor, from: usize, width_of_kv: usize) {
    let width = src.size()[1] as usize;
    let (rows, src) = (elements::<i64>(rows), f32s(src));
    let take = |t: usize| &src[t * width + from..][..width_of_kv];
    match cache.kind() {
        Kind::BFloat16 => {
            let dst = elements_mut::<u16>(cache);
            for (t, &r) in rows.iter().enumerate() {
                let d = &mut dst[r as usize * width_of_kv..][..width_of_kv];
                for (d, s) in d.iter_mut().zip(take(t)) {
                    *d = f32_to_bf16(*s);
                }
            }
        }
        _ => {
            let dst = f32s_mut(cache);
            for (t, &r) in rows.iter().enumerate() {
                dst[r as usize * width_of_kv..][..width_of_kv].copy_from_slice(take(t));
            }
        }
    }
}

/// The shape of a decoder's attention on one rank.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
}

/// One decoding sequence: its query token's index in the step, and its context's cache rows
/// (the new token's own row last).
pub struct Decode<'a> {
    pub token: usize,
    pub rows: &'a [i64],
}

/// Each decoding sequence's one query (in `qkv`'s first `heads · d` columns of its token's
/// row) against its keys and values where the cache holds them; the result goes to its
/// token's row of `out` (`[tokens, heads · d]`). Query heads `g · rep ..` share KV head `g`.
/// Sequences and KV heads are shared out over libtorch's threads once there is enough work.
pub fn decode_attention(
    qkv: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    decodes: &[Decode<'_>],
    shape: Heads,
    out: &mut Tensor,
) {
    let Heads { heads, kv_heads, d } = shape;
    let rep = heads / kv_heads;
    let width = qkv.size()[1] as usize;
    let (q, k, v) = (f32s(qkv), CacheRows::of(keys), CacheRows::of(values));
    let out_len = out.numel();
    let dst = Disjoint(f32s_mut(out).as_mut_ptr());
    let for_head = |item: usize, scores: &mut Vec<f32>, buf: &mut [f32]| {
        let (s, g) = (&decodes[item / kv_heads], item % kv_heads);
        let at = s.token * heads * d + g * rep * d;
        assert!(at + rep * d <= out_len, "a decode's token is outside the step");
        // SAFETY: item (sequence, KV head g) alone writes its token's query heads of
        // group g, `rep · d` values inside `out` (asserted); no two items share both.
        let o = unsafe { dst.part(at, rep * d) };
        let query = &q[s.token * width + g * rep * d..][..rep * d];
        scores.resize(rep * s.rows.len(), 0.0);
        dispatch!({ attend_group(query, s.rows, (&k, &v), (g, kv_heads, d), scores, buf, o) });
    };
    let items = decodes.len() * kv_heads;
    let work: usize = decodes.iter().map(|s| s.rows.len()).sum::<usize>() * kv_heads;
    // About 50 µs of work per range before a second thread is worth waking.
    let grain = if work < 4096 { items } else { 1 };
    parallel_for(items, grain, |range| {
        let (mut scores, mut buf) = (Vec::new(), vec![0f32; d]);
        for item in range {
            for_head(item, &mut scores, &mut buf);
        }
    });
}

/// One KV head's `rep` query heads (`query`, `[rep · d]`) over a sequence's cache rows,
/// into `o` (`[rep · d]`).
#[inline(always)]
fn attend_group(
    query: &[f32],
    rows: &[i64],
    (k, v): (&CacheRows<'_>, &CacheRows<'_>),
    (g, kv_heads, d): (usize, usize, usize),
    scores: &mut [f32],
    buf: &mut [f32],
    o: &mut [f32],
) {
    let c = rows.len();
    let rep = query.len() / d;
    let scale = 1.0 / (d as f32).sqrt();
    for (j, &row) in rows.iter().enumerate() {
        let key = k.read((row as usize * kv_heads + g) * d, d, buf);
        for r in 0..rep {
            scores[r * c + j] = dot(&query[r * d..][..d], key) * scale;
        }
    }
    for r in 0..rep {
        let sc = &mut scores[r * c..][..c];
        let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0.0;
        for x in sc.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        sc.iter_mut().for_each(|x| *x *= inv);
    }
    o.fill(0.0);
    for (j, &row) in rows.iter().enumerate() {
        let value = v.read((row as usize * kv_heads + g) * d, d, buf);
        for r in 0..rep {
            axpy(&mut o[r * d..][..d], scores[r * c + j], value);
        }
    }
}

/// Each row of a `[rows, in]` `x` moved and scaled onto `[-1, 1]`: `x = mid + half · u`.
/// Returns `u` and each row's `(mid, half)`.
pub fn span_rows(x: &Tensor) -> (Tensor, Vec<(f32, f32)>) {
    let cols = x.size()[1] as usize;
    let mut u = x.empty_like();
    let xs = f32s(x);
    let mut spans = Vec::with_capacity(x.size()[0] as usize);
    dispatch!({
        for (row, out) in xs.chunks_exact(cols).zip(f32s_mut(&mut u).chunks_exact_mut(cols)) {
            let (lo, hi) = row
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            let mid = (hi + lo) * 0.5;
            let half = ((hi - lo) * 0.5).max(f32::MIN_POSITIVE);
            let inv = 1.0 / half;
            for (o, v) in out.iter_mut().zip(row) {
                *o = (v - mid) * inv;
            }
            spans.push((mid, half));
        }
    });
    (u, spans)
}

/// Undoes [`span_rows`] on a product in place: `y = half · y + mid · row_sums` per row,
/// `row_sums` being `[out]`, each output's sum of weights.
pub fn unspan_rows(y: &mut Tensor, spans: &[(f32, f32)], row_sums: &Tensor) {
    let sums = f32s(row_sums);
    let cols = sums.len();
    let ys = f32s_mut(y);
    dispatch!({
        for (row, &(mid, half)) in ys.chunks_exact_mut(cols).zip(spans) {
            for (y, s) in row.iter_mut().zip(sums) {
                *y = half.mul_add(*y, mid * s);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn norm_and_activation_match_libtorch() {
        tch::manual_seed(3);
        let x = Tensor::randn([5, 67], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([67], (Kind::Float, Device::Cpu));
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let want = &x * (var + 1e-5).rsqrt() * &w;
        assert!(close(&rms_norm(&x, &w, 1e-5), &want) < 1e-5);

        let gu = Tensor::randn([3, 2 * 37], (Kind::Float, Device::Cpu));
        let want = gu.narrow(1, 0, 37).silu() * gu.narrow(1, 37, 37);
        assert!(close(&silu_mul(&gu, 37), &want) < 1e-5);
    }

    #[test]
    fn rope_rotates_only_the_heads_asked() {
        tch::manual_seed(4);
        let (d, half) = (8, 4);
        let qkv = Tensor::randn([2, 3 * d], (Kind::Float, Device::Cpu));
        let cos = Tensor::randn([10, half], (Kind::Float, Device::Cpu));
        let sin = Tensor::randn([10, half], (Kind::Float, Device::Cpu));
        let pos = Tensor::from_slice(&[7i64, 2]);
        let mut got = qkv.copy();
        rope(&mut got, &pos, &cos, &sin, 2);
        let pairs = qkv.narrow(1, 0, 2 * d).view([2, 2, half, 2]);
        let (a, b) = (pairs.select(3, 0), pairs.select(3, 1));
        let (c, s) = (
            cos.index_select(0, &pos).unsqueeze(1),
            sin.index_select(0, &pos).unsqueeze(1),
        );
        let want = Tensor::stack(&[&a * &c - &b * &s, &a * &s + &b * &c], 3).view([2, 2 * d]);
        assert!(close(&got.narrow(1, 0, 2 * d), &want) < 1e-5);
        assert_eq!(close(&got.narrow(1, 2 * d, d), &qkv.narrow(1, 2 * d, d)), 0.0);
    }

    /// Attention read in place from scattered cache rows equals libtorch's over a gathered
    /// copy, for float32 and bfloat16 caches.
    #[test]
    fn decode_attention_matches_a_gathered_softmax() {
        tch::manual_seed(5);
        let shape = Heads {
            heads: 6,
            kv_heads: 2,
            d: 16,
        };
        let (hd, kvd) = (6 * 16, 2 * 16);
        let qkv = Tensor::randn([2, hd + 2 * kvd], (Kind::Float, Device::Cpu));
        for kind in [Kind::Float, Kind::BFloat16] {
            let keys = Tensor::randn([40, 2, 16], (Kind::Float, Device::Cpu)).to_kind(kind);
            let values = Tensor::randn([40, 2, 16], (Kind::Float, Device::Cpu)).to_kind(kind);
            let rows: [Vec<i64>; 2] = [vec![3, 17, 5, 30, 9], vec![21, 22]];
            let decodes = [
                Decode {
                    token: 1,
                    rows: &rows[0],
                },
                Decode {
                    token: 0,
                    rows: &rows[1],
                },
            ];
            let mut out = Tensor::zeros([2, hd], (Kind::Float, Device::Cpu));
            decode_attention(&qkv, &keys, &values, &decodes, shape, &mut out);
            for s in &decodes {
                let r = Tensor::from_slice(s.rows);
                let k = keys.index_select(0, &r).to_kind(Kind::Float).permute([1, 0, 2]);
                let v = values.index_select(0, &r).to_kind(Kind::Float).permute([1, 0, 2]);
                let q = qkv.get(s.token as i64).narrow(0, 0, hd).view([2, 3, 16]);
                let att = (q.matmul(&k.transpose(-1, -2)) / 4.0)
                    .softmax(-1, Kind::Float)
                    .matmul(&v);
                let diff = close(&out.get(s.token as i64), &att.view([-1]));
                assert!(diff < 1e-4, "{kind:?}: off by {diff}");
            }
        }
    }

    #[test]
    fn cache_rows_are_written_where_asked() {
        let src = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([2, 6]);
        let rows = Tensor::from_slice(&[3i64, 0]);
        for kind in [Kind::Float, Kind::BFloat16] {
            let mut cache = Tensor::zeros([4, 2], (kind, Device::Cpu));
            write_rows(&mut cache, &rows, &src, 2, 2);
            let got = Vec::<f32>::try_from(cache.to_kind(Kind::Float).view([-1])).unwrap();
            assert_eq!(got, [8.0, 9.0, 0.0, 0.0, 0.0, 0.0, 2.0, 3.0], "{kind:?}");
        }
    }

    #[test]
    fn spans_undo_to_the_same_product() {
        tch::manual_seed(6);
        let x = Tensor::randn([3, 20], (Kind::Float, Device::Cpu)) * 5.0 + 2.0;
        let w = Tensor::randn([7, 20], (Kind::Float, Device::Cpu));
        let (u, spans) = span_rows(&x);
        let hi = u.abs().amax(1, false);
        assert!(close(&hi, &Tensor::ones([3], (Kind::Float, Device::Cpu))) < 1e-5);
        let mut y = u.mm(&w.tr());
        unspan_rows(&mut y, &spans, &w.sum_dim_intlist(1, false, Kind::Float));
        assert!(close(&y, &x.mm(&w.tr())) < 1e-3);
    }
}
