// The CPU multi-teacher KD-loss kernel, compiled once per CPU capability
// (multi_teacher_kd_loss_default.cpp and multi_teacher_kd_loss_avx2.cpp include
// multi_teacher_kd_loss_kernel.h) and chosen at run time in multi_teacher_kd_loss_cpu.cpp.
#pragma once

#include "multi_teacher_kd_loss.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace pykd::cpu {

// Rows of `cols` logits; row r of the student starts at student + r * student_stride (elements),
// row r of teacher k at teachers[k] + r * teacher_strides[k]. Gradients are contiguous
// [rows, cols] in their logits' dtype, or null when not wanted (the teachers' all or none).
// row_loss receives each row's loss (sum_k weights[k] * T^2 * KL_k, 0 for a masked row) in the
// accumulation type (double for double logits, float otherwise).
struct MultiTeacherKernelArgs {
  c10::ScalarType student_dtype, teacher_dtype;
  const void* student;
  int64_t student_stride;
  int64_t teacher_count;
  const void* teachers[kMaxTeachers];
  int64_t teacher_strides[kMaxTeachers];
  double weights[kMaxTeachers];
  int64_t rows, cols;
  const int64_t* labels;  // [rows], or null: every row valid
  int64_t ignore_index;
  double temperature;
  double inv_denominator;  // 1 / D: the gradients are those of sum(row_loss) / D
  void* row_loss;
  void* grad_student;
  void* grad_teachers[kMaxTeachers];
};

#define PYKD_DECLARE_MULTI_TEACHER_KERNELS(capability)               \
  namespace capability {                                             \
  void multi_teacher_kd_loss_rows(const MultiTeacherKernelArgs& args); \
  }

PYKD_DECLARE_MULTI_TEACHER_KERNELS(DEFAULT)
PYKD_DECLARE_MULTI_TEACHER_KERNELS(AVX2)
PYKD_DECLARE_MULTI_TEACHER_KERNELS(AVX512)
#undef PYKD_DECLARE_MULTI_TEACHER_KERNELS

}  // namespace pykd::cpu
