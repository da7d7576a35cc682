// The CPU kernel of pykd::scale_grads_ on one flat run of elements, compiled once per CPU
// capability (scale_grads_default.cpp and scale_grads_avx2.cpp include scale_grads_kernel.h) and
// chosen at run time in scale_grads_cpu.cpp, which splits the gradients into runs and runs them in
// parallel.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace pykd::cpu {

#define PYKD_DECLARE_SCALE_KERNELS(capability)                                           \
  namespace capability {                                                                 \
  /* data[i] *= scale for n elements, in the accumulation type (float for 16-bit types) */ \
  void scale_in_place(c10::ScalarType dtype, void* data, int64_t n, double scale);       \
  }

PYKD_DECLARE_SCALE_KERNELS(DEFAULT)
PYKD_DECLARE_SCALE_KERNELS(AVX2)
PYKD_DECLARE_SCALE_KERNELS(AVX512)
#undef PYKD_DECLARE_SCALE_KERNELS

}  // namespace pykd::cpu
