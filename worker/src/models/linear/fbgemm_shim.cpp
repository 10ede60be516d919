// A C ABI over fbgemm's int8 and float16 GEMMs as libtorch ships them (ATen's
// fbgemm_linear_int8_weight_fp32_activation and fbgemm_pack_quantized_matrix;
// fbgemm_linear_fp16_weight_fp32_activation and fbgemm_pack_gemm_matrix_fp16). int8:
// float32 activations quantized to uint8 per call, int8 weights prepacked once, int32
// accumulation, float32 out. ATen quantizes a weight with one scale for the whole
// matrix; the worker quantizes each output row with its own scale instead (in Rust,
// `linear::Int8`), passes weight scale 1 and zero point 0, and scales each output column
// here: the same product with per-channel weights. Tensors are the at::Tensor* that
// tch's Tensor::as_ptr() gives; results are new at::Tensor* that tch takes over.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "../../shim_error.hpp"

namespace {

// ATen marks these operators deprecated with a one-time warning on stderr; the worker
// calls them deliberately, so the warning is dropped rather than printed into its logs.
struct Quiet : c10::WarningHandler {
  void process(const c10::Warning&) override {}
};
Quiet quiet;

// Runs `f` (which makes a tensor) with the warning dropped; a new at::Tensor, or null
// with the message in `err`.
template <typename F>
at::Tensor* new_tensor(char** err, F&& f) {
  at::Tensor* out = nullptr;
  rankway::guarded(err, [&] {
    c10::WarningUtils::WarningHandlerGuard guard(&quiet);
    out = new at::Tensor(f());
  });
  return out;
}

}  // namespace

extern "C" {

// Prepacks a contiguous `[out, in]` int8 matrix into fbgemm's blocked layout.
at::Tensor* rw_int8_pack(const at::Tensor* weight, char** err) {
  return new_tensor(err, [&] { return at::fbgemm_pack_quantized_matrix(weight->contiguous()); });
}

// `x [rows, in]` float32 times the packed `[out, in]` int8 matrix, transposed, each
// output column multiplied by its row's scale: `[rows, out]` float32. `shape` is any
// tensor of the weight's shape (ATen reads only its sizes), `col_offsets` each row's sum
// of int8 values (int32), `zeros` an `[out]` float32 bias of zeros.
at::Tensor* rw_int8_linear(const at::Tensor* x, const at::Tensor* shape,
                           const at::Tensor* packed, const at::Tensor* col_offsets,
                           const at::Tensor* scales, const at::Tensor* zeros,
                           char** err) {
  return new_tensor(err, [&] {
    at::Tensor y = at::fbgemm_linear_int8_weight_fp32_activation(
        x->contiguous(), *shape, *packed, *col_offsets, 1.0, 0, *zeros);
    return y.mul_(*scales);
  });
}

// Packs a contiguous `[out, in]` float32 matrix as float16 for fbgemm's FP16 GEMM.
at::Tensor* rw_fp16_pack(const at::Tensor* weight, char** err) {
  return new_tensor(err, [&] { return at::fbgemm_pack_gemm_matrix_fp16(weight->contiguous()); });
}

// `x [rows, in]` float32 times the packed float16 `[out, in]` matrix, transposed, plus
// `zeros` (an `[out]` float32 bias): `[rows, out]` float32, accumulated in float32.
at::Tensor* rw_fp16_linear(const at::Tensor* x, const at::Tensor* packed,
                           const at::Tensor* zeros, char** err) {
  return new_tensor(err, [&] {
    return at::fbgemm_linear_fp16_weight_fp32_activation(x->contiguous(), *packed, *zeros);
  });
}

}  // extern "C"
