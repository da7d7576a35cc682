// Argument checks, row views and the backend-independent body of pykd::kd_loss, shared by the CPU
// and CUDA implementations (csrc/cpu/kd_loss_cpu.cpp, csrc/cuda/kd_loss_cuda.cu).
#pragma once

#include "allocate.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace pykd {

enum class Reduction { None, Sum, BatchMean };

inline Reduction parse_reduction(std::string_view reduction) {
  if (reduction == "batchmean") {
    return Reduction::BatchMean;
  }
  if (reduction == "sum") {
    return Reduction::Sum;
  }
  TORCH_CHECK_VALUE(
      reduction == "none",
      "kd_loss: reduction must be one of 'batchmean', 'sum', 'none', got '", reduction, "'");
  return Reduction::None;
}

inline bool is_reduced_float(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Logits: the same shape, at least one class, floating point; any pair of float16 / bfloat16 /
// float32 (read as they are), or float64 with float64; one device. Labels, when given: integers
// of the logits' leading shape on the same device.
inline void check_kd_inputs(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double beta,
    double soft_weight,
    double hard_weight) {
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
  for (const auto& [name, logits] :
       {std::pair{"student_logits", &student}, std::pair{"teacher_logits", &teacher}}) {
    TORCH_CHECK_TYPE(
        at::isFloatingType(logits->scalar_type()), "kd_loss: ", name,
        " must be a floating-point tensor, got ", logits->scalar_type());
  }
  const at::ScalarType ds = student.scalar_type(), dt = teacher.scalar_type();
  TORCH_CHECK_TYPE(
      (is_reduced_float(ds) && is_reduced_float(dt)) || (ds == at::kDouble && dt == at::kDouble),
      "kd_loss: student_logits and teacher_logits must both be float16/bfloat16/float32 (in any "
      "combination) or both float64, got ",
      ds, " and ", dt);
  TORCH_CHECK_VALUE(
      student.device() == teacher.device(),
      "kd_loss: student_logits and teacher_logits must be on the same device, got ",
      student.device(), " and ", teacher.device());
  TORCH_CHECK_VALUE(
      std::isfinite(temperature) && temperature > 0,
      "kd_loss: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(
      beta >= 0 && beta <= 1, "kd_loss: beta must be a number in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(
      std::isfinite(soft_weight) && soft_weight >= 0,
      "kd_loss: soft_weight must be a finite number >= 0, got ", soft_weight);
  TORCH_CHECK_VALUE(
      std::isfinite(hard_weight) && hard_weight >= 0,
      "kd_loss: hard_weight must be a finite number >= 0, got ", hard_weight);
  TORCH_CHECK_VALUE(
      hard_weight == 0 || labels.has_value(),
      "kd_loss: labels are required when hard_weight is not 0");
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK_TYPE(
        !at::isFloatingType(l.scalar_type()) && !at::isComplexType(l.scalar_type()) &&
            l.scalar_type() != at::kBool,
        "kd_loss: labels must be an integer tensor, got ", l.scalar_type());
    TORCH_CHECK_VALUE(
        l.sizes() == student.sizes().slice(0, student.dim() - 1),
        "kd_loss: labels must have the logits' shape without the class dimension, ",
        student.sizes().slice(0, student.dim() - 1), ", got ", l.sizes());
    TORCH_CHECK_VALUE(
        l.device() == student.device(), "kd_loss: labels must be on the logits' device (",
        student.device(), "), got ", l.device());
  }
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

// The shape of per-row outputs: the logits' shape without the class dimension.
inline std::vector<int64_t> row_shape(const at::Tensor& logits) {
  auto sizes = logits.sizes();
  return std::vector<int64_t>(sizes.begin(), sizes.end() - 1);
}

// What a backend's launch(const KdArgs&) is given. Row r's loss is
//   soft_weight * T^2 * divergence_r + hard_weight * cross_entropy_r        (0 if masked)
// with D = the number of valid rows under "batchmean" (1 if none is valid; the backend counts
// them on the device) and 1 otherwise. It writes `loss` (the accumulation dtype: [rows] for
// "none", 0-d sum / D otherwise) and each gradient that is defined: d loss / d logits for an
// upstream gradient of 1 (of each row's loss for "none"), 0 in masked rows.
struct KdArgs {
  at::Tensor student, teacher;  // [rows, cols], unit class stride, any row stride
  at::Tensor labels;            // [rows] int64 contiguous, or undefined: every row valid
  int64_t ignore_index;
  double temperature, beta, soft_weight, hard_weight;
  Reduction reduction;
  at::Tensor loss;
  at::Tensor grad_student, grad_teacher;  // [rows, cols] contiguous, or undefined
};

// The body of pykd::kd_loss on any backend: checks (before `Guard`, the backend's device guard,
// is made), allocation, the early return on empty input, the launch.
template <typename Guard, typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_impl(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const std::optional<at::Tensor>& labels,
    double temperature,
    double beta,
    double soft_weight,
    double hard_weight,
    int64_t ignore_index,
    std::string_view reduction_name,
    bool student_grad,
    bool teacher_grad,
    const Launch& launch) {
  check_kd_inputs(
      student_logits, teacher_logits, labels, temperature, beta, soft_weight, hard_weight);
  const Reduction reduction = parse_reduction(reduction_name);
  [[maybe_unused]] const Guard guard(student_logits.device());

  const at::ScalarType acc = at::toOpMathType(student_logits.scalar_type());
  const auto acc_options = student_logits.options().dtype(acc);
  const at::ScalarType loss_dtype =
      at::promote_types(student_logits.scalar_type(), teacher_logits.scalar_type());
  at::Tensor loss = reduction == Reduction::None
      ? at::empty(row_shape(student_logits), acc_options)
      : at::empty({}, acc_options);
  auto gradient = [](const at::Tensor& logits, bool wanted) {
    return wanted ? empty_for_overwrite(logits.sizes(), logits.options())
                  : logits.new_empty({0});
  };
  at::Tensor grad_s = gradient(student_logits, student_grad);
  at::Tensor grad_t = gradient(teacher_logits, teacher_grad);
  if (student_logits.numel() == 0) {
    loss.zero_();
    return {loss.to(loss_dtype), grad_s, grad_t};
  }
  KdArgs args{
      as_rows(student_logits),
      as_rows(teacher_logits),
      labels.has_value() ? labels->reshape({-1}).to(at::kLong).contiguous() : at::Tensor(),
      ignore_index,
      temperature,
      beta,
      soft_weight,
      hard_weight,
      reduction,
      loss,
      student_grad ? grad_s.view({-1, student_logits.size(-1)}) : at::Tensor(),
      teacher_grad ? grad_t.view({-1, teacher_logits.size(-1)}) : at::Tensor()};
  launch(args);
  return {loss.scalar_type() == loss_dtype ? loss : loss.to(loss_dtype), grad_s, grad_t};
}

}  // namespace pykd
