// Argument checks and row views shared by the CPU and CUDA implementations of the KD loss ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

namespace pykd {

inline void check_logits(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK_VALUE(
      student.dim() >= 1,
      "kd_loss: student_logits must have at least one dimension (the classes), got a 0-d tensor");
  TORCH_CHECK_VALUE(
      student.sizes() == teacher.sizes(),
      "kd_loss: student_logits and teacher_logits must have the same shape, got ",
      student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(
      student.size(-1) > 0, "kd_loss: student_logits must have at least one class, got shape ",
      student.sizes());
  TORCH_CHECK_TYPE(
      at::isFloatingType(student.scalar_type()),
      "kd_loss: student_logits must be a floating-point tensor, got ", student.scalar_type());
  TORCH_CHECK_TYPE(
      student.scalar_type() == teacher.scalar_type(),
      "kd_loss: student_logits and teacher_logits must have the same dtype, got ",
      student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK_VALUE(
      student.device() == teacher.device(),
      "kd_loss: student_logits and teacher_logits must be on the same device, got ",
      student.device(), " and ", teacher.device());
}

inline void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(
      std::isfinite(temperature) && temperature > 0,
      "kd_loss: temperature must be a finite number > 0, got ", temperature);
}

// Per-row statistics (kl and the log-sum-exps) must be [rows] of the accumulation dtype.
inline void check_row_stat(const at::Tensor& stat, const char* name, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(
      stat.numel() * logits.size(-1) == logits.numel() &&
          stat.scalar_type() == at::toOpMathType(logits.scalar_type()) &&
          stat.device() == logits.device(),
      "kd_loss_bwd: ", name, " must hold one ", at::toOpMathType(logits.scalar_type()),
      " per row of the logits on ", logits.device(), ", got shape ", stat.sizes(), " of ",
      stat.scalar_type(), " on ", stat.device());
}

// The logits as a [rows, classes] matrix whose rows are unit-stride and evenly spaced: a view
// whenever the layout allows it (slices of a larger tensor included), a copy otherwise.
inline at::Tensor as_rows(const at::Tensor& logits) {
  at::Tensor rows = logits.reshape({-1, logits.size(-1)});
  if (rows.stride(1) != 1 && rows.size(1) > 1) {
    rows = rows.contiguous();
  }
  return rows;
}

// The shape of the per-row outputs: the logits' shape without the class dimension.
inline std::vector<int64_t> row_shape(const at::Tensor& logits) {
  auto sizes = logits.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - 1);
}

}  // namespace pykd
