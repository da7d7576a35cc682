"""The knowledge-distillation losses: the functional kd_loss and the KDLoss module."""
import math
import numbers

import torch
from torch import nn

from . import ops

REDUCTIONS = ("batchmean", "sum", "none")


def _check_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"kd_loss: {name} must be a torch.Tensor, got {type(value).__name__}")


def _check_number(owner, name, value):
    if type(value) is float or type(value) is int:  # the common case, without the ABC check
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a Python number, got {type(value).__name__}")
    return float(value)


def check_reduction(owner, reduction):
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{owner}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_ignore_index(owner, ignore_index):
    """ignore_index as a Python int: an integer (not a bool) that fits in int64."""
    if type(ignore_index) is not int and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)):
        raise TypeError(f"{owner}: ignore_index must be an integer, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"{owner}: ignore_index must fit in int64, got {ignore_index}")
    return int(ignore_index)


def check_settings(owner, temperature, soft_weight, hard_weight, beta, ignore_index):
    """The settings of a loss module (KDLoss, FusedLinearKDLoss), checked and as Python numbers:
    (temperature, soft_weight, hard_weight, beta, ignore_index)."""
    temperature = _check_number(owner, "temperature", temperature)
    soft_weight = _check_number(owner, "soft_weight", soft_weight)
    hard_weight = _check_number(owner, "hard_weight", hard_weight)
    beta = _check_number(owner, "beta", beta)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{owner}: temperature must be a finite number > 0, got {temperature}")
    for name, weight in (("soft_weight", soft_weight), ("hard_weight", hard_weight)):
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {weight}")
    if not 0 <= beta <= 1:
        raise ValueError(f"{owner}: beta must be a number in [0, 1], got {beta}")
    return temperature, soft_weight, hard_weight, beta, check_ignore_index(owner, ignore_index)


def _fused_loss(student_logits, teacher_logits, labels, temperature, beta, soft_weight,
                hard_weight, ignore_index, reduction):
    _check_tensor("student_logits", student_logits)
    _check_tensor("teacher_logits", teacher_logits)
    if labels is not None:
        _check_tensor("labels", labels)
    grad = torch.is_grad_enabled()
    return ops.kd_loss_with_autograd(
        student_logits, teacher_logits, labels, temperature, beta, soft_weight, hard_weight,
        ignore_index, reduction, grad and student_logits.requires_grad,
        grad and teacher_logits.requires_grad,
    )[0]


def kd_loss(student_logits, teacher_logits, temperature=1.0, reduction="batchmean", *,
            beta=0.0, labels=None, ignore_index=-100):
    """Hinton's distillation loss and its family: T^2 * D_beta(softmax(teacher/T), softmax(student/T)).

    ``beta`` selects the divergence: 0 (the default) KL(p_t || p_s), Hinton's loss; 1 the
    reverse KL(p_s || p_t); in between the generalized Jensen-Shannon divergence
    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``
    (the convention of TRL's GKD and Liger-Kernel's JSD).

    The last dimension holds the classes; every leading dimension is a row (``[B, C]`` or
    ``[B, L, V]``). ``labels`` (integers of the leading shape) mask rows: a row whose label is
    ``ignore_index`` adds nothing and gets zero gradients. ``reduction="batchmean"`` divides the
    sum over rows by the number of valid rows (all rows without labels; for ``[B, C]`` logits that
    is B, as ``F.kl_div(..., reduction="batchmean")``); no valid row (or no row) gives 0.
    ``"sum"`` is the plain sum, ``"none"`` the per-row values (0 for masked rows).

    One fused kernel reads each logits tensor once and, when an input requires grad, writes its
    gradient in the same pass; autograd keeps only that gradient (never the logits) and scales it
    by the upstream gradient. Gradients flow to the student and, when it requires grad, to the
    teacher. The two logits may be any mix of float16/bfloat16/float32 (or both float64): each is
    read as it is, the arithmetic is float32 (float64 for float64), each gradient has its own
    input's dtype, and the loss has ``torch.promote_types`` of the two.
    """
    return _fused_loss(
        student_logits, teacher_logits, labels, _check_number("kd_loss", "temperature", temperature),
        _check_number("kd_loss", "beta", beta), 1.0, 0.0,
        check_ignore_index("kd_loss", ignore_index), check_reduction("kd_loss", reduction),
    )


class KDLoss(nn.Module):
    """Soft-target distillation plus hard-label cross-entropy, fused in one kernel:

        loss = soft_weight * kd_loss(student, teacher, temperature, beta=beta)
             + hard_weight * cross_entropy(student, labels)

    the cross-entropy on the unscaled student logits, as in the PyTorch tutorial. Both weights are
    explicit (no ``alpha`` whose meaning differs between papers). ``labels`` (needed when
    ``hard_weight`` is not 0) also mask the soft term: rows whose label is ``ignore_index`` add
    nothing to either term, and ``"batchmean"`` divides both by the number of valid rows, as
    ``F.cross_entropy``'s mean does. The student row is read once for both terms (its log-sum-exps
    at T and at 1), and loss and gradient come from the same kernel.
    """

    def __init__(self, temperature=4.0, soft_weight=0.5, hard_weight=0.5, ignore_index=-100,
                 beta=0.0, reduction="batchmean"):
        super().__init__()
        (self.temperature, self.soft_weight, self.hard_weight, self.beta,
         self.ignore_index) = check_settings(
            "KDLoss", temperature, soft_weight, hard_weight, beta, ignore_index)
        self.reduction = check_reduction("KDLoss", reduction)

    def forward(self, student_logits, teacher_logits, labels=None):
        if self.hard_weight != 0 and labels is None:
            raise ValueError("KDLoss: labels are required when hard_weight is not 0")
        return _fused_loss(
            student_logits, teacher_logits, labels, self.temperature, self.beta,
            self.soft_weight, self.hard_weight, self.ignore_index, self.reduction,
        )

    def extra_repr(self):
        return (
            f"temperature={self.temperature}, soft_weight={self.soft_weight}, "
            f"hard_weight={self.hard_weight}, ignore_index={self.ignore_index}, "
            f"beta={self.beta}, reduction={self.reduction!r}"
        )
