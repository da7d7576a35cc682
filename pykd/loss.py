"""The knowledge-distillation losses: the functional kd_loss and the KDLoss module."""
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

REDUCTIONS = ("batchmean", "sum", "none")


def _check_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"kd_loss: {name} must be a torch.Tensor, got {type(value).__name__}")


def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(
            f"kd_loss: temperature must be a Python number, got {type(temperature).__name__}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kd_loss: temperature must be a finite number > 0, got {temperature}")


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def kd_loss(student_logits, teacher_logits, temperature=1.0, reduction="batchmean"):
    """Hinton's distillation loss: T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    The last dimension holds the classes; every leading dimension is a row. With the default
    ``reduction="batchmean"`` the sum of the per-row KL is divided by the number of rows (for
    ``[B, C]`` logits that is B, as in ``F.kl_div(..., reduction="batchmean")`` and the PyTorch
    tutorial; for ``[B, L, V]`` it is B * L). ``"sum"`` returns the plain sum and ``"none"`` the
    per-row values with the leading shape. An empty batch gives NaN under ``"batchmean"`` (0 / 0),
    as PyTorch's own mean reductions do.

    Softmaxes, KL and gradients are computed by one fused kernel without materialising any
    probabilities. Gradients flow to the student and, when it requires grad, to the teacher.
    Logits of different floating dtypes are promoted to a common one; the result has that dtype.
    """
    _check_tensor("student_logits", student_logits)
    _check_tensor("teacher_logits", teacher_logits)
    _check_temperature(temperature)
    _check_reduction(reduction)
    if (
        student_logits.dtype != teacher_logits.dtype
        and student_logits.is_floating_point()
        and teacher_logits.is_floating_point()
    ):
        dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
        student_logits, teacher_logits = student_logits.to(dtype), teacher_logits.to(dtype)

    temperature = float(temperature)
    kl = ops.kd_loss_fwd(student_logits, teacher_logits, temperature)[0]
    scale = temperature * temperature
    if reduction == "none":
        loss = kl * scale
    elif reduction == "sum":
        loss = kl.sum() * scale
    else:
        loss = kl.sum().mul(scale).div(kl.numel())
    return loss.to(student_logits.dtype)


class KDLoss(nn.Module):
    """Soft-target distillation plus hard-label cross-entropy, as in the PyTorch tutorial:

        loss = soft_weight * kd_loss(student, teacher, temperature)
             + hard_weight * cross_entropy(student, labels, ignore_index=ignore_index)

    Both weights are explicit (no ``alpha`` whose meaning differs between papers). The soft term
    is the batch mean of T^2 * KL; the hard term is the mean over labels that are not
    ``ignore_index``. ``labels`` are needed only when ``hard_weight`` is not 0.
    """

    def __init__(self, temperature=1.0, soft_weight=1.0, hard_weight=0.0, ignore_index=-100):
        super().__init__()
        _check_temperature(temperature)
        for name, weight in (("soft_weight", soft_weight), ("hard_weight", hard_weight)):
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                raise TypeError(f"KDLoss: {name} must be a number, got {type(weight).__name__}")
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"KDLoss: {name} must be a finite number >= 0, got {weight}")
        self.temperature = float(temperature)
        self.soft_weight = float(soft_weight)
        self.hard_weight = float(hard_weight)
        self.ignore_index = int(ignore_index)

    def forward(self, student_logits, teacher_logits, labels=None):
        loss = self.soft_weight * kd_loss(student_logits, teacher_logits, self.temperature)
        if self.hard_weight == 0:
            return loss
        if labels is None:
            raise ValueError("KDLoss: labels are required when hard_weight is not 0")
        _check_tensor("labels", labels)
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                "KDLoss: labels must have the student_logits' shape without the class "
                f"dimension, {tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}"
            )
        hard = F.cross_entropy(
            student_logits.reshape(-1, student_logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=self.ignore_index,
        )
        return loss + self.hard_weight * hard

    def extra_repr(self):
        return (
            f"temperature={self.temperature}, soft_weight={self.soft_weight}, "
            f"hard_weight={self.hard_weight}, ignore_index={self.ignore_index}"
        )
