"""Distillation from several teachers at once: the fused multi_teacher_kd_loss."""
import math
import numbers

import torch

from . import ops
from .loss import _check_number, check_ignore_index, check_reduction

MAX_TEACHERS = 32
_OWNER = "multi_teacher_kd_loss"


def _teachers(student_logits, teacher_logits):
    """The teachers as a list of tensors of the student's shape (views of a stacked tensor)."""
    if isinstance(teacher_logits, torch.Tensor):
        if tuple(teacher_logits.shape[1:]) != tuple(student_logits.shape):
            raise ValueError(
                f"{_OWNER}: a stacked teacher_logits must have the shape [K, "
                f"*student_logits.shape] = [K, {', '.join(map(str, student_logits.shape))}], got "
                f"{list(teacher_logits.shape)}"
            )
        teachers = list(teacher_logits.unbind(0))
    elif isinstance(teacher_logits, (list, tuple)):
        teachers = list(teacher_logits)
        for k, t in enumerate(teachers):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"{_OWNER}: teacher_logits[{k}] must be a torch.Tensor, got {type(t).__name__}"
                )
    else:
        raise TypeError(
            f"{_OWNER}: teacher_logits must be a tensor [K, *student_logits.shape] or a list or "
            f"tuple of K tensors, got {type(teacher_logits).__name__}"
        )
    if not 1 <= len(teachers) <= MAX_TEACHERS:
        raise ValueError(
            f"{_OWNER}: needs 1 to {MAX_TEACHERS} teachers in teacher_logits, got {len(teachers)}"
        )
    return teachers


def _weights(weights, count):
    """K Python floats, finite and >= 0; 1/K each by default."""
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(
                f"{_OWNER}: weights as a tensor must be 1-D, got shape {list(weights.shape)}"
            )
        weights = weights.tolist()  # settings, read on the host (a graph break under compile)
    elif not isinstance(weights, (list, tuple)):
        raise TypeError(
            f"{_OWNER}: weights must be a sequence or 1-D tensor of numbers, got "
            f"{type(weights).__name__}"
        )
    if len(weights) != count:
        raise ValueError(
            f"{_OWNER}: weights must hold one number per teacher ({count}), got {len(weights)}"
        )
    checked = []
    for k, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"{_OWNER}: weights[{k}] must be a number, got {type(weight).__name__}")
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{_OWNER}: weights[{k}] must be a finite number >= 0, got {weight}")
        checked.append(weight)
    return checked


def multi_teacher_kd_loss(student_logits, teacher_logits, weights=None, temperature=1.0,
                          reduction="batchmean", *, labels=None, ignore_index=-100):
    """Distillation from K teachers: ``sum_k weights[k] * T^2 * KL(softmax(t_k/T) || softmax(s/T))``.

    ``teacher_logits`` is a tensor ``[K, *student_logits.shape]`` (the teachers stacked) or a list
    or tuple of K tensors of the student's shape (passed to the kernel as they are, never stacked
    into a copy); 1 <= K <= 32. ``weights`` (K finite numbers >= 0, a sequence or a 1-D tensor read
    once on the host) default to 1/K each, the teachers' mean. ``temperature``, ``reduction``
    (``"batchmean"``, ``"sum"``, ``"none"``), ``labels`` and ``ignore_index`` mean what they mean
    in :func:`pykd.kd_loss`: rows whose label is ``ignore_index`` add nothing and get zero
    gradients, ``"batchmean"`` divides by the number of valid rows (0 when there is none). With
    K = 1 and weight 1 it is ``pykd.kd_loss``.

    One fused kernel (one launch on a GPU, one parallel region on the CPU) reads the student row
    and the K teacher rows once and writes the student's gradient
    ``T/D * (sum_k w_k * p_s - sum_k w_k * p_tk)`` in the same pass; autograd keeps only that
    gradient. Teachers that require grad (mutual learning) get theirs from the same kernel (all K
    when any of them requires grad). The student may be float16/bfloat16/float32 with teachers of
    any of those (read as they are, accumulated in float32), or float64 with float64; all teachers
    must share one dtype. The loss has ``torch.promote_types`` of the student's and the teachers'
    dtypes, each gradient its own input's dtype.

    A different loss is distillation from the teachers' averaged logits,
    ``pykd.kd_loss(student, torch.stack(teachers).mean(0))``: the KL to the softmax of the mean
    logits (a geometric mean of the teachers' distributions, renormalised), not the weighted mean
    of the KLs to each teacher computed here.
    """
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(
            f"{_OWNER}: student_logits must be a torch.Tensor, got {type(student_logits).__name__}"
        )
    teachers = _teachers(student_logits, teacher_logits)
    weights = _weights(weights, len(teachers))
    temperature = _check_number(_OWNER, "temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{_OWNER}: temperature must be a finite number > 0, got {temperature}")
    check_reduction(_OWNER, reduction)
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise TypeError(f"{_OWNER}: labels must be a torch.Tensor, got {type(labels).__name__}")
    ignore_index = check_ignore_index(_OWNER, ignore_index)
    grad = torch.is_grad_enabled()
    return ops.multi_teacher_kd_loss_with_autograd(
        student_logits, teachers, weights, labels, temperature, ignore_index, reduction,
        grad and student_logits.requires_grad, grad and any(t.requires_grad for t in teachers),
    )
