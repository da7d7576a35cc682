// The CPU KD-loss kernel, compiled once per CPU capability (kd_loss_default.cpp and
// kd_loss_avx2.cpp include kd_loss_kernel.h) and chosen at run time in kd_loss_cpu.cpp.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace pykd::cpu {

// Rows of `cols` logits; row r of the student starts at student + r * student_stride (elements).
// Gradients are contiguous [rows, cols] in their logits' dtype, or null when not wanted. row_loss
// receives each row's loss (soft_weight * T^2 * divergence + hard_weight * cross-entropy, 0 for a
// masked row) in the accumulation type (double for double logits, float otherwise).
struct KdKernelArgs {
  c10::ScalarType student_dtype, teacher_dtype;
  const void* student;
  const void* teacher;
  int64_t rows, cols, student_stride, teacher_stride;
  const int64_t* labels;  // [rows], or null: every row valid
  int64_t ignore_index;
  double temperature, beta, soft_weight, hard_weight;
  double inv_denominator;  // 1 / D: the gradients are those of sum(row_loss) / D
  void* row_loss;
  void* grad_student;
  void* grad_teacher;
};

#define PYKD_DECLARE_KD_KERNELS(capability)   \
  namespace capability {                      \
  void kd_loss_rows(const KdKernelArgs& args); \
  }

PYKD_DECLARE_KD_KERNELS(DEFAULT)
PYKD_DECLARE_KD_KERNELS(AVX2)
PYKD_DECLARE_KD_KERNELS(AVX512)
#undef PYKD_DECLARE_KD_KERNELS

}  // namespace pykd::cpu
