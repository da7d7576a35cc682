// The accumulation type's math for the CUDA row kernels (kd_loss_rows.cuh and the kernels built
// on it, sparse_kd_loss_cuda.cu): float or double overloads of the functions they call, the
// NaN-keeping maximum and the exponent reference of a running maximum.
#pragma once

#include <cmath>
#include <limits>

namespace pykd::cuda {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

__host__ __device__ __forceinline__ float log_acc(float x) {
  return ::logf(x);
}
__host__ __device__ __forceinline__ double log_acc(double x) {
  return ::log(x);
}
__device__ __forceinline__ float exp2_acc(float x) {
  return ::exp2f(x);
}
__device__ __forceinline__ double exp2_acc(double x) {
  return ::exp2(x);
}
__device__ __forceinline__ float log2_acc(float x) {
  return ::log2f(x);
}
__device__ __forceinline__ double log2_acc(double x) {
  return ::log2(x);
}
__device__ __forceinline__ float exp_acc(float x) {
  return ::expf(x);
}
__device__ __forceinline__ double exp_acc(double x) {
  return ::exp(x);
}
__device__ __forceinline__ float fma_acc(float a, float b, float c) {
  return ::fmaf(a, b, c);
}
__device__ __forceinline__ double fma_acc(double a, double b, double c) {
  return ::fma(a, b, c);
}

// A maximum that keeps NaN (from either side), so that a NaN logit makes its row NaN.
template <typename acc_t>
__host__ __device__ __forceinline__ acc_t max_nan(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// The exponent reference of a running maximum m: m * scale, or 0 while m is -inf (the sums are 0
// then, and a very negative first maximum never makes exp2(-shift) overflow).
template <typename acc_t>
__device__ __forceinline__ acc_t reference(acc_t max, acc_t scale) {
  return max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : max * scale;
}

}  // namespace pykd::cuda
