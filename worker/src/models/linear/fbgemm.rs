//! Matrices prepacked for fbgemm, the CPU GEMM library inside libtorch (through
//! `fbgemm_shim.cpp`); AVX2 kernels, with AVX-512 and VNNI where the CPU has them.
//!
//! - [`Int8`]: each output row of a `[out, in]` matrix quantized symmetrically with its
//!   own scale. ATen's kernel quantizes a product's float32 input to uint8 with one scale
//!   and zero point for the whole call, from its range; here each input row is first
//!   shifted and scaled onto `[-1, 1]` (and the product corrected back), so that range is
//!   always `[-1, 1]`: each row is quantized on its own scale, and a row's result does
//!   not depend on the other rows of the batch. (It halved the first-step logit error
//!   against the reference, measured.) int32 accumulation, float32 out. Weights use 7
//!   bits (`±63`): fbgemm's AVX2 kernel adds pairs of uint8 × int8 products in int16
//!   (`vpmaddubsw`), which saturates above 32767; `255 × 63 × 2` cannot. (CPUs with
//!   AVX512-VNNI accumulate in int32 directly; every CPU gets the same numerics.)
//! - [`Float16`]: the matrix rounded to float16, multiplied with float32 inputs and
//!   float32 accumulation.
#![allow(unsafe_code)]

use std::ffi::c_char;

use tch::{Kind, TchError, Tensor};
use torch_sys::C_tensor;

use crate::models::kernels;
use crate::shim::take_message;

unsafe extern "C" {
    fn rw_int8_pack(weight: *const C_tensor, err: *mut *mut c_char) -> *mut C_tensor;
    fn rw_int8_linear(
        x: *const C_tensor,
        shape: *const C_tensor,
        packed: *const C_tensor,
        col_offsets: *const C_tensor,
        scales: *const C_tensor,
        zeros: *const C_tensor,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
    fn rw_fp16_pack(weight: *const C_tensor, err: *mut *mut c_char) -> *mut C_tensor;
    fn rw_fp16_linear(
        x: *const C_tensor,
        packed: *const C_tensor,
        zeros: *const C_tensor,
        err: *mut *mut c_char,
    ) -> *mut C_tensor;
}

/// Runs one shim call that returns a new tensor or null with a message in `err`.
fn call(op: &str, f: impl FnOnce(*mut *mut c_char) -> *mut C_tensor) -> Result<Tensor, TchError> {
    let mut err = std::ptr::null_mut();
    let out = f(&mut err);
    if out.is_null() {
        return Err(TchError::Torch(format!("{op}: {}", take_message(err))));
    }
    // SAFETY: a non-null result is a new at::Tensor from the shim, taken over exactly once.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Largest magnitude of a quantized weight (see the module doc).
const LEVELS: f64 = 63.0;

/// A `[out, in]` matrix as int8 rows with a float32 scale each, packed for fbgemm.
pub struct Int8 {
    /// fbgemm's packed copy, owned by an opaque tensor.
    packed: Tensor,
    /// `[out, in]` without memory (one element, expanded): ATen reads only the weight's
    /// sizes and multiplies the packed copy.
    shape: Tensor,
    /// Each row's sum of int8 values, int32: fbgemm's correction for the input's zero point.
    col_offsets: Tensor,
    /// `[out]` float32: each row's scale.
    scales: Tensor,
    /// `[out]` float32 zeros: ATen's bias argument.
    zeros: Tensor,
    /// `[out]` float32: each row's sum of its quantized weights, the product of an input
    /// row of ones.
    row_sums: Tensor,
}

impl Int8 {
    /// Quantizes a float32 `[out, in]` matrix on the CPU; also returns the int8 values,
    /// for a caller that reads rows of them (the tied embedding). The packed copy is all
    /// a product needs.
    pub fn quantize(w: &Tensor) -> Result<(Self, Tensor), TchError> {
        let w = w.to_kind(Kind::Float).contiguous();
        let scales = (w.abs().amax(1, false) / LEVELS).clamp_min(f64::from(f32::MIN_POSITIVE));
        let q = (&w / scales.unsqueeze(1))
            .round()
            .clamp(-LEVELS, LEVELS)
            .to_kind(Kind::Int8);
        // SAFETY: `q` outlives the call, which only reads it.
        let packed = call("int8 pack", |err| unsafe { rw_int8_pack(q.as_ptr(), err) })?;
        let matrix = Self {
            packed,
            shape: Tensor::zeros([1, 1], (Kind::Int8, w.device())).expand(q.size(), false),
            col_offsets: q.sum_dim_intlist(1, false, Kind::Int).contiguous(),
            zeros: Tensor::zeros([w.size()[0]], (Kind::Float, w.device())),
            row_sums: q.to_kind(Kind::Float).sum_dim_intlist(1, false, Kind::Float) * &scales,
            scales,
        };
        Ok((matrix, q))
    }

    /// `[out]` float32: the scale of each row's int8 values.
    pub fn scales(&self) -> &Tensor {
        &self.scales
    }

    /// `x · wᵀ` for a float32 `[rows, in]` `x`: `[rows, out]` float32.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor, TchError> {
        // x = mid + half · u, every row of u spanning [-1, 1]: x·wᵀ = half · (u·wᵀ) + mid · Σw.
        let (u, spans) = kernels::span_rows(&x.contiguous());
        let mut y = self.product(&u)?;
        kernels::unspan_rows(&mut y, &spans, &self.row_sums);
        Ok(y)
    }

    /// ATen's product as it is: the input quantized with one scale for the call.
    fn product(&self, x: &Tensor) -> Result<Tensor, TchError> {
        // SAFETY: every pointer is a tensor that outlives the call, which only reads them.
        call("int8 linear", |err| unsafe {
            rw_int8_linear(
                x.as_ptr(),
                self.shape.as_ptr(),
                self.packed.as_ptr(),
                self.col_offsets.as_ptr(),
                self.scales.as_ptr(),
                self.zeros.as_ptr(),
                err,
            )
        })
    }
}

/// A `[out, in]` matrix as float16, packed for fbgemm.
pub struct Float16 {
    packed: Tensor,
    /// `[out]` float32 zeros: ATen's bias argument.
    zeros: Tensor,
}

impl Float16 {
    /// Packs a float32 `[out, in]` matrix on the CPU.
    pub fn pack(w: &Tensor) -> Result<Self, TchError> {
        let w = w.to_kind(Kind::Float).contiguous();
        // SAFETY: `w` outlives the call, which only reads it.
        let packed = call("float16 pack", |err| unsafe { rw_fp16_pack(w.as_ptr(), err) })?;
        Ok(Self {
            packed,
            zeros: Tensor::zeros([w.size()[0]], (Kind::Float, w.device())),
        })
    }

    /// `x · wᵀ` for a float32 `[rows, in]` `x`: `[rows, out]` float32.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor, TchError> {
        // SAFETY: every pointer is a tensor that outlives the call, which only reads them.
        call("float16 linear", |err| unsafe {
            rw_fp16_linear(x.as_ptr(), self.packed.as_ptr(), self.zeros.as_ptr(), err)
        })
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
        ((got - want).norm() / want.norm()).double_value(&[])
    }

    /// Products agree with float32's within what the rounding allows: int8 by about
    /// 1/(2·63) of each row's largest weight, float16 by its 11-bit mantissa.
    #[test]
    fn packed_products_match_float32() {
        tch::manual_seed(0);
        let w = Tensor::randn([96, 128], (Kind::Float, Device::Cpu));
        for rows in [1, 5, 32] {
            let x = Tensor::randn([rows, 128], (Kind::Float, Device::Cpu));
            let want = x.mm(&w.tr());
            let int8 = Int8::quantize(&w).unwrap().0.apply(&x).unwrap();
            let f16 = Float16::pack(&w).unwrap().apply(&x).unwrap();
            assert_eq!(int8.size(), [rows, 96]);
            let (e8, e16) = (relative_error(&int8, &want), relative_error(&f16, &want));
            assert!(e8 < 0.03, "int8 at {rows} rows: relative error {e8}");
            assert!(e16 < 0.001, "float16 at {rows} rows: relative error {e16}");
        }
    }

    /// The int8 values times their row's scale give the matrix back within half a step.
    #[test]
    fn int8_values_and_scales_reconstruct_the_rows() {
        tch::manual_seed(1);
        let w = Tensor::randn([16, 64], (Kind::Float, Device::Cpu));
        let (m, q) = Int8::quantize(&w).unwrap();
        assert_eq!(q.kind(), Kind::Int8);
        assert!(q.abs().max().int64_value(&[]) <= LEVELS as i64);
        let back = q.to_kind(Kind::Float) * m.scales().unsqueeze(1);
        let step = m.scales().unsqueeze(1);
        let worst = ((&back - &w).abs() - &step * 0.5001).max().double_value(&[]);
        assert!(
            worst <= 0.0,
            "a value is off by more than half its row's step: {worst}"
        );
    }

    /// A row's int8 product is the same whatever other rows share the call.
    #[test]
    fn an_int8_row_does_not_depend_on_its_batch() {
        tch::manual_seed(2);
        let w = Tensor::randn([32, 64], (Kind::Float, Device::Cpu));
        let (m, _) = Int8::quantize(&w).unwrap();
        let x = Tensor::randn([1, 64], (Kind::Float, Device::Cpu));
        let loud = Tensor::randn([3, 64], (Kind::Float, Device::Cpu)) * 100.0;
        let alone = m.apply(&x).unwrap();
        let batched = m
            .apply(&Tensor::cat(&[&loud, &x], 0))
            .unwrap()
            .get(3)
            .unsqueeze(0);
        let diff = (alone - batched).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "the row moved by {diff} beside louder rows");
    }

    #[test]
    fn a_wrong_shape_is_an_error_not_an_abort() {
        let w = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 15], (Kind::Float, Device::Cpu));
        assert!(Int8::quantize(&w).unwrap().0.apply(&x).is_err());
        assert!(Float16::pack(&w).unwrap().apply(&x).is_err());
    }
}
