// The CPU hint-loss kernel on one chunk of one pair, compiled once per CPU capability
// (hint_loss_default.cpp and hint_loss_avx2.cpp include hint_loss_kernel.h) and chosen at run time
// in hint_loss_cpu.cpp, which also splits the pairs into chunks and runs them in parallel.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace pykd::cpu {

#define PYKD_DECLARE_HINT_KERNELS(capability)                                             \
  namespace capability {                                                                  \
  /* Returns sum((s - t)^2) over n elements, accumulated in float (double for double      \
     features), and writes grad_s = scale * (s - t), grad_t = -grad_s in the same pass; a  \
     null output is not written (both null: the forward-only kernel). */                  \
  double hint_chunk(                                                                      \
      c10::ScalarType dtype, const void* s, const void* t, int64_t n, double scale,       \
      void* grad_s, void* grad_t);                                                        \
  }

PYKD_DECLARE_HINT_KERNELS(DEFAULT)
PYKD_DECLARE_HINT_KERNELS(AVX2)
PYKD_DECLARE_HINT_KERNELS(AVX512)
#undef PYKD_DECLARE_HINT_KERNELS

}  // namespace pykd::cpu
