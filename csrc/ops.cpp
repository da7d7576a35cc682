// The pykd op schemas, declared once. Kernels register per backend in csrc/cpu and csrc/cuda;
// autograd and fake (meta) kernels are attached in pykd/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(pykd, m) {
  // The KD-loss family in one pass (SPEC sections 1 and 3). Row r's loss is
  //   soft_weight * T^2 * D_beta(p_t || p_s) + hard_weight * cross_entropy(s, labels[r])
  // with D_beta the divergence that beta selects (0: KL(p_t||p_s), 1: KL(p_s||p_t), between: the
  // generalized Jensen-Shannon divergence) and the cross-entropy on the unscaled student logits.
  // Rows whose label is ignore_index add 0 and get zero gradients; without labels every row is
  // valid. reduction: "batchmean" (sum over rows / number of valid rows, 0 when none is valid),
  // "sum", or "none" (per-row values, the logits' leading shape). The loss has the dtype
  // promote_types(student, teacher). When student_grad / teacher_grad is set, the same kernel also
  // returns d loss / d logits for an upstream gradient of 1 (per row for "none"), in that logits'
  // dtype; a gradient not asked for comes back as an empty tensor of shape [0].
  m.def(
      "kd_loss(Tensor student_logits, Tensor teacher_logits, Tensor? labels, float temperature, "
      "float beta, float soft_weight, float hard_weight, int ignore_index, str reduction, "
      "bool student_grad, bool teacher_grad) -> (Tensor loss, Tensor grad_student, "
      "Tensor grad_teacher)");
  // The backward of every fused loss: multiplies each gradient in place by scale, the upstream
  // gradient: one value for all of them, or one per row (scale then has as many elements as each
  // gradient [..., C] has rows, in any shape and strides, and each gradient is contiguous). The
  // gradients are the ones a loss wrote in its forward: any floating dtype each, dense (any
  // memory format), distinct tensors, on scale's device; scale of any floating dtype. Whatever has
  // a scale of exactly 1 is not touched. scale is read on its own device (a CUDA kernel reads it
  // from device memory and returns early when it is 1): no host sync. Each gradient's version
  // counter is bumped, as for any in-place op, so that autograd notices a saved gradient that was
  // scaled since it was saved.
  m.def("scale_grads_(Tensor(a!)[] grads, Tensor scale) -> ()");

  // The feature-hint loss sum_k weights[k] * mean((student_features[k] - teacher_features[k])^2)
  // over K >= 1 pairs of any shapes (each pair one shape; all features one floating dtype and one
  // device), in one pass: all pairs in one kernel launch / one parallel region that reads each
  // feature once and, when student_grad / teacher_grad is set, writes in the same pass
  //   grad_student[k] = 2 weights[k] / numel_k * (student_features[k] - teacher_features[k])
  //   grad_teacher[k] = -grad_student[k]
  // the gradients for an upstream gradient of 1 (scale_grads_ applies the real one), in the
  // features' dtype and the layout of empty_like of each feature; a list not asked for comes back
  // empty. The loss is a 0-d tensor of the accumulation dtype (float32, or float64 for float64
  // features); an empty pair gives NaN (0 / 0), as F.mse_loss does. The reduction order is fixed
  // by the shapes, so the loss is deterministic. With neither gradient, a forward-only kernel.
  m.def(
      "hint_loss(Tensor[] student_features, Tensor[] teacher_features, float[] weights, "
      "bool student_grad, bool teacher_grad) -> "
      "(Tensor loss, Tensor[] grad_student, Tensor[] grad_teacher)");

  // The KD loss against a sparse teacher (SPEC section 1, "Sparse teacher"; the math is
  // csrc/sparse_kd_loss.h's): the teacher's top-k as teacher_values [..., K] (any floating dtype
  // that may go with the student's, as for kd_loss) and teacher_indices [..., K] (int32 or int64
  // class indices of student_logits [..., V], 1 <= K <= V), renormalised over its K entries, or
  // exact with teacher_lse [...] (float32 or float64: the teacher's full log-sum-exp of t / T)
  // plus one tail bucket for the mass outside the top-k. Masks, reductions, the loss's dtype
  // (promote_types(student, values)) and student_grad as for kd_loss; the teacher gets no
  // gradient. Indices of masked rows are never read; on the CPU an index outside [0, V) in a
  // valid row raises, on CUDA it is a device-side assert (and, with assertions compiled out, the
  // row's loss and gradient become NaN); nothing is ever read or written out of bounds.
  m.def(
      "sparse_kd_loss(Tensor student_logits, Tensor teacher_values, Tensor teacher_indices, "
      "Tensor? teacher_lse, Tensor? labels, float temperature, int ignore_index, str reduction, "
      "bool student_grad) -> (Tensor loss, Tensor grad_student)");
  // Several teachers (SPEC section 1): row r's loss is
  //   sum_k weights[k] * T^2 * KL(p_tk || p_s)
  // over K = len(teacher_logits) teachers (1 to 32, each of the student's shape, all of one dtype;
  // float16/bfloat16/float32 with any of those for the student, or all float64), weights finite
  // and >= 0. labels / ignore_index, reduction, the loss's dtype (promote_types(student,
  // teachers)) and the meaning of student_grad / teacher_grad are kd_loss's. One pass: the
  // student row and the K teacher rows are read once by one kernel, which also writes
  //   grad_student   = T / D * (sum_k w_k * p_s - sum_k w_k * p_tk)
  //   grad_teacher[k] = T / D * w_k * p_tk * (log p_tk - log p_s - KL_k)
  // when asked (the teachers' gradients all or none; an empty list when not asked for).
  m.def(
      "multi_teacher_kd_loss(Tensor student_logits, Tensor[] teacher_logits, float[] weights, "
      "Tensor? labels, float temperature, int ignore_index, str reduction, bool student_grad, "
      "bool teacher_grad) -> (Tensor loss, Tensor grad_student, Tensor[] grad_teacher)");
}
