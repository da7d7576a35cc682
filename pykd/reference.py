"""Pure-PyTorch references for every pykd op, used by the tests and the benchmarks alike."""
import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits, teacher_logits, temperature=1.0, reduction="batchmean", *,
            beta=0.0, labels=None, ignore_index=-100, soft_weight=1.0, hard_weight=0.0):
    """SPEC section 1 term by term, in float64 (differentiable), returned in the promoted dtype.

    Row loss = soft_weight * T^2 * D_beta + hard_weight * cross_entropy(student, labels); rows
    whose label is ignore_index give 0; "batchmean" divides by the number of valid rows (1 if
    none). log_softmax keeps -inf logits exact; a class of probability 0 adds 0 (0 * log 0 = 0).
    """
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    s = student_logits.double()
    t = teacher_logits.double()
    log_ps, log_pt = F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()

    def kl(p, log_p, log_q):  # sum p (log p - log q), masking the log-ratio where p = 0
        zero = torch.zeros_like(p)
        return (p * torch.where(p > 0, log_p - log_q, zero)).sum(-1)

    if beta == 0:
        divergence = kl(pt, log_pt, log_ps)
    elif beta == 1:
        divergence = kl(ps, log_ps, log_pt)
    else:
        m = beta * pt + (1 - beta) * ps  # where it underflows, log m from the log-probabilities
        log_m = torch.where(m > 0, torch.log(torch.where(m > 0, m, 1.0)),  # no NaN in autograd
                            torch.logaddexp(math.log(beta) + log_pt, math.log1p(-beta) + log_ps))
        divergence = beta * kl(pt, log_pt, log_m) + (1 - beta) * kl(ps, log_ps, log_m)
    rows = soft_weight * temperature**2 * divergence
    if hard_weight != 0:
        safe = torch.where(labels == ignore_index, torch.zeros_like(labels), labels)
        ce = torch.logsumexp(s, -1) - s.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        rows = rows + hard_weight * ce
    valid = None if labels is None else labels != ignore_index
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        count = max(rows.numel(), 1) if valid is None else valid.sum().clamp(min=1)
        loss = rows.sum() / count
    return loss.to(dtype)


def _masked_batchmean(rows, labels, ignore_index):
    """sum over the rows whose label is not ignore_index, divided by their number (0 if none)."""
    valid = labels != ignore_index
    return torch.where(valid, rows, torch.zeros_like(rows)).sum() / valid.sum().clamp(min=1)


def tutorial_kd_loss(student_logits, teacher_logits, temperature=1.0, labels=None,
                     ignore_index=-100):
    """The PyTorch knowledge-distillation tutorial's soft-target loss, as written there; with
    labels, its per-row terms masked as for token-level distillation."""
    soft_targets = F.softmax(teacher_logits / temperature, dim=-1)
    soft_prob = F.log_softmax(student_logits / temperature, dim=-1)
    terms = soft_targets * (soft_targets.log() - soft_prob)
    if labels is not None:
        return _masked_batchmean(terms.sum(-1), labels, ignore_index) * temperature**2
    rows = soft_prob.numel() // soft_prob.shape[-1]
    return torch.sum(terms) / rows * temperature**2


def kl_div_kd_loss(student_logits, teacher_logits, temperature=1.0, labels=None,
                   ignore_index=-100):
    """The same loss through F.kl_div on log-probabilities (log_target=True); with labels,
    F.kl_div's per-element terms summed per row and masked."""
    classes = student_logits.shape[-1]
    log_ps = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_logits.reshape(-1, classes) / temperature, dim=-1)
    if labels is not None:
        rows = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
        return _masked_batchmean(rows, labels.reshape(-1), ignore_index) * temperature**2
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


def sparse_kd_loss(student_logits, teacher_values, teacher_indices, temperature=1.0,
                   reduction="batchmean", *, teacher_lse=None, labels=None, ignore_index=-100):
    """pykd.sparse_kd_loss from its formulas, in float64 (differentiable in the student),
    returned in promote_types(student, values). q, the student's mass outside the named classes,
    is the log-sum-exp of its log-probabilities over those classes; repeated indices are separate
    entries."""
    dtype = torch.promote_types(student_logits.dtype, teacher_values.dtype)
    s, v, idx = student_logits.double(), teacher_values.double(), teacher_indices.long()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    if teacher_lse is None:
        log_p = F.log_softmax(v / temperature, dim=-1)
    else:
        log_p = v / temperature - teacher_lse.double().unsqueeze(-1)
    p = log_p.exp()
    log_ps_k = log_ps.gather(-1, idx)
    rows = torch.where(p > 0, p * (log_p - log_ps_k), torch.zeros_like(p)).sum(-1)
    if teacher_lse is not None:
        named = torch.zeros_like(s, dtype=torch.bool).scatter(-1, idx, True)
        every_class = named.all(-1)
        r = torch.where(every_class, 0.0, (1 - p.sum(-1)).clamp(min=0))
        # Rows without a tail take the unmasked log-sum-exp (0): its value is not used, and its
        # gradient stays finite.
        tail_classes = named & ~every_class.unsqueeze(-1)
        log_q = torch.logsumexp(log_ps.masked_fill(tail_classes, -math.inf), dim=-1)
        safe_r = torch.where(r > 0, r, 1.0)
        rows = rows + torch.where(r > 0, r * (torch.log(safe_r) - log_q), torch.zeros_like(r))
    rows = temperature**2 * rows
    valid = None if labels is None else labels != ignore_index
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        count = max(rows.numel(), 1) if valid is None else valid.sum().clamp(min=1)
        loss = rows.sum() / count
    return loss.to(dtype)


def multi_teacher_kd_loss(student_logits, teacher_logits, weights=None, temperature=1.0,
                          reduction="batchmean", *, labels=None, ignore_index=-100):
    """sum_k w_k * T^2 * KL(p_tk || p_s) per row, term by term in float64 (differentiable),
    returned in the promoted dtype; masks and reductions as kd_loss's above. teacher_logits: a
    stacked [K, ...] tensor or a list; weights default to 1/K."""
    teachers = list(teacher_logits)
    if weights is None:
        weights = [1.0 / len(teachers)] * len(teachers)
    dtype = torch.promote_types(student_logits.dtype, teachers[0].dtype)
    log_ps = F.log_softmax(student_logits.double() / temperature, dim=-1)
    rows = 0
    for w, t in zip(weights, teachers):
        log_pt = F.log_softmax(t.double() / temperature, dim=-1)
        pt = log_pt.exp()
        terms = pt * torch.where(pt > 0, log_pt - log_ps, torch.zeros_like(pt))  # 0 * log 0 = 0
        rows = rows + float(w) * temperature**2 * terms.sum(-1)
    valid = None if labels is None else labels != ignore_index
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        count = max(rows.numel(), 1) if valid is None else valid.sum().clamp(min=1)
        loss = rows.sum() / count
    return loss.to(dtype)


def eager_sparse_kd_loss(student_logits, teacher_values, teacher_indices, temperature=1.0,
                         teacher_lse=None):
    """The sparse-teacher loss as one writes it in eager PyTorch (gather + log_softmax), in the
    inputs' dtypes, "batchmean" over all rows; with teacher_lse the tail bucket's q as
    1 - sum of the gathered student probabilities. The benchmarks' baseline."""
    log_ps = F.log_softmax(student_logits / temperature, dim=-1).gather(-1, teacher_indices.long())
    if teacher_lse is None:
        log_p = F.log_softmax(teacher_values / temperature, dim=-1)
    else:
        log_p = teacher_values / temperature - teacher_lse.unsqueeze(-1)
    p = log_p.exp()
    rows = (p * (log_p - log_ps)).sum(-1)
    if teacher_lse is not None:
        r = (1 - p.sum(-1)).clamp(min=1e-12)
        q = (1 - log_ps.exp().sum(-1)).clamp(min=1e-12)
        rows = rows + r * (r.log() - q.log())
    return rows.sum() / max(rows.numel(), 1) * temperature**2
