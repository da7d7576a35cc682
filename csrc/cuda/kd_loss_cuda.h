// The CUDA KD-loss kernels' launchers (kd_loss_fwd.cu, kd_loss_bwd.cu), called by the ops in
// kd_loss_cuda.cu on the current device and stream.
#pragma once

#include "kd_loss.h"

namespace pykd::cuda {

void launch_kd_forward(
    const KdInputs& in,
    at::Tensor& kl,
    at::Tensor& student_lse,
    at::Tensor& teacher_lse);

void launch_kd_backward(
    const KdInputs& in,
    const KdRowStats& stats,
    at::Tensor* grad_student,
    at::Tensor* grad_teacher);

}  // namespace pykd::cuda
