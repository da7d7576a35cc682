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

  // The feature-hint loss sum_k weights[k] * mean((student_features[k] - teacher_features[k])^2)
  // over K >= 1 pairs of any shapes (each pair one shape; all features one floating dtype and one
  // device), all pairs in one kernel launch / one parallel region. Returns a 0-d tensor of the
  // accumulation dtype (float32, or float64 for float64 features); an empty pair gives NaN (0 / 0),
  // as F.mse_loss does. The reduction order is fixed by the shapes, so the result is deterministic.
  m.def(
      "hint_loss_fwd(Tensor[] student_features, Tensor[] teacher_features, float[] weights) -> "
      "Tensor");
  // Gradients of grad_loss * loss: grad_student[k] = grad_loss * 2 weights[k] / numel_k *
  // (student_features[k] - teacher_features[k]) and grad_teacher[k] = -grad_student[k], in the
  // features' dtype and the layout of empty_like of each feature, written in one pass. A list that
  // is not asked for comes back empty.
  m.def(
      "hint_loss_bwd(Tensor grad_loss, Tensor[] student_features, Tensor[] teacher_features, "
      "float[] weights, bool student_grad, bool teacher_grad) -> "
      "(Tensor[] grad_student, Tensor[] grad_teacher)");
}
