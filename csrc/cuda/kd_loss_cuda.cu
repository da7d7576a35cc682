// CUDA implementations of pykd::kd_loss_fwd / kd_loss_bwd: the ops' common body (kd_loss.h) on
// the logits' device and the current stream, with the kernels of kd_loss_fwd.cu / kd_loss_bwd.cu.
#include "cuda/kd_loss_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

namespace pykd::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd_cuda(
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    double temperature) {
  const c10::cuda::CUDAGuard device_guard(student_logits.device());
  return kd_loss_fwd_impl(student_logits, teacher_logits, temperature, launch_kd_forward);
}

std::tuple<at::Tensor, at::Tensor> kd_loss_bwd_cuda(
    const at::Tensor& grad_kl,
    const at::Tensor& student_logits,
    const at::Tensor& teacher_logits,
    const at::Tensor& student_lse,
    const at::Tensor& teacher_lse,
    const at::Tensor& kl,
    double temperature,
    bool student_grad,
    bool teacher_grad) {
  const c10::cuda::CUDAGuard device_guard(student_logits.device());
  return kd_loss_bwd_impl(
      grad_kl, student_logits, teacher_logits, student_lse, teacher_lse, kl, temperature,
      student_grad, teacher_grad, launch_kd_backward);
}

}  // namespace
}  // namespace pykd::cuda

TORCH_LIBRARY_IMPL(pykd, CUDA, m) {
  m.impl("kd_loss_fwd", &pykd::cuda::kd_loss_fwd_cuda);
  m.impl("kd_loss_bwd", &pykd::cuda::kd_loss_bwd_cuda);
}
