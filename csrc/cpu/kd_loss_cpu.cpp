// CPU implementations of pykd::kd_loss_fwd / kd_loss_bwd (checks and allocation are kd_loss.h's):
// the choice of kernel for this CPU (cpu/cpu_capability.h).
#include "kd_loss.h"
#include "cpu/cpu_capability.h"
#include "cpu/kd_loss_cpu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace pykd::cpu {
namespace {

KdForwardArgs forward_args(
    const KdInputs& in,
    const at::Tensor& kl,
    const at::Tensor& lse_s,
    const at::Tensor& lse_t) {
  const at::Tensor& s = in.student;
  const at::Tensor& t = in.teacher;
  return KdForwardArgs{
      s.scalar_type(), s.const_data_ptr(), t.const_data_ptr(), s.size(0),
      s.size(1),       s.stride(0),        t.stride(0),        in.inv_temperature,
      kl.data_ptr(),   lse_s.data_ptr(),   lse_t.data_ptr()};
}

void launch_forward(const KdInputs& in, at::Tensor& kl, at::Tensor& lse_s, at::Tensor& lse_t) {
  const KdForwardArgs args = forward_args(in, kl, lse_s, lse_t);
  use_avx2() ? AVX2::kd_forward(args) : DEFAULT::kd_forward(args);
}

void launch_backward(
    const KdInputs& in,
    const KdRowStats& stats,
    at::Tensor* grad_s,
    at::Tensor* grad_t) {
  const KdBackwardArgs args{
      forward_args(in, stats.kl, stats.student_lse, stats.teacher_lse),
      stats.grad_kl.const_data_ptr(), stats.grad_stride,
      grad_s ? grad_s->data_ptr() : nullptr, grad_t ? grad_t->data_ptr() : nullptr};
  use_avx2() ? AVX2::kd_backward(args) : DEFAULT::kd_backward(args);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cpu(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    double temperature) {
  return kd_loss_fwd_impl(student_logits, teacher_logits, temperature, launch_forward);
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
  return kd_loss_bwd_impl(
      grad_kl, student_logits, teacher_logits, student_lse, teacher_lse, kl, temperature,
      student_grad, teacher_grad, launch_backward);
}

}  // namespace
}  // namespace pykd::cpu

TORCH_LIBRARY_IMPL(pykd, CPU, m) {
  m.impl("kd_loss_fwd", &pykd::cpu::kd_loss_fwd_cpu);
  m.impl("kd_loss_bwd", &pykd::cpu::kd_loss_bwd_cpu);
}
