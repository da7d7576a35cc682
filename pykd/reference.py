"""Pure-PyTorch references for every pykd op, used by the tests and the benchmarks alike."""
import torch
import torch.nn.functional as F


def kd_loss(student_logits, teacher_logits, temperature=1.0, reduction="batchmean"):
    """SPEC section 1 term by term, in float64, returned in the logits' dtype.

    log_softmax keeps -inf logits exact; where the teacher gives a class no mass the term is 0.
    """
    dtype = student_logits.dtype
    s = student_logits.double() / temperature
    t = teacher_logits.double() / temperature
    log_ps, log_pt = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    pt = log_pt.exp()
    # Masking the log-ratio (not the product) keeps the gradient free of 0 * inf as well.
    log_ratio = torch.where(pt > 0, log_pt - log_ps, torch.zeros_like(pt))
    kl_rows = (pt * log_ratio).sum(-1)
    loss = kl_rows * temperature**2
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "batchmean":
        loss = loss.sum() / kl_rows.numel()
    return loss.to(dtype)


def tutorial_kd_loss(student_logits, teacher_logits, temperature=1.0):
    """The PyTorch knowledge-distillation tutorial's soft-target loss, as written there."""
    soft_targets = F.softmax(teacher_logits / temperature, dim=-1)
    soft_prob = F.log_softmax(student_logits / temperature, dim=-1)
    rows = soft_prob.numel() // soft_prob.shape[-1]
    return (
        torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / rows * temperature**2
    )


def kl_div_kd_loss(student_logits, teacher_logits, temperature=1.0):
    """The same loss through F.kl_div on log-probabilities (log_target=True)."""
    classes = student_logits.shape[-1]
    log_ps = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.reshape(-1, classes) / temperature, dim=-1)
    return (
        F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temperature**2
    )


def hint_loss(student_features, teacher_features, weights=None):
    """The feature-hint loss as a Python loop of F.mse_loss: sum_k w_k * mean((s_k - t_k)^2)."""
    if weights is None:
        weights = [1.0] * len(student_features)
    return sum(
        w * F.mse_loss(s, t) for s, t, w in zip(student_features, teacher_features, weights)
    )
