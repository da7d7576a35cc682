// The CPU sparse-teacher KD kernel, compiled once per CPU capability
// (sparse_kd_loss_default.cpp and sparse_kd_loss_avx2.cpp include sparse_kd_loss_kernel.h) and
// chosen at run time in sparse_kd_loss_cpu.cpp. The math is csrc/sparse_kd_loss.h's.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace pykd::cpu {

// Row r of the student starts at student + r * student_stride, its K teacher entries at
// values + r * values_stride and indices + r * indices_stride (elements). grad_student is
// contiguous [rows, cols] in the student's dtype, or null. row_loss receives each row's loss (0
// for a masked row) in the accumulation type (double for double logits, float otherwise).
// An index outside [0, cols) in a valid row raises a ValueError naming teacher_indices.
struct SparseKdKernelArgs {
  c10::ScalarType student_dtype, values_dtype, indices_dtype;
  const void* student;
  const void* values;
  const void* indices;
  const void* lse;  // [rows] in the accumulation type, or null: the top-k is renormalised
  int64_t rows, cols, k, student_stride, values_stride, indices_stride;
  const int64_t* labels;  // [rows], or null: every row valid
  int64_t ignore_index;
  double temperature;
  double inv_denominator;  // 1 / D: the gradient is that of sum(row_loss) / D
  void* row_loss;
  void* grad_student;
};

#define PYKD_DECLARE_SPARSE_KD_KERNELS(capability)         \
  namespace capability {                                   \
  void sparse_kd_loss_rows(const SparseKdKernelArgs& args); \
  }

PYKD_DECLARE_SPARSE_KD_KERNELS(DEFAULT)
PYKD_DECLARE_SPARSE_KD_KERNELS(AVX2)
PYKD_DECLARE_SPARSE_KD_KERNELS(AVX512)
#undef PYKD_DECLARE_SPARSE_KD_KERNELS

}  // namespace pykd::cpu
