// Argument checks and flat views shared by the CPU and CUDA implementations of pykd::hint_loss
// (SPEC section 2: loss = sum_k w_k * mean((f_s,k - f_t,k)^2) over K feature pairs, and in the
// same pass its gradients for an upstream gradient of 1).
#pragma once

#include "allocate.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

namespace pykd {

// Every pair must have one shape; all 2K tensors share one floating dtype and one device (those of
// student_features[0]), so that a single kernel covers them all.
inline void check_hint_features(
    const char* op,
    at::TensorList student,
    at::TensorList teacher,
    at::ArrayRef<double> weights) {
  TORCH_CHECK_VALUE(!student.empty(), op, ": needs at least one feature pair, got none");
  TORCH_CHECK_VALUE(
      student.size() == teacher.size(), op,
      ": student_features and teacher_features must have the same length, got ", student.size(),
      " and ", teacher.size());
  TORCH_CHECK_VALUE(
      weights.size() == student.size(), op, ": weights must hold one number per pair (",
      student.size(), "), got ", weights.size());
  const at::ScalarType dtype = student[0].scalar_type();
  const at::Device device = student[0].device();
  TORCH_CHECK_TYPE(
      at::isFloatingType(dtype), op, ": features must be floating-point tensors, got ", dtype,
      " for student_features[0]");
  for (size_t k = 0; k < student.size(); ++k) {
    const at::Tensor& s = student[k];
    const at::Tensor& t = teacher[k];
    TORCH_CHECK_VALUE(
        s.sizes() == t.sizes(), op, ": student_features[", k, "] and teacher_features[", k,
        "] must have the same shape, got ", s.sizes(), " and ", t.sizes());
    TORCH_CHECK_TYPE(
        s.scalar_type() == dtype && t.scalar_type() == dtype, op,
        ": all features must have the dtype of student_features[0] (", dtype, "), got ",
        s.scalar_type(), " and ", t.scalar_type(), " in pair ", k);
    TORCH_CHECK_VALUE(
        s.device() == device && t.device() == device, op,
        ": all features must be on the device of student_features[0] (", device, "), got ",
        s.device(), " and ", t.device(), " in pair ", k);
    TORCH_CHECK_VALUE(
        std::isfinite(weights[k]), op, ": weights[", k, "] must be finite, got ", weights[k]);
  }
}

// Strides that agree on every dimension of size > 1 give the same order of elements in memory.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

// One pair as two flat arrays of numel elements in the same order, and its gradient outputs.
// The layout is that of at::empty_like(student) (the student's own when it is dense, channels_last
// included), which is also the layout of the student's gradient, so kernels index all of them
// alike. A feature in another layout (a slice, a transposition) is copied into it. The teacher's
// gradient keeps the teacher's layout: when that differs it is written to a temporary first.
struct HintPair {
  at::Tensor student, teacher;  // dense, same layout
  at::Tensor grad_student;      // undefined when not asked for
  at::Tensor grad_teacher;      // the output; undefined when not asked for
  at::Tensor grad_teacher_out;  // where kernels write it: grad_teacher or a temporary

  HintPair(const at::Tensor& s, const at::Tensor& t, bool student_grad, bool teacher_grad)
      : student(s.is_non_overlapping_and_dense() ? s : at::empty_like(s).copy_(s)),
        teacher(same_layout(t, student) ? t : at::empty_like(student).copy_(t)) {
    if (student_grad) {
      grad_student = empty_like_for_overwrite(s);
    }
    if (teacher_grad) {
      grad_teacher = empty_like_for_overwrite(t);
      grad_teacher_out =
          same_layout(grad_teacher, student) ? grad_teacher : at::empty_like(student);
    }
  }

  int64_t numel() const {
    return student.numel();
  }

  // Call once the kernels have run.
  void finish() {
    if (grad_teacher.defined() && !grad_teacher_out.is_same(grad_teacher)) {
      grad_teacher.copy_(grad_teacher_out);
    }
  }
};

inline std::vector<HintPair> hint_pairs(
    at::TensorList student,
    at::TensorList teacher,
    bool student_grad,
    bool teacher_grad) {
  std::vector<HintPair> pairs;
  pairs.reserve(student.size());
  for (size_t k = 0; k < student.size(); ++k) {
    pairs.emplace_back(student[k], teacher[k], student_grad, teacher_grad);
  }
  return pairs;
}

// The op's outputs: one gradient per pair, or an empty list when that side was not asked for.
inline std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> hint_gradients(
    std::vector<HintPair>& pairs) {
  std::vector<at::Tensor> grad_student, grad_teacher;
  for (HintPair& pair : pairs) {
    pair.finish();
    if (pair.grad_student.defined()) {
      grad_student.push_back(pair.grad_student);
    }
    if (pair.grad_teacher.defined()) {
      grad_teacher.push_back(pair.grad_teacher);
    }
  }
  return {std::move(grad_student), std::move(grad_teacher)};
}

// d loss / d f_s,k = 2 w_k / numel_k * (f_s,k - f_t,k) for an upstream gradient of 1. An empty
// pair has no elements to scale; its 0 / 0 in the loss is NaN, as in F.mse_loss.
inline double hint_grad_scale(double weight, int64_t numel) {
  return numel == 0 ? 0.0 : 2.0 * weight / static_cast<double>(numel);
}

}  // namespace pykd
