"""The distillation loss against a sparse teacher: its top-k logits (offline distillation)."""

import torch

from . import ops
from .loss import _check_number, check_ignore_index, check_reduction


def _check_tensor(name, value, optional=False):
    if optional and value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"sparse_kd_loss: {name} must be a torch.Tensor, got {type(value).__name__}")


def sparse_kd_loss(student_logits, teacher_values, teacher_indices, temperature=1.0,
                   reduction="batchmean", *, teacher_lse=None, labels=None, ignore_index=-100):
    """Hinton's distillation loss against a teacher kept as its top-k logits.

    ``student_logits`` ``[..., V]``; ``teacher_values`` ``[..., K]`` and ``teacher_indices``
    ``[..., K]`` (int32 or int64 classes of the student's V, 1 <= K <= V): the teacher's k
    largest logits and where they are. With ``s' = s / T`` and ``log p_s`` the student's
    log-softmax over all V classes:

    - without ``teacher_lse``, the teacher is ``p = softmax(teacher_values / T)`` over its K
      entries (renormalised) and the row loss is ``T^2 * sum_k p_k (log p_k - log p_s[idx_k])``;
    - with ``teacher_lse`` (``[...]``, float32 or float64: the teacher's log-sum-exp of
      ``t / T`` over the full vocabulary, stored with the top-k at the same T) the teacher's
      probabilities are exact, ``p_k = exp(v_k / T - lse)``, and the mass outside the top-k is
      one tail bucket: with ``r = 1 - sum_k p_k`` (clamped at 0 where rounding makes the sum
      exceed 1, and 0 when the indices name every class) and ``q`` the student's mass outside
      the named classes, the row adds ``T^2 * r * log(r / q)`` (0 when r = 0). ``q`` is summed
      over the tail classes themselves, never taken as ``1 - sum_k p_s[idx_k]``, so it keeps its
      relative accuracy when the top-k holds nearly all of the student's mass (where the tail
      is also far below the row's maximum, it is summed relative to its own maximum); a student
      without tail mass where the teacher has some gives ``+inf``, with a finite gradient.

    Masks and reductions are those of :func:`pykd.kd_loss`: a row whose label is
    ``ignore_index`` adds 0, gets a zero gradient, and its teacher entries are never read;
    ``"batchmean"`` divides by the number of valid rows (counted on the device; none gives 0),
    ``"sum"`` sums, ``"none"`` gives the per-row values. One kernel (CPU and CUDA) reads the
    student once and writes its gradient in the same pass; autograd keeps only that gradient.
    Arithmetic is float32 (float64 for a float64 student with float64 values); the values may
    be any of float16/bfloat16/float32 with any such student; the loss has
    ``torch.promote_types(student, values)``, the gradient the student's dtype.

    Only the student gets a gradient: the teacher's values and ``teacher_lse`` are data, like a
    target, and get none even when they require grad.

    A repeated index in a row is a separate entry: it adds its own term to the loss and its own
    ``p_k`` to that class's gradient (on CUDA the repeated class's gradient is summed in the
    gradient's dtype). An index outside ``[0, V)`` in a valid row: on the CPU a ValueError
    naming ``teacher_indices``; on CUDA (which cannot raise without a host sync) a device-side
    assert, as for an out-of-range index in ``torch.gather``, and where assertions are compiled
    out the row's loss and gradient are NaN. Nothing is read or written out of bounds on either.
    """
    _check_tensor("student_logits", student_logits)
    _check_tensor("teacher_values", teacher_values)
    _check_tensor("teacher_indices", teacher_indices)
    _check_tensor("teacher_lse", teacher_lse, optional=True)
    _check_tensor("labels", labels, optional=True)
    temperature = _check_number("sparse_kd_loss", "temperature", temperature)
    check_reduction("sparse_kd_loss", reduction)
    ignore_index = check_ignore_index("sparse_kd_loss", ignore_index)
    grad = torch.is_grad_enabled() and student_logits.requires_grad
    return ops.sparse_kd_loss_with_autograd(
        student_logits, teacher_values, teacher_indices, teacher_lse, labels, temperature,
        ignore_index, reduction, grad,
    )[0]
