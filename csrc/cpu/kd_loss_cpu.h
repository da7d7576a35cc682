// The CPU KD-loss kernels, compiled once per CPU capability (kd_loss_default.cpp and
// kd_loss_avx2.cpp include kd_loss_kernel.h) and chosen at run time in kd_loss_cpu.cpp.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace pykd::cpu {

// Rows of `cols` logits; row r of the student starts at student + r * student_stride (elements).
// Row statistics are of the accumulation type (double for double logits, float otherwise).
struct KdForwardArgs {
  c10::ScalarType dtype;
  const void* student;
  const void* teacher;
  int64_t rows, cols, student_stride, teacher_stride;
  double inv_temperature;
  void* kl;
  void* student_lse;
  void* teacher_lse;
};

// grad_kl[r * grad_stride] is the upstream gradient of row r's KL (stride 0 when broadcast).
// grad_student / grad_teacher are contiguous [rows, cols] outputs, or null when not wanted.
struct KdBackwardArgs {
  KdForwardArgs fwd;  // the forward's inputs and row statistics
  const void* grad_kl;
  int64_t grad_stride;
  void* grad_student;
  void* grad_teacher;
};

#define PYKD_DECLARE_KD_KERNELS(capability)           \
  namespace capability {                              \
  void kd_forward(const KdForwardArgs& args);         \
  void kd_backward(const KdBackwardArgs& args);       \
  }

PYKD_DECLARE_KD_KERNELS(DEFAULT)
PYKD_DECLARE_KD_KERNELS(AVX2)
#undef PYKD_DECLARE_KD_KERNELS

}  // namespace pykd::cpu
