"""TEMPORARY stand-in for the fused pykd.multi_teacher_kd_loss (branch `multi`), same signature;
replaced by the fused op at merge. Never lands on main."""
import torch

from .loss import kd_loss


def multi_teacher_kd_loss(student_logits, teacher_logits, weights=None, temperature=1.0,
                          reduction="batchmean", *, labels=None, ignore_index=-100):
    teachers = list(teacher_logits)
    weights = [1.0 / len(teachers)] * len(teachers) if weights is None else [float(w) for w in weights]
    return sum(w * kd_loss(student_logits, t, temperature, reduction, labels=labels,
                           ignore_index=ignore_index) for w, t in zip(weights, teachers))
