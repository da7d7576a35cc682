// Argument checks, row views and the backend-independent body of pykd::sparse_kd_loss (SPEC
// section 1, "Sparse teacher"), shared by csrc/cpu/sparse_kd_loss_cpu.cpp and
// csrc/cuda/sparse_kd_loss_cuda.cu.
//
// A row: student logits s[V], the teacher's top-k as values v[K] and class indices idx[K], and
// optionally the teacher's full-vocabulary log-sum-exp lse of t / T. With s' = s / T,
// log p_s = log_softmax(s') over all V classes, and
//   without lse: log p_k = log_softmax(v / T) over the K entries (renormalised), r = 0;
//   with lse:    log p_k = v_k / T - lse, r = max(0, 1 - sum_k p_k) (0 also when the indices
//                name all V classes: no tail is left), q = the student's mass outside the
//                classes the indices name (each class once), summed over those classes, never
//                taken as 1 - sum (which cancels when the top-k holds nearly all the mass);
//   row loss = T^2 * (sum_k p_k (log p_k - log p_s[idx_k]) + r log(r / q))   (0 log 0 = 0)
// and its student gradient for an upstream gradient of 1, per class j (u = sum_k p_k + r, which
// is 1 except where sum_k p_k > 1 clamped r):
//   d / d s_j = T / D * (u p_s,j - sum_{k: idx_k = j} p_k)            j named by an index
//   d / d s_j = T / D * (u p_s,j - r p_s,j / q)                        j in the tail
// (the tail part 0 when q = 0: a student without tail mass gets a loss of +inf and a finite
// gradient). A repeated index is a separate entry: each adds its own term and its own p_k to the
// class's gradient.
#pragma once

#include "allocate.h"
#include "kd_loss.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>

namespace pykd {

inline void check_sparse_kd_inputs(
    const at::Tensor& student,
    const at::Tensor& values,
    const at::Tensor& indices,
    const std::optional<at::Tensor>& lse,
    const std::optional<at::Tensor>& labels,
    double temperature) {
  TORCH_CHECK_VALUE(
      student.dim() >= 1,
      "sparse_kd_loss: student_logits must have at least one dimension (the classes), got a 0-d "
      "tensor");
  const auto leading = student.sizes().slice(0, student.dim() - 1);
  TORCH_CHECK_VALUE(
      values.dim() == student.dim() && values.sizes().slice(0, values.dim() - 1) == leading,
      "sparse_kd_loss: teacher_values must have the shape of student_logits with K entries in "
      "the last dimension (", leading, " + [K]), got ", values.sizes());
  TORCH_CHECK_VALUE(
      indices.sizes() == values.sizes(),
      "sparse_kd_loss: teacher_indices must have the shape of teacher_values (", values.sizes(),
      "), got ", indices.sizes());
  const int64_t classes = student.size(-1), k = values.size(-1);
  TORCH_CHECK_VALUE(
      k > 0, "sparse_kd_loss: teacher_values must hold at least one entry per row (K >= 1), got "
      "shape ", values.sizes());
  TORCH_CHECK_VALUE(
      k <= classes, "sparse_kd_loss: teacher_values holds K = ", k,
      " entries per row, more than the student's ", classes, " classes");
  TORCH_CHECK_TYPE(
      at::isFloatingType(student.scalar_type()),
      "sparse_kd_loss: student_logits must be a floating-point tensor, got ",
      student.scalar_type());
  TORCH_CHECK_TYPE(
      at::isFloatingType(values.scalar_type()),
      "sparse_kd_loss: teacher_values must be a floating-point tensor, got ", values.scalar_type());
  const at::ScalarType ds = student.scalar_type(), dv = values.scalar_type();
  TORCH_CHECK_TYPE(
      (is_reduced_float(ds) && is_reduced_float(dv)) || (ds == at::kDouble && dv == at::kDouble),
      "sparse_kd_loss: student_logits and teacher_values must both be float16/bfloat16/float32 "
      "(in any combination) or both float64, got ", ds, " and ", dv);
  TORCH_CHECK_TYPE(
      indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
      "sparse_kd_loss: teacher_indices must be int32 or int64, got ", indices.scalar_type());
  for (const auto& [name, tensor] :
       {std::pair{"teacher_values", &values}, std::pair{"teacher_indices", &indices}}) {
    TORCH_CHECK_VALUE(
        tensor->device() == student.device(), "sparse_kd_loss: ", name,
        " must be on the device of student_logits (", student.device(), "), got ",
        tensor->device());
  }
  if (lse.has_value()) {
    TORCH_CHECK_TYPE(
        lse->scalar_type() == at::kFloat || lse->scalar_type() == at::kDouble,
        "sparse_kd_loss: teacher_lse must be float32 or float64, got ", lse->scalar_type());
    TORCH_CHECK_VALUE(
        lse->sizes() == leading,
        "sparse_kd_loss: teacher_lse must have the shape of student_logits without the class "
        "dimension, ", leading, ", got ", lse->sizes());
    TORCH_CHECK_VALUE(
        lse->device() == student.device(),
        "sparse_kd_loss: teacher_lse must be on the device of student_logits (", student.device(),
        "), got ", lse->device());
  }
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK_TYPE(
        !at::isFloatingType(l.scalar_type()) && !at::isComplexType(l.scalar_type()) &&
            l.scalar_type() != at::kBool,
        "sparse_kd_loss: labels must be an integer tensor, got ", l.scalar_type());
    TORCH_CHECK_VALUE(
        l.sizes() == leading,
        "sparse_kd_loss: labels must have the shape of student_logits without the class "
        "dimension, ", leading, ", got ", l.sizes());
    TORCH_CHECK_VALUE(
        l.device() == student.device(),
        "sparse_kd_loss: labels must be on the device of student_logits (", student.device(),
        "), got ", l.device());
  }
  TORCH_CHECK_VALUE(
      std::isfinite(temperature) && temperature > 0,
      "sparse_kd_loss: temperature must be a finite number > 0, got ", temperature);
}

// What a backend's launch(const SparseKdArgs&) is given: every row tensor as [rows, n] with
// unit class stride. It writes `loss` (the accumulation dtype: [rows] for "none", 0-d sum / D
// otherwise, D the valid rows under "batchmean", counted by the backend, 1 if none) and, when
// defined, grad_student (0 in masked rows, whose teacher entries are never read).
struct SparseKdArgs {
  at::Tensor student;  // [rows, V]
  at::Tensor values;   // [rows, K], any row stride
  at::Tensor indices;  // [rows, K] int32 / int64, any row stride
  at::Tensor lse;      // [rows] contiguous, acc dtype, or undefined (renormalised top-k)
  at::Tensor labels;   // [rows] int64 contiguous, or undefined: every row valid
  int64_t ignore_index;
  double temperature;
  Reduction reduction;
  at::Tensor loss;
  at::Tensor grad_student;  // [rows, V] contiguous, or undefined
};

template <typename Guard, typename Launch>
std::tuple<at::Tensor, at::Tensor> sparse_kd_loss_impl(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_values,
    const at::Tensor& teacher_indices,
    const std::optional<at::Tensor>& teacher_lse,
    const std::optional<at::Tensor>& labels,
    double temperature,
    int64_t ignore_index,
    std::string_view reduction_name,
    bool student_grad,
    const Launch& launch) {
  check_sparse_kd_inputs(
      student_logits, teacher_values, teacher_indices, teacher_lse, labels, temperature);
  TORCH_CHECK_VALUE(
      reduction_name == "batchmean" || reduction_name == "sum" || reduction_name == "none",
      "sparse_kd_loss: reduction must be one of 'batchmean', 'sum', 'none', got '",
      reduction_name, "'");
  const Reduction reduction = parse_reduction(reduction_name);
  [[maybe_unused]] const Guard guard(student_logits.device());

  const at::ScalarType acc = at::toOpMathType(student_logits.scalar_type());
  const auto acc_options = student_logits.options().dtype(acc);
  const at::ScalarType loss_dtype =
      at::promote_types(student_logits.scalar_type(), teacher_values.scalar_type());
  at::Tensor loss = reduction == Reduction::None
      ? at::empty(row_shape(student_logits), acc_options)
      : at::empty({}, acc_options);
  at::Tensor grad_s = student_grad
      ? empty_for_overwrite(student_logits.sizes(), student_logits.options())
      : student_logits.new_empty({0});
  if (student_logits.numel() == 0) {
    loss.zero_();
    return {loss.to(loss_dtype), grad_s};
  }
  SparseKdArgs args{
      as_rows(student_logits),
      as_rows(teacher_values),
      as_rows(teacher_indices),
      teacher_lse.has_value() ? teacher_lse->reshape({-1}).to(acc).contiguous() : at::Tensor(),
      labels.has_value() ? labels->reshape({-1}).to(at::kLong).contiguous() : at::Tensor(),
      ignore_index,
      temperature,
      reduction,
      loss,
      student_grad ? grad_s.view({-1, student_logits.size(-1)}) : at::Tensor()};
  launch(args);
  return {loss.scalar_type() == loss_dtype ? loss : loss.to(loss_dtype), grad_s};
}

}  // namespace pykd
