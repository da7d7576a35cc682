// Argument checks, row views and the backend-independent body of pykd::multi_teacher_kd_loss
// (SPEC section 1, "Several teachers"), shared by csrc/cpu/multi_teacher_kd_loss_cpu.cpp and
// csrc/cuda/multi_teacher_kd_loss_cuda.cu. Row r's loss is
//     sum_k weights[k] * T^2 * KL(p_tk || p_s)                        (0 if masked)
// and the gradients are those of sum(row_loss) / D for an upstream gradient of 1:
//     d/ds_j  = T / D * (W * p_s,j - sum_k w_k p_tk,j)                W = sum_k w_k
//     d/dt_kj = T / D * w_k * p_tk,j * (log p_tk,j - log p_s,j - KL_k)
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
#include <vector>

namespace pykd {

// The most teachers one launch takes: their pointers, strides and weights travel in the CUDA
// kernel's parameters (and in fixed arrays of the CPU kernel's arguments).
constexpr int64_t kMaxTeachers = 32;

// Teachers: 1..kMaxTeachers tensors of the student's shape, all of one dtype (float16 / bfloat16 /
// float32 with any of those for the student, or float64 with float64), on the student's device;
// one finite weight >= 0 per teacher. Labels as for kd_loss.
inline void check_multi_teacher_inputs(
    const at::Tensor& student,
    at::TensorList teachers,
    at::ArrayRef<double> weights,
    const std::optional<at::Tensor>& labels,
    double temperature) {
  constexpr const char* op = "multi_teacher_kd_loss";
  const int64_t k = static_cast<int64_t>(teachers.size());
  TORCH_CHECK_VALUE(
      k >= 1 && k <= kMaxTeachers, op, ": needs 1 to ", kMaxTeachers,
      " teachers in teacher_logits, got ", k);
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(weights.size()) == k, op,
      ": weights must hold one number per teacher (", k, "), got ", weights.size());
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK_VALUE(
        std::isfinite(weights[i]) && weights[i] >= 0, op, ": weights[", i,
        "] must be a finite number >= 0, got ", weights[i]);
  }
  TORCH_CHECK_VALUE(
      student.dim() >= 1, op,
      ": student_logits must have at least one dimension (the classes), got a 0-d tensor");
  TORCH_CHECK_VALUE(
      student.size(-1) > 0, op, ": student_logits must have at least one class, got shape ",
      student.sizes());
  TORCH_CHECK_TYPE(
      at::isFloatingType(student.scalar_type()), op,
      ": student_logits must be a floating-point tensor, got ", student.scalar_type());
  const at::ScalarType dt = teachers[0].scalar_type();
  for (int64_t i = 0; i < k; ++i) {
    const at::Tensor& t = teachers[i];
    TORCH_CHECK_VALUE(
        t.sizes() == student.sizes(), op, ": teacher_logits[", i,
        "] must have the student's shape ", student.sizes(), ", got ", t.sizes());
    TORCH_CHECK_TYPE(
        t.scalar_type() == dt, op, ": all teacher_logits must have one dtype, got ", dt,
        " for teacher 0 and ", t.scalar_type(), " for teacher ", i,
        " (convert them to one dtype first)");
    TORCH_CHECK_VALUE(
        t.device() == student.device(), op, ": teacher_logits[", i,
        "] must be on the student's device (", student.device(), "), got ", t.device());
  }
  const at::ScalarType ds = student.scalar_type();
  TORCH_CHECK_TYPE(
      (is_reduced_float(ds) && is_reduced_float(dt)) || (ds == at::kDouble && dt == at::kDouble),
      op, ": student_logits and teacher_logits must be float16/bfloat16/float32 (in any "
      "combination) or all float64, got ", ds, " and ", dt);
  TORCH_CHECK_VALUE(
      std::isfinite(temperature) && temperature > 0, op,
      ": temperature must be a finite number > 0, got ", temperature);
  if (labels.has_value()) {
    const at::Tensor& l = *labels;
    TORCH_CHECK_TYPE(
        !at::isFloatingType(l.scalar_type()) && !at::isComplexType(l.scalar_type()) &&
            l.scalar_type() != at::kBool,
        op, ": labels must be an integer tensor, got ", l.scalar_type());
    TORCH_CHECK_VALUE(
        l.sizes() == student.sizes().slice(0, student.dim() - 1), op,
        ": labels must have the logits' shape without the class dimension, ",
        student.sizes().slice(0, student.dim() - 1), ", got ", l.sizes());
    TORCH_CHECK_VALUE(
        l.device() == student.device(), op, ": labels must be on the logits' device (",
        student.device(), "), got ", l.device());
  }
}

// What a backend's launch(const MultiTeacherArgs&) is given: it writes `loss` (the accumulation
// dtype: [rows] for "none", 0-d sum / D otherwise, D counted on the device) and each gradient that
// is defined, 0 in masked rows.
struct MultiTeacherArgs {
  at::Tensor student;                // [rows, cols], unit class stride, any row stride
  std::vector<at::Tensor> teachers;  // K of [rows, cols], unit class stride, any row stride
  std::vector<double> weights;
  at::Tensor labels;  // [rows] int64 contiguous, or undefined: every row valid
  int64_t ignore_index;
  double temperature;
  Reduction reduction;
  at::Tensor loss;
  at::Tensor grad_student;                // [rows, cols] contiguous, or undefined
  std::vector<at::Tensor> grad_teachers;  // K of [rows, cols] contiguous, or empty
};

// The body of pykd::multi_teacher_kd_loss on any backend: checks (before `Guard`, the backend's
// device guard, is made), allocation, the early return on empty input, the launch. The loss has
// the dtype promote_types(student, teachers); each gradient its logits' dtype.
template <typename Guard, typename Launch>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> multi_teacher_kd_loss_impl(
    const at::Tensor& student_logits,
    at::TensorList teacher_logits,
    at::ArrayRef<double> weights,
    const std::optional<at::Tensor>& labels,
    double temperature,
    int64_t ignore_index,
    std::string_view reduction_name,
    bool student_grad,
    bool teacher_grad,
    const Launch& launch) {
  check_multi_teacher_inputs(student_logits, teacher_logits, weights, labels, temperature);
  const Reduction reduction = parse_reduction(reduction_name);
  [[maybe_unused]] const Guard guard(student_logits.device());

  const at::ScalarType acc = at::toOpMathType(student_logits.scalar_type());
  const auto acc_options = student_logits.options().dtype(acc);
  const at::ScalarType loss_dtype =
      at::promote_types(student_logits.scalar_type(), teacher_logits[0].scalar_type());
  at::Tensor loss = reduction == Reduction::None
      ? at::empty(row_shape(student_logits), acc_options)
      : at::empty({}, acc_options);
  at::Tensor grad_s = student_grad
      ? empty_for_overwrite(student_logits.sizes(), student_logits.options())
      : student_logits.new_empty({0});
  std::vector<at::Tensor> grad_t;
  if (teacher_grad) {
    for (const at::Tensor& t : teacher_logits) {
      grad_t.push_back(empty_for_overwrite(t.sizes(), t.options()));
    }
  }
  auto result = [&](const at::Tensor& l) {
    return std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>>{
        l.scalar_type() == loss_dtype ? l : l.to(loss_dtype), grad_s, grad_t};
  };
  if (student_logits.numel() == 0) {
    loss.zero_();
    return result(loss);
  }
  const int64_t cols = student_logits.size(-1);
  MultiTeacherArgs args{
      as_rows(student_logits),
      {},
      std::vector<double>(weights.begin(), weights.end()),
      labels.has_value() ? labels->reshape({-1}).to(at::kLong).contiguous() : at::Tensor(),
      ignore_index,
      temperature,
      reduction,
      loss,
      student_grad ? grad_s.view({-1, cols}) : at::Tensor(),
      {}};
  for (const at::Tensor& t : teacher_logits) {
    args.teachers.push_back(as_rows(t));
  }
  for (const at::Tensor& g : grad_t) {
    args.grad_teachers.push_back(g.view({-1, cols}));
  }
  launch(args);
  return result(loss);
}

}  // namespace pykd
