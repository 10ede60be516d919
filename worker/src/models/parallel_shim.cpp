// at::parallel_for with a C ABI: the worker's host kernels (models/kernels.rs) split
// their loops over libtorch's own intra-op threads, the ones its operators use (and that
// spin between them), instead of a second pool competing for the same cores. The Rust
// callback never unwinds (it catches its panics), so no exception can come back here.
#include <ATen/Parallel.h>

#include <cstdint>

extern "C" {

void rw_parallel_for(int64_t n, int64_t grain, void (*f)(void*, int64_t, int64_t), void* ctx) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { f(ctx, begin, end); });
}

}  // extern "C"
