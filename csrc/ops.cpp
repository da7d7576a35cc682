// The pykd op schemas, declared once. Kernels register per backend in csrc/cpu and csrc/cuda;
// autograd and fake (meta) kernels are attached in pykd/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(pykd, m) {
  // Per-row KL(p_t || p_s) of the temperature softmaxes, without the T^2 factor, plus the per-row
  // log-sum-exps of s/T and t/T that the backward needs. Outputs have the leading shape of the
  // logits and the accumulation dtype (float32, or float64 for float64 logits).
  m.def(
      "kd_loss_fwd(Tensor student_logits, Tensor teacher_logits, float temperature) -> "
      "(Tensor kl, Tensor student_lse, Tensor teacher_lse)");
  // Gradients of sum(grad_kl * kl) with respect to the logits. A gradient that is not asked for
  // comes back as an empty tensor of shape [0].
  m.def(
      "kd_loss_bwd(Tensor grad_kl, Tensor student_logits, Tensor teacher_logits, "
      "Tensor student_lse, Tensor teacher_lse, Tensor kl, float temperature, "
      "bool student_grad, bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)");
}
