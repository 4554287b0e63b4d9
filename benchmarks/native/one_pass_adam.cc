// Adam in one pass over memory, as an XLA FFI handler for the CPU: an experiment of
// benchmarks/one_pass.py, not part of kopt.
//
// XLA:CPU compiles a jitted Adam step to three loops (m, v, then the param reading the new m
// and v back), 40 bytes per float32 parameter; this loop reads the param, the gradient, m and
// v once and writes the param, m and v once: 28 bytes. The maths is Keras's (kopt.adam's):
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr_t m / (sqrt(v) + eps)
// with lr_t = lr sqrt(1 - b2^t) / (1 - b1^t) computed by the caller and passed in `hyper`
// (lr_t, b1, b2, eps) as run-time values. The work is split over the machine's cores.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

void Chunk(const float* hyper, const float* g, float* p, float* m, float* v, int64_t lo,
           int64_t hi) {
  const float lr_t = hyper[0], b1 = hyper[1], b2 = hyper[2], eps = hyper[3];
  const float c1 = 1.0f - b1, c2 = 1.0f - b2;
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const float gi = g[i];
    const float mi = b1 * m[i] + c1 * gi;
    const float vi = b2 * v[i] + c2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= lr_t * mi / (std::sqrt(vi) + eps);
  }
}

ffi::Error OnePassAdam(ffi::Buffer<ffi::F32> hyper, ffi::Buffer<ffi::F32> p_in,
                       ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> m_in,
                       ffi::Buffer<ffi::F32> v_in, ffi::ResultBuffer<ffi::F32> p_out,
                       ffi::ResultBuffer<ffi::F32> m_out, ffi::ResultBuffer<ffi::F32> v_out) {
  const int64_t n = p_in.element_count();
  if (g.element_count() != n || m_in.element_count() != n || v_in.element_count() != n) {
    return ffi::Error::InvalidArgument("one_pass_adam: p, g, m and v must have one size");
  }
  float* p = p_out->typed_data();
  float* m = m_out->typed_data();
  float* v = v_out->typed_data();
  // Donated inputs are aliased to the outputs (updated in place); others are copied first.
  if (p != p_in.typed_data()) std::copy_n(p_in.typed_data(), n, p);
  if (m != m_in.typed_data()) std::copy_n(m_in.typed_data(), n, m);
  if (v != v_in.typed_data()) std::copy_n(v_in.typed_data(), n, v);
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = n >= (int64_t{1} << 16) ? cores : 1;  // small: threads cost more
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> others;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t lo = t * chunk, hi = std::min(n, lo + chunk);
    if (lo < hi) others.emplace_back(Chunk, hyper.typed_data(), g.typed_data(), p, m, v, lo, hi);
  }
  Chunk(hyper.typed_data(), g.typed_data(), p, m, v, 0, std::min(n, chunk));
  for (auto& t : others) t.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KoptBenchOnePassAdam, OnePassAdam,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hyper: lr_t, b1, b2, eps
                                  .Arg<ffi::Buffer<ffi::F32>>()  // p
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // m
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Ret<ffi::Buffer<ffi::F32>>()  // new p
                                  .Ret<ffi::Buffer<ffi::F32>>()  // new m
                                  .Ret<ffi::Buffer<ffi::F32>>());  // new v
