// CPU implementations of pykd::kd_loss_fwd / kd_loss_bwd: checks, allocation, and the choice of
// kernel for this CPU (cpu/cpu_capability.h).
#include "kd_loss.h"
#include "cpu/cpu_capability.h"
#include "cpu/kd_loss_cpu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace pykd::cpu {
namespace {

KdForwardArgs forward_args(
    const at::Tensor& s,
    const at::Tensor& t,
    double temperature,
    const at::Tensor& kl,
    const at::Tensor& lse_s,
    const at::Tensor& lse_t) {
  return KdForwardArgs{
      s.scalar_type(), s.const_data_ptr(), t.const_data_ptr(), s.size(0),
      s.size(1),       s.stride(0),        t.stride(0),        1.0 / temperature,
      kl.data_ptr(),   lse_s.data_ptr(),   lse_t.data_ptr()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    double temperature) {
  check_logits(student_logits, teacher_logits);
  check_temperature(temperature);
  const auto options =
      student_logits.options().dtype(at::toOpMathType(student_logits.scalar_type()));
  at::Tensor kl = at::empty(row_shape(student_logits), options);
  at::Tensor lse_s = at::empty_like(kl);
  at::Tensor lse_t = at::empty_like(kl);
  if (kl.numel() == 0) {
    return {kl, lse_s, lse_t};
  }
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const KdForwardArgs args = forward_args(s, t, temperature, kl, lse_s, lse_t);
  use_avx2() ? AVX2::kd_forward(args) : DEFAULT::kd_forward(args);
  return {kl, lse_s, lse_t};
}

std::tuple<at::Tensor, at::Tensor> kd_loss_bwd_cpu(
    const at::Tensor& grad_kl,
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const at::Tensor& student_lse,
    const at::Tensor& teacher_lse,
    const at::Tensor& kl,
    double temperature,
    bool student_grad,
    bool teacher_grad) {
  check_logits(student_logits, teacher_logits);
  check_temperature(temperature);
  check_row_stat(grad_kl, "grad_kl", student_logits);
  check_row_stat(student_lse, "student_lse", student_logits);
  check_row_stat(teacher_lse, "teacher_lse", student_logits);
  check_row_stat(kl, "kl", student_logits);
  auto gradient = [](const at::Tensor& logits, bool wanted) {
    return wanted ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  };
  at::Tensor grad_s = gradient(student_logits, student_grad);
  at::Tensor grad_t = gradient(teacher_logits, teacher_grad);
  if (student_logits.numel() == 0 || !(student_grad || teacher_grad)) {
    return {grad_s, grad_t};
  }
  const at::Tensor s = as_rows(student_logits);
  const at::Tensor t = as_rows(teacher_logits);
  const at::Tensor grad = grad_kl.reshape({-1});
  const at::Tensor kl_rows = kl.reshape({-1}).contiguous();
  const at::Tensor lse_s = student_lse.reshape({-1}).contiguous();
  const at::Tensor lse_t = teacher_lse.reshape({-1}).contiguous();
  const KdBackwardArgs args{
      forward_args(s, t, temperature, kl_rows, lse_s, lse_t),
      grad.const_data_ptr(), grad.size(0) == 1 ? 0 : grad.stride(0),
      student_grad ? grad_s.data_ptr() : nullptr, teacher_grad ? grad_t.data_ptr() : nullptr};
  use_avx2() ? AVX2::kd_backward(args) : DEFAULT::kd_backward(args);
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace pykd::cpu

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("kd_loss_fwd", &pykd::cpu::kd_loss_fwd_cpu);
  m.impl("kd_loss_bwd", &pykd::cpu::kd_loss_bwd_cpu);
}
