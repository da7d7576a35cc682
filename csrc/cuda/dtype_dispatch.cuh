// The dtype-pair dispatch of the CUDA row losses (kd_loss_rows.cuh and the drivers
// kd_loss_cuda.cu, multi_teacher_kd_loss_cuda.cu, sparse_kd_loss_cuda.cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace pykd::cuda {

template <typename F>
void dispatch_reduced(at::ScalarType dtype, const char* op, const F& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(at::Half{});
    case at::kBFloat16:
      return f(at::BFloat16{});
    default:
      TORCH_INTERNAL_ASSERT(false, op, ": unexpected dtype ", dtype);
  }
}

// Calls f(first{}, second{}) for a pair of dtypes that the op has checked: any pair of
// float16 / bfloat16 / float32, or float64 with float64. `op` names the caller in an internal
// error.
template <typename F>
void dispatch_dtype_pair(at::ScalarType first, at::ScalarType second, const char* op,
                         const F& f) {
  if (first == at::kDouble) {
    TORCH_INTERNAL_ASSERT(second == at::kDouble, op, ": float64 with ", second);
    return f(double{}, double{});
  }
  dispatch_reduced(first, op, [&](auto a) {
    dispatch_reduced(second, op, [&](auto b) { f(a, b); });
  });
}

}  // namespace pykd::cuda
