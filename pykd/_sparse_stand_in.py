"""TEMPORARY pure-PyTorch stand-in for the fused op ``pykd.sparse_kd_loss`` (issue 13, part 1).

TO BE REPLACED BY THE FUSED OP AT MERGE: ``pykd/__init__.py`` binds ``pykd.sparse_kd_loss`` to
this function in one line, and the teacher cache (pykd/teacher_cache.py) calls it only through
that attribute. Same signature and semantics as the fused op; autograd, float64 arithmetic, no
speed.
"""
import numbers

import torch

REDUCTIONS = ("batchmean", "sum", "none")


def sparse_kd_loss(student_logits, teacher_values, teacher_indices, temperature=1.0,
                   reduction="batchmean", *, teacher_lse=None, labels=None, ignore_index=-100):
    """T^2 * KL(p_t || p_s) with the teacher kept as its top-k logits ``teacher_values`` at the
    classes ``teacher_indices`` ([..., K]; the student [..., V]).

    Without ``teacher_lse`` the teacher is softmax(values / T) over its K classes. With it (the
    teacher's full log-sum-exp of t / T, [...]) p_k = exp(v_k / T - lse) and the mass outside
    the top-k is one tail bucket: with r = 1 - sum p_k and q = 1 - sum_k p_s[idx_k] the loss adds
    T^2 * r * log(r / q) (0 when r <= 0). Rows whose label is ``ignore_index`` add nothing;
    "batchmean" divides by the valid rows (no valid row: 0).
    """
    for name, value in (("student_logits", student_logits), ("teacher_values", teacher_values),
                        ("teacher_indices", teacher_indices)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"sparse_kd_loss: {name} must be a torch.Tensor, "
                            f"got {type(value).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
            temperature > 0):
        raise ValueError(f"sparse_kd_loss: temperature must be a number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"sparse_kd_loss: reduction must be one of {REDUCTIONS}, "
                         f"got {reduction!r}")
    if teacher_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sparse_kd_loss: teacher_indices must be int32 or int64, "
                        f"got {teacher_indices.dtype}")
    rows, classes = student_logits.shape[:-1], student_logits.shape[-1]
    if teacher_values.shape != teacher_indices.shape or teacher_values.shape[:-1] != rows:
        raise ValueError(f"sparse_kd_loss: teacher_values {tuple(teacher_values.shape)} and "
                         f"teacher_indices {tuple(teacher_indices.shape)} must both be "
                         f"[..., K] with the leading shape of student_logits "
                         f"{tuple(student_logits.shape)}")
    if teacher_values.shape[-1] > classes:
        raise ValueError(f"sparse_kd_loss: K = {teacher_values.shape[-1]} teacher entries for "
                         f"{classes} classes")
    if teacher_lse is not None and teacher_lse.shape != rows:
        raise ValueError(f"sparse_kd_loss: teacher_lse {tuple(teacher_lse.shape)} must have the "
                         f"leading shape {tuple(rows)}")
    t = float(temperature)
    index = teacher_indices.long().clamp(0, classes - 1)  # never reads out of bounds
    log_ps = torch.log_softmax(student_logits.double() / t, dim=-1).gather(-1, index)
    values = teacher_values.double() / t
    if teacher_lse is None:
        log_pt = torch.log_softmax(values, dim=-1)
    else:
        log_pt = values - teacher_lse.double().unsqueeze(-1)
    pt = log_pt.exp()
    per_row = (pt * (log_pt - log_ps)).sum(-1)
    if teacher_lse is not None:
        r = 1 - pt.sum(-1)
        q = 1 - log_ps.exp().sum(-1)
        tail = r > 0
        # The unused branch gets safe values: where() would pass NaN gradients through 0 * log 0.
        r_safe = torch.where(tail, r, torch.ones_like(r))
        q_safe = torch.where(tail, q.clamp_min(torch.finfo(torch.float64).tiny),
                             torch.ones_like(q))
        per_row = per_row + torch.where(tail, r_safe * (r_safe.log() - q_safe.log()),
                                        torch.zeros_like(r))
    per_row = per_row * (t * t)
    valid = torch.ones_like(per_row, dtype=torch.bool) if labels is None \
        else labels.reshape(rows) != ignore_index
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    if reduction == "none":
        return per_row.to(dtype)
    total = per_row.sum()
    if reduction == "batchmean":
        total = total / valid.sum().clamp_min(1)
    return total.to(dtype)
