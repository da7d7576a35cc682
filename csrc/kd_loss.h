// Argument checks, row views and the backend-independent body of the KD loss ops, shared by the
// CPU and CUDA implementations.
#pragma once

#include "allocate.h"

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <tuple>
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

// What a backend's kernels are given: both logits as_rows(), and 1/T.
struct KdInputs {
  at::Tensor student;
  at::Tensor teacher;
  double inv_temperature;
};

// The backward's per-row tensors, flat: the forward's statistics contiguous, grad_kl as given
// with grad_stride between rows (0 when it is broadcast).
struct KdRowStats {
  at::Tensor kl;
  at::Tensor student_lse;
  at::Tensor teacher_lse;
  at::Tensor grad_kl;
  int64_t grad_stride;
};

// The body of pykd::kd_loss_fwd on any backend: checks, allocation, the early return on empty
// input. launch(const KdInputs&, at::Tensor& kl, at::Tensor& student_lse, at::Tensor& teacher_lse)
// fills the contiguous per-row outputs.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_impl(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    double temperature,
    const Launch& launch) {
  check_logits(student_logits, teacher_logits);
  check_temperature(temperature);
  const auto options =
      student_logits.options().dtype(at::toOpMathType(student_logits.scalar_type()));
  at::Tensor kl = student_logits.new_empty(row_shape(student_logits), options);
  at::Tensor lse_s = kl.new_empty(kl.sizes());
  at::Tensor lse_t = kl.new_empty(kl.sizes());
  if (kl.numel() > 0) {
    launch(
        KdInputs{as_rows(student_logits), as_rows(teacher_logits), 1.0 / temperature}, kl, lse_s,
        lse_t);
  }
  return {kl, lse_s, lse_t};
}

// The body of pykd::kd_loss_bwd on any backend. launch(const KdInputs&, const KdRowStats&,
// at::Tensor* grad_student, at::Tensor* grad_teacher) fills the contiguous gradients it is given
// (null for one not asked for); it is not called when there is nothing to compute.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> kd_loss_bwd_impl(
    const at::Tensor& grad_kl,
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const at::Tensor& student_lse,
    const at::Tensor& teacher_lse,
    const at::Tensor& kl,
    double temperature,
    bool student_grad,
    bool teacher_grad,
    const Launch& launch) {
  check_logits(student_logits, teacher_logits);
  check_temperature(temperature);
  check_row_stat(grad_kl, "grad_kl", student_logits);
  check_row_stat(student_lse, "student_lse", student_logits);
  check_row_stat(teacher_lse, "teacher_lse", student_logits);
  check_row_stat(kl, "kl", student_logits);
  auto gradient = [](const at::Tensor& logits, bool wanted) {
    return wanted ? empty_for_overwrite(logits.sizes(), logits.options()) : logits.new_empty({0});
  };
  at::Tensor grad_s = gradient(student_logits, student_grad);
  at::Tensor grad_t = gradient(teacher_logits, teacher_grad);
  if (student_logits.numel() == 0 || !(student_grad || teacher_grad)) {
    return {grad_s, grad_t};
  }
  const at::Tensor grad = grad_kl.reshape({-1});
  const KdRowStats stats{
      kl.reshape({-1}).contiguous(), student_lse.reshape({-1}).contiguous(),
      teacher_lse.reshape({-1}).contiguous(), grad, grad.size(0) == 1 ? 0 : grad.stride(0)};
  launch(
      KdInputs{as_rows(student_logits), as_rows(teacher_logits), 1.0 / temperature}, stats,
      student_grad ? &grad_s : nullptr, teacher_grad ? &grad_t : nullptr);
  return {grad_s, grad_t};
}

}  // namespace pykd
