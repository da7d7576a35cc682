"""Runs every kernel path of pykd once, on small inputs, and checks each result in float64.

Written for compute-sanitizer (bench/gpu_check.py runs it under memcheck, racecheck, initcheck and
synccheck), so the sizes are small; it runs on the CPU too (--device cpu), which checks the same
paths against the CPU kernels without a GPU.

Each path is one entry of PATHS: a name, the API features it needs, and the cases it runs. A path
whose API is missing is reported as skipped with the reason (``hasattr`` / ``inspect.signature``
decide), so the script runs against today's pykd and picks up new losses by itself:
beta (divergences), labels/ignore_index (masked rows), KDLoss's fused cross-entropy,
pykd.hint_loss, pykd.sparse_kd_loss and pykd.FusedLinearKDLoss. A path that exists but whose
signature the script does not understand fails (never a silent gap): update its entry.

    python bench/gpu_exercise.py --dry-run            # the plan: features, paths, case counts
    python bench/gpu_exercise.py --device cpu         # every path on the CPU kernels
    python bench/gpu_exercise.py --json out.json      # the default device is cuda

Every case draws fresh random inputs (seeded per case), runs forward and backward through the
public API, and compares the loss and each gradient with a float64 reference computed on the CPU
from the same input values (tolerances by dtype, absolute ones relative to the largest expected
value). Exit status: 0 when every case that ran passed, 1 when one failed, 2 on a usage error.
"""
import argparse
import collections
import inspect
import json
import os
import sys
import time
import traceback
import zlib

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch

# Float64 reference tolerances (rtol, atol relative to the largest expected magnitude), by dtype.
# On top of these, each element may differ by 4 times the error of the same reference evaluated
# in float32 (the rounding that the float32 accumulation of any kernel cannot avoid: cancellation
# in a teacher gradient p_t * (log_ratio - KL), say). atol is two units in the last place of bf16
# and fp16, whose kernels may round intermediate values to the input dtype (the hard CE of KDLoss
# before the one-pass rewrite was torch's own, in bf16).
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 8e-3),
    torch.float16: (5e-3, 1e-3),
}
REDUCED = [torch.float32, torch.bfloat16, torch.float16]
ALL_DTYPES = [torch.float64, *REDUCED]
MIXED_PAIRS = [(a, b) for a in REDUCED for b in REDUCED if a != b]
# Row lengths for each CUDA row regime (csrc/cuda/kd_loss_common.cuh, choose_layout): 4, 32, 256
# and 1024 threads per row, scalar (odd C) and 16-byte (C a multiple of 8) variants of each.
SHORT = [1, 3, 10, 16, 64]
MEDIUM = [100, 1000, 2048, 4099]
LONG = [32000, 50257, 65536, 128256]
ROW_LENGTHS = SHORT + MEDIUM + LONG
FEW_LENGTHS = [1, 10, 1000, 4099, 50257]
IGNORE = -100


def rows_for(classes):
    """Several blocks of short rows, never a multiple of a block's rows; few long rows."""
    return 67 if classes <= 2048 else 9 if classes <= 32000 else 3


def short(dtype):
    return {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16",
            torch.float16: "f16"}[dtype]


def lower_precision(*dtypes):
    """The dtype whose tolerance applies to a result computed from all of them."""
    return max(dtypes, key=lambda d: TOLERANCES[d][0])


# ---------------------------------------------------------------------------------------------
# What the installed pykd offers.

def parameters(fn):
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


def detect_features():
    """{feature: (available, reason when not)} for the installed pykd."""
    try:
        import pykd
    except Exception as error:  # noqa: BLE001  (any import failure: report it, run nothing)
        return None, f"pykd is not importable: {type(error).__name__}: {error}"
    features = {}

    def add(name, ok, reason):
        features[name] = (bool(ok), "" if ok else reason)

    kd = getattr(pykd, "kd_loss", None)
    add("kd_loss", kd is not None, "pykd.kd_loss is missing")
    kd_params = parameters(kd) if kd is not None else {}
    add("beta", "beta" in kd_params, "pykd.kd_loss has no beta (divergence) parameter")
    add("labels", "labels" in kd_params and "ignore_index" in kd_params,
        "pykd.kd_loss has no labels / ignore_index parameters")
    kd_module = getattr(pykd, "KDLoss", None)
    add("KDLoss", kd_module is not None, "pykd.KDLoss is missing")
    add("KDLoss.beta", kd_module is not None and "beta" in parameters(kd_module),
        "pykd.KDLoss has no beta parameter (the fused one-pass KDLoss)")
    add("hint_loss", hasattr(pykd, "hint_loss"), "pykd.hint_loss is missing")
    add("sparse_kd_loss", hasattr(pykd, "sparse_kd_loss"), "pykd.sparse_kd_loss does not exist yet")
    add("FusedLinearKDLoss", hasattr(pykd, "FusedLinearKDLoss"),
        "pykd.FusedLinearKDLoss does not exist yet")
    return features, ""


def registered_ops():
    """{op name: {dispatch key: has kernel}} for every op in the pykd namespace."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pykd::"))
    return {n: {key: bool(has(n, key)) for key in ("CPU", "CUDA")} for n in names}


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the pykd ops that reach the dispatcher, by (op, device type)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(getattr(func, "_schema", None), "name", str(func))
        if name.startswith("pykd::"):
            devices = {a.device.type for a in _tensors(args) if isinstance(a, torch.Tensor)}
            self.counts[(name, "+".join(sorted(devices)) or "none")] += 1
        return func(*args, **kwargs)


def _tensors(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _tensors(v)
        else:
            yield v


# ---------------------------------------------------------------------------------------------
# Inputs and the float64 references.

class Ctx:
    def __init__(self, device, features, checks="full"):
        self.device = device
        self.features = features
        self.checks = checks  # "full": against the float64 reference; "light": run only

    def has(self, name):
        return self.features.get(name, (False, ""))[0]


def generator(label):
    return torch.Generator().manual_seed(zlib.crc32(label.encode()))


def make_logits(ctx, shape, dtype, gen, scale=3.0, wide=0, offset=0):
    """Random logits on the device. wide/offset: a [..., offset:offset+C] slice of rows C+wide long
    (unaligned rows when offset is odd, strided aligned rows when offset is 0)."""
    full = list(shape)
    full[-1] += wide
    x = (torch.randn(full, generator=gen) * scale).to(device=ctx.device, dtype=dtype)
    if wide:
        x = x[..., offset:offset + shape[-1]]
    return x


def make_labels(ctx, rows_shape, classes, gen, masked_fraction, ignore_index=IGNORE):
    """Random labels, round(masked_fraction * rows) of them ignore_index at random rows; a
    fraction strictly between 0 and 1 leaves at least one row masked and one valid."""
    labels = torch.randint(0, classes, rows_shape, generator=gen)
    flat = labels.view(-1)
    n = flat.numel()
    masked = round(masked_fraction * n)
    if 0 < masked_fraction < 1 and n >= 2:
        masked = min(max(masked, 1), n - 1)
    flat[torch.randperm(n, generator=gen)[:masked]] = ignore_index
    return labels.to(ctx.device)


def _safe_log(p, log_p):
    return torch.where(p > 0, log_p, torch.zeros_like(log_p))


def divergence_rows(s, t, temperature, beta, keep=None):
    """Per-row D_beta(p_t || p_s) of float64 [rows, C] logits, 0 * log 0 = 0, gradients finite."""
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if keep is not None:
        keep.update(ps=ps.detach(), pt=pt.detach(), log_ps=log_ps.detach(),
                    log_pt=log_pt.detach())
    zero = torch.zeros_like(ps)
    # Both logarithms masked where the selecting probability is 0: the branch torch.where drops
    # must stay finite, or its backward gives 0 * inf = NaN.
    if beta == 0:
        terms = torch.where(pt > 0, pt * (_safe_log(pt, log_pt) - _safe_log(pt, log_ps)), zero)
    elif beta == 1:
        terms = torch.where(ps > 0, ps * (_safe_log(ps, log_ps) - _safe_log(ps, log_pt)), zero)
    else:
        m = beta * pt + (1 - beta) * ps
        log_m = _safe_log(m, torch.log(torch.where(m > 0, m, torch.ones_like(m))))
        terms = beta * torch.where(pt > 0, pt * (_safe_log(pt, log_pt) - log_m), zero) + (
            1 - beta) * torch.where(ps > 0, ps * (_safe_log(ps, log_ps) - log_m), zero)
    return terms.sum(-1)


def reference_kd(s, t, temperature=1.0, reduction="batchmean", beta=0.0, labels=None,
                 ignore_index=IGNORE, soft_weight=1.0, hard_weight=0.0, mask_soft=True,
                 keep=None):
    """SPEC section 1 in float64 on float64 CPU leaves s, t: soft_weight * T^2 * D_beta +
    hard_weight * CE(s, labels), rows whose label is ignore_index adding 0, "batchmean" dividing
    by the valid rows (0 when there is none). mask_soft=False: the soft term over every row, divided
    by all rows (the KDLoss of before the one-pass rewrite). keep: a dict that receives the
    probabilities, their logarithms and the per-row soft terms (for rounding_slack)."""
    classes = s.shape[-1]
    rows_shape = s.shape[:-1]
    s2, t2 = s.reshape(-1, classes), t.reshape(-1, classes)
    n = s2.shape[0]
    soft = temperature**2 * divergence_rows(s2, t2, temperature, beta, keep)
    if keep is not None:
        keep["soft"] = soft
    if labels is None:
        valid = torch.ones(n, dtype=torch.bool, device=s.device)
    else:
        valid = labels.reshape(-1).to(s.device) != ignore_index
    count = valid.sum().clamp(min=1).double()
    if mask_soft:
        per_row = soft_weight * torch.where(valid, soft, torch.zeros_like(soft))
    else:
        per_row = soft_weight * soft
    if hard_weight:
        target = torch.where(valid, labels.reshape(-1).to(s.device),
                             torch.zeros_like(valid, dtype=torch.long))
        ce = -F.log_softmax(s2, dim=-1).gather(1, target[:, None])[:, 0]
        hard = hard_weight * torch.where(valid, ce, torch.zeros_like(ce))
    if reduction == "none":
        loss = per_row + (hard if hard_weight else 0)
        return loss.reshape(rows_shape)
    if reduction == "sum":
        return per_row.sum() + (hard.sum() if hard_weight else 0)
    soft_count = count if mask_soft else torch.tensor(float(max(n, 1)), dtype=torch.float64)
    loss = per_row.sum() / soft_count
    return loss + (hard.sum() / count if hard_weight else 0)


def rounding_slack(keep, row_weight, temperature, eps):
    """Elementwise allowance for the (student, teacher) gradients: the rounding a float32
    accumulation cannot avoid in p * (log p_t - log p_s - D_row) (a teacher gradient; the student's
    for beta > 0), whose terms can be far larger than the result (a row with one class: exactly 0
    from terms of size |log p_s|), 8 ulp of the terms' size, times the row's weight in the loss
    (d loss / d soft_row, so 0 for a masked row) and T."""
    pt, ps = keep["pt"], keep["ps"]
    size = (keep["log_pt"].abs() + keep["log_ps"].abs()).nan_to_num(posinf=0.0)
    size = size + (keep["soft"].detach() / temperature**2).abs()[:, None] + 1
    scale = 8 * eps * temperature * row_weight.detach().abs()[:, None]
    return [scale * (ps * size + pt), scale * (pt * size + ps)]


def leaf(x, requires_grad, dtype=torch.float64, device="cpu"):
    return x.detach().to(device=device, dtype=dtype).requires_grad_(requires_grad)


def leaf64(x, requires_grad):
    return leaf(x, requires_grad)


class CheckError(AssertionError):
    pass


def compare(name, actual, expected, dtype, zero_scale=1e-30, slack=None):
    """actual (device, any dtype) against expected (float64 CPU): shape, then each element within
    rtol * |expected| + atol * scale + slack, where scale is the largest finite |expected| (or
    zero_scale where every expected value is 0; 1e-30: exactly 0 is expected) and slack an
    elementwise allowance (see TOLERANCES). Equal infinities and NaN where NaN is expected pass."""
    if actual is None or expected is None:
        if actual is not expected:
            raise CheckError(f"{name}: expected {'no' if expected is None else 'a'} value, got "
                             f"{'none' if actual is None else tuple(actual.shape)}")
        return
    if tuple(actual.shape) != tuple(expected.shape):
        raise CheckError(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    rtol, atol = TOLERANCES[dtype]
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    finite = e[torch.isfinite(e)]
    largest = finite.abs().max().item() if finite.numel() else 1.0
    scale = largest if largest > 0 else zero_scale
    allowed = rtol * e.abs() + atol * scale
    if slack is not None:
        allowed = allowed + torch.nan_to_num(slack.detach().cpu().double().abs(), nan=0.0,
                                             posinf=0.0)
    diff = (a - e).abs()
    ok = (a == e) | (torch.isnan(a) & torch.isnan(e)) | (diff <= allowed)
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        where = tuple(bad[0].tolist())
        raise CheckError(
            f"{name} ({short(dtype)} tolerance, scale {scale:.3g}): {bad.shape[0]} of "
            f"{e.numel()} elements differ; at {where} got {a[where].item():.6g}, expected "
            f"{e[where].item():.6g} (allowed {allowed[where].item():.3g})")


def backward_and_grads(loss, upstream, inputs, retain_graph=False):
    """d (upstream . loss) / d inputs, None for an input that does not require grad."""
    wanted = [x for x in inputs if x.requires_grad]
    if not wanted:
        return [None] * len(inputs)
    grads = iter(torch.autograd.grad(loss, wanted, grad_outputs=upstream, allow_unused=True,
                                     retain_graph=retain_graph))
    return [next(grads) if x.requires_grad else None for x in inputs]


def upstream_like(loss, upstream, gen):
    """The upstream gradient for loss: a number (1 exactly, or another), or "rows": per-row
    weights where half the rows are exactly 1 (the in-place scaling skips those)."""
    if upstream == "rows":
        w = torch.rand(loss.shape, generator=gen, dtype=torch.float64) * 2
        w.view(-1)[::2] = 1.0
    else:
        w = torch.full(loss.shape, float(upstream), dtype=torch.float64)
    return w


# ---------------------------------------------------------------------------------------------
# The cases.

class Case:
    def __init__(self, label, fn):
        self.label = label
        self.fn = fn


def kd_case(label, *, shape, dtypes, temperature=2.0, beta=0.0, reduction="batchmean",
            grads=(True, True), masked_rows=None, ignore_index=IGNORE, upstream=1.0,
            slice_=None, teacher_minus_inf=False, both_minus_inf=False, student_inf=False,
            expect_inf=False, module=None):
    """One call of pykd.kd_loss (or of pykd.KDLoss when module = (soft, hard) weights), forward
    and backward, checked against reference_kd."""

    def run(ctx):
        import pykd

        gen = generator(label)
        ds, dt = dtypes
        classes = shape[-1]
        wide, offset = slice_ or (0, 0)
        s = make_logits(ctx, shape, ds, gen, wide=wide, offset=offset)
        t = make_logits(ctx, shape, dt, gen, wide=wide, offset=offset)
        if teacher_minus_inf or both_minus_inf:
            mask = torch.rand(shape, generator=gen) < 0.3
            rows = mask.reshape(-1, classes)
            rows[1::2, : classes - 1] = True  # long leading runs of -inf
            rows[2::3, : (classes * 3) // 4] = True
            rows[:, -1] = False  # never a whole row
            mask = mask.to(ctx.device)
            t = t.masked_fill(mask, float("-inf"))
            if both_minus_inf:
                s = s.masked_fill(mask, float("-inf"))
        if student_inf:  # the teacher gives mass where the student gives none: +inf
            s = s.clone()
            s.view(-1, classes)[0, classes // 2] = float("-inf")
        s = s.detach().requires_grad_(grads[0])
        t = t.detach().requires_grad_(grads[1])
        labels = None
        if masked_rows is not None:
            labels = make_labels(ctx, shape[:-1], classes, gen, masked_rows, ignore_index)
        if module is not None:
            soft_weight, hard_weight = module
            kwargs = dict(temperature=temperature, soft_weight=soft_weight,
                          hard_weight=hard_weight, ignore_index=ignore_index)
            if ctx.has("KDLoss.beta"):
                kwargs["beta"] = beta
            loss = pykd.KDLoss(**kwargs)(s, t, labels)
            ref_kwargs = dict(soft_weight=soft_weight, hard_weight=hard_weight,
                              mask_soft=ctx.has("KDLoss.beta"))
        else:
            kwargs = {}
            if ctx.has("beta"):
                kwargs["beta"] = beta
            elif beta != 0:
                raise CheckError("internal: a beta != 0 case in a path that does not need beta")
            if labels is not None:
                kwargs.update(labels=labels, ignore_index=ignore_index)
            loss = pykd.kd_loss(s, t, temperature, reduction, **kwargs)
            ref_kwargs = {}
        if ctx.checks == "light":  # run the kernels (for the sanitizers), check nothing
            if grads[0] or grads[1]:
                w = upstream_like(loss.detach().cpu(), upstream, gen)
                backward_and_grads(loss, w.to(device=loss.device, dtype=loss.dtype), [s, t])
            return
        ref_reduction = "batchmean" if module is not None else reduction
        # The reference in float64, and in float32 for the rounding allowance (TOLERANCES), on
        # the inputs' device (torch's own kernels; a GPU's float64 is fast).
        dev = s.device
        leaves = {d: (leaf(s, grads[0], d, dev), leaf(t, grads[1], d, dev))
                  for d in (torch.float64, torch.float32)}
        keep = {}
        refs = {d: reference_kd(*leaves[d], temperature, ref_reduction, beta, labels,
                                ignore_index, **ref_kwargs,
                                keep=keep if d == torch.float64 else None) for d in leaves}
        expected = refs[torch.float64]
        tol = lower_precision(ds, dt)
        # Rows whose label is ignore_index add exactly 0 and get exactly 0 gradients (SPEC 1);
        # KDLoss before the one-pass rewrite masked its hard term only.
        masked = None
        if labels is not None and (module is None or ctx.has("KDLoss.beta")):
            masked = (labels == ignore_index).reshape(-1).cpu()
        if expect_inf:
            if not (torch.isinf(loss).any().item() and torch.isinf(expected).any().item()):
                raise CheckError(f"loss: expected +inf, got {loss}")
        else:
            # An exactly-0 expected loss (all rows masked; C = 1) allows rounding at scale 1.
            compare("loss", loss, expected, lower_precision(tol, loss.dtype), zero_scale=1.0,
                    slack=4 * (refs[torch.float32].detach().double() - expected.detach()))
        if masked is not None and loss.dim() > 0 and (loss.detach().cpu().reshape(-1)[masked]
                                                      != 0).any():
            raise CheckError("loss: a masked row's loss is not exactly 0")
        if not (grads[0] or grads[1]):
            return
        w = upstream_like(expected, upstream, gen)
        got = backward_and_grads(loss, w.to(device=loss.device, dtype=loss.dtype), [s, t])
        want = {d: backward_and_grads(refs[d], w.to(device=dev, dtype=d), list(leaves[d]),
                                      retain_graph=d == torch.float64) for d in leaves}
        (row_weight,) = torch.autograd.grad(refs[torch.float64], [keep["soft"]],
                                            grad_outputs=w.to(dev), allow_unused=True)
        if row_weight is None:  # soft_weight 0
            row_weight = torch.zeros_like(keep["soft"])
        eps = 2.0**-52 if torch.float64 in (ds, dt) else 2.0**-23
        slacks = rounding_slack(keep, row_weight, temperature, eps)
        for k, (name, g, x) in enumerate(zip(("grad_student", "grad_teacher"), got, (s, t))):
            e, e32 = want[torch.float64][k], want[torch.float32][k]
            if e is not None:
                e32 = 4 * (e32.double() - e).abs() + slacks[k].reshape(e.shape)
            if g is not None and g.dtype != x.dtype:
                raise CheckError(f"{name}: dtype {g.dtype}, expected the input's {x.dtype}")
            # C = 1: p_s - p_t is 0 up to rounding; elsewhere an all-0 gradient must be exact.
            compare(name, g, e, x.dtype if e is not None else tol,
                    zero_scale=1.0 if classes == 1 else 1e-30,
                    slack=None if e is None else e32)
            if g is not None and masked is not None and masked.any():
                if (g.detach().cpu().reshape(-1, classes)[masked] != 0).any():
                    raise CheckError(f"{name}: a masked row's gradient is not exactly 0")

    return Case(label, run)


def kd_label(prefix, shape, dtypes, **extra):
    parts = [prefix, "x".join(map(str, shape)), "/".join(short(d) for d in dtypes)]
    parts += [f"{k}={v}" for k, v in extra.items()]
    return " ".join(parts)


def rows_cases(ctx):
    cases = []
    for dtype in ALL_DTYPES:
        for c in ROW_LENGTHS:
            shape = (rows_for(c), c)
            cases.append(kd_case(kd_label("kd", shape, (dtype, dtype)), shape=shape,
                                 dtypes=(dtype, dtype)))
    for dtype in (torch.float32, torch.bfloat16):  # token-level [B, L, V]
        cases.append(kd_case(kd_label("kd", (3, 5, 1000), (dtype, dtype)), shape=(3, 5, 1000),
                             dtypes=(dtype, dtype)))
    return cases


def gradient_choice_cases(ctx):
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for c in FEW_LENGTHS:
            shape = (rows_for(c), c)
            for grads in ((True, False), (False, True), (False, False)):
                wanted = ("s" if grads[0] else "") + ("t" if grads[1] else "") or "none"
                label = kd_label("kd", shape, (dtype, dtype), grads=wanted)
                cases.append(kd_case(label, shape=shape, dtypes=(dtype, dtype), grads=grads))
    return cases


def mixed_cases(ctx):
    cases = []
    for pair in MIXED_PAIRS:
        for c in FEW_LENGTHS + [128256]:
            shape = (rows_for(c), c)
            cases.append(kd_case(kd_label("kd", shape, pair), shape=shape, dtypes=pair))
    return cases


def slice_cases(ctx):
    cases = []
    pairs = [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16,) * 2,
             (torch.bfloat16, torch.float32)]
    for pair in pairs:
        for c in [1, 10, 16, 1000, 4099, 32000, 128256]:
            shape = (rows_for(c), c)
            for wide, offset, kind in ((5, 1, "unaligned"), (64, 0, "strided")):
                cases.append(kd_case(kd_label("kd", shape, pair, rows=kind), shape=shape,
                                     dtypes=pair, slice_=(wide, offset)))
    return cases


def masked_class_cases(ctx):
    cases = []
    for dtype in ALL_DTYPES:
        for c in [3, 10, 1000, 4099, 50257, 128256]:
            shape = (rows_for(c), c)
            cases.append(kd_case(kd_label("kd", shape, (dtype, dtype), teacher="-inf"),
                                 shape=shape, dtypes=(dtype, dtype), teacher_minus_inf=True))
    for dtype in (torch.float32, torch.bfloat16):
        for c in [10, 1000, 32000]:
            shape = (rows_for(c), c)
            cases.append(kd_case(kd_label("kd", shape, (dtype, dtype), student="-inf->inf"),
                                 shape=shape, dtypes=(dtype, dtype), student_inf=True,
                                 expect_inf=True))
    return cases


def masked_row_cases(ctx):
    cases = []
    for pair in [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16,) * 2,
                 (torch.float64,) * 2, (torch.bfloat16, torch.float32)]:
        for c in [1, 10, 1000, 4099, 50257]:
            shape = (rows_for(c), c)
            for fraction, what in ((0.25, "quarter"), (1.0, "all"), (0.0, "none")):
                for reduction in ("batchmean", "sum", "none"):
                    cases.append(kd_case(
                        kd_label("kd", shape, pair, masked=what, reduction=reduction),
                        shape=shape, dtypes=pair, masked_rows=fraction, reduction=reduction))
    shape = (2, 7, 1000)  # token-level with [B, L] labels, another ignore_index
    cases.append(kd_case(kd_label("kd", shape, (torch.bfloat16,) * 2, masked="quarter",
                                  ignore_index=-1),
                         shape=shape, dtypes=(torch.bfloat16,) * 2, masked_rows=0.25,
                         ignore_index=-1))
    return cases


def divergence_cases(ctx):
    cases = []
    for beta in (0.0, 0.5, 1.0, 0.1):
        for pair in [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16,) * 2,
                     (torch.float64,) * 2, (torch.bfloat16, torch.float32)]:
            for c in [1, 10, 64, 1000, 4099, 50257, 128256]:
                shape = (rows_for(c), c)
                cases.append(kd_case(kd_label("kd", shape, pair, beta=beta), shape=shape,
                                     dtypes=pair, beta=beta))
        for c in [10, 1000, 50257]:  # -inf at the same classes of both (a padded vocabulary)
            shape = (rows_for(c), c)
            cases.append(kd_case(kd_label("kd", shape, (torch.float32,) * 2, beta=beta,
                                          both="-inf"),
                                 shape=shape, dtypes=(torch.float32,) * 2, beta=beta,
                                 both_minus_inf=True))
        if ctx.has("labels"):
            shape = (rows_for(4099), 4099)
            cases.append(kd_case(kd_label("kd", shape, (torch.bfloat16,) * 2, beta=beta,
                                          masked="quarter"),
                                 shape=shape, dtypes=(torch.bfloat16,) * 2, beta=beta,
                                 masked_rows=0.25))
    return cases


def reduction_cases(ctx):
    cases = []
    for reduction in ("batchmean", "sum", "none"):
        for dtype in (torch.float32, torch.bfloat16):
            for c in [1, 10, 1000, 4099, 128256]:
                shape = (rows_for(c), c)
                cases.append(kd_case(kd_label("kd", shape, (dtype, dtype), reduction=reduction),
                                     shape=shape, dtypes=(dtype, dtype), reduction=reduction))
    return cases


def upstream_cases(ctx):
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for c in [10, 1000, 4099, 128256]:
            shape = (rows_for(c), c)
            for reduction, upstream in (("batchmean", 1.0), ("batchmean", 2.5), ("sum", -0.75),
                                        ("batchmean", 0.0), ("none", "rows"), ("none", 1.0)):
                cases.append(kd_case(
                    kd_label("kd", shape, (dtype, dtype), reduction=reduction, grad=upstream),
                    shape=shape, dtypes=(dtype, dtype), reduction=reduction, upstream=upstream))
    return cases


def kdloss_cases(ctx):
    cases = []
    betas = (0.0, 0.5, 1.0) if ctx.has("KDLoss.beta") else (0.0,)
    combos = [((0.25, "quarter"), (0.5, 0.5)), ((0.25, "quarter"), (0.0, 1.0)),
              ((0.25, "quarter"), (1.0, 0.0)), ((0.0, "none"), (0.5, 0.5))]
    if ctx.has("KDLoss.beta"):  # before the one-pass KDLoss, all-masked labels give NaN
        combos.append(((1.0, "all"), (0.5, 0.5)))
    for beta in betas:
        for pair in [(torch.float32,) * 2, (torch.bfloat16,) * 2,
                     (torch.bfloat16, torch.float32)]:
            for c in [2, 10, 1000, 4099, 50257]:
                shape = (rows_for(c), c)
                for (fraction, what), weights in combos:
                    cases.append(kd_case(
                        kd_label("KDLoss", shape, pair, beta=beta, masked=what, weights=weights),
                        shape=shape, dtypes=pair, beta=beta, masked_rows=fraction,
                        module=weights, temperature=4.0))
    return cases


def empty_cases(ctx):
    import pykd

    def run_empty(shape):
        def run(ctx):
            s = torch.randn(shape, device=ctx.device, requires_grad=True)
            t = torch.randn(shape, device=ctx.device, requires_grad=True)
            loss = pykd.kd_loss(s, t, 2.0, "sum")
            loss.backward()
            if loss.item() != 0 or s.grad.shape != s.shape or t.grad.shape != t.shape:
                raise CheckError(f"empty {shape}: loss {loss.item()}, grads {s.grad.shape}")
        return run

    return [Case(f"kd empty {'x'.join(map(str, shape))}", run_empty(shape))
            for shape in [(0, 10), (2, 0, 1000)]]


# Hint loss: pairs of any shapes, one launch for up to 64 pairs (csrc/cuda/hint_loss_cuda.cu).
HINT_SHAPES = [(2, 3, 5, 7), (4,), (1,), (3, 1000), (2, 16, 7, 7), (4097,), (65537,)]


def reference_hint(students, teachers, weights):
    return sum(w * ((s - t) ** 2).mean() for s, t, w in zip(students, teachers, weights))


def hint_case(label, shapes, dtypes, *, teacher_grad=False, weights=None, upstream=1.0,
              layout="contiguous"):
    def run(ctx):
        import pykd

        gen = generator(label)
        students, teachers = [], []
        for k, shape in enumerate(shapes):
            dtype = dtypes[k % len(dtypes)]
            pair = []
            for _ in range(2):
                x = torch.randn(shape, generator=gen).to(device=ctx.device, dtype=dtype)
                if layout == "channels_last" and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                elif layout == "transposed" and x.dim() >= 2:
                    x = x.transpose(-1, -2)
                pair.append(x)
            students.append(pair[0].detach().requires_grad_())
            teachers.append(pair[1].detach().requires_grad_(teacher_grad))
        w = weights(len(shapes)) if callable(weights) else None
        loss = pykd.hint_loss(students, teachers, w)
        g = torch.tensor(float(upstream), dtype=torch.float64)
        if ctx.checks == "light":
            backward_and_grads(loss, g.to(device=loss.device, dtype=loss.dtype),
                               students + teachers)
            return
        s64 = [leaf64(s, True) for s in students]
        t64 = [leaf64(t, teacher_grad) for t in teachers]
        expected = reference_hint(s64, t64, w or [1.0] * len(shapes))
        tol = lower_precision(*dtypes)
        compare("loss", loss, expected, lower_precision(tol, loss.dtype))
        got = backward_and_grads(loss, g.to(device=loss.device, dtype=loss.dtype),
                                 students + teachers)
        want = backward_and_grads(expected, g, s64 + t64)
        for k, (a, e, x) in enumerate(zip(got, want, students + teachers)):
            side = "student" if k < len(shapes) else "teacher"
            if a is not None and a.dtype != x.dtype:
                raise CheckError(f"grad {side}[{k % len(shapes)}]: dtype {a.dtype}, expected "
                                 f"{x.dtype}")
            compare(f"grad {side}[{k % len(shapes)}]", a, e, x.dtype)

    return Case(label, run)


def hint_cases(ctx):
    def random_weights(k):
        return [0.5 + 0.25 * i for i in range(k)]

    cases = []
    for dtype in ALL_DTYPES:
        cases.append(hint_case(f"hint 1 pair {short(dtype)}", [(3, 5)], [dtype]))
        cases.append(hint_case(f"hint mixed shapes {short(dtype)}", HINT_SHAPES, [dtype]))
        cases.append(hint_case(f"hint mixed shapes {short(dtype)} teacher grad, weights, grad=2.5",
                               HINT_SHAPES, [dtype], teacher_grad=True,
                               weights=random_weights, upstream=2.5))
    many = [((k % 7) + 1, 3 + k % 5) for k in range(70)]  # more pairs than one launch takes
    cases.append(hint_case("hint 70 pairs f32", many, [torch.float32], weights=random_weights))
    cases.append(hint_case("hint 70 pairs bf16 teacher grad", many, [torch.bfloat16],
                           teacher_grad=True))
    for layout in ("channels_last", "transposed"):
        for dtype in (torch.float32, torch.bfloat16):
            cases.append(hint_case(f"hint {layout} {short(dtype)}", HINT_SHAPES, [dtype],
                                   layout=layout))
    cases.append(hint_case("hint mixed dtypes across pairs", HINT_SHAPES[:4],
                           [torch.float32, torch.bfloat16]))
    return cases


# Losses that do not exist yet: called through their signature, checked for finite values and
# gradients of the right shapes (their numerics belong to the test suite).

def match_arguments(fn, offered):
    """Positional arguments for fn's required parameters from offered {keywords: value}, each
    matched when all of its keywords occur in the parameter's name; raises when one is left."""
    args, kwargs = [], {}
    for name, p in parameters(fn).items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = next((v for keys, v in offered if all(k in name.lower() for k in keys)), None)
        if value is None:
            if p.default is p.empty:
                raise CheckError(f"{getattr(fn, '__qualname__', fn)}{inspect.signature(fn)}: "
                                 f"no value for its parameter {name!r}; update gpu_exercise.py")
            continue
        if p.kind == p.KEYWORD_ONLY:
            kwargs[name] = value
        else:
            args.append(value)
    return args, kwargs


def check_finite_grads(loss, inputs):
    if not torch.isfinite(loss).all():
        raise CheckError(f"loss not finite: {loss}")
    loss.sum().backward()
    for k, x in enumerate(inputs):
        if x.grad is None or x.grad.shape != x.shape or not torch.isfinite(x.grad).all():
            raise CheckError(f"input {k}: gradient missing, misshapen or not finite")


def sparse_cases(ctx):
    import pykd

    def run_sparse(dtype, classes, k, exact):
        def run(ctx):
            gen = generator(f"sparse {dtype} {classes} {k}")
            rows = rows_for(classes)
            s = make_logits(ctx, (rows, classes), dtype, gen).requires_grad_()
            t = make_logits(ctx, (rows, classes), dtype, gen)
            values, indices = t.topk(min(k, classes), dim=-1)
            offered = [(("student",), s), (("value",), values), (("ind",), indices),
                       (("temperature",), 2.0)]
            if exact:
                offered.insert(0, (("lse",), torch.logsumexp(t.float() / 2.0, dim=-1)))
            args, kwargs = match_arguments(pykd.sparse_kd_loss, offered)
            check_finite_grads(pykd.sparse_kd_loss(*args, **kwargs), [s])
        return run

    exact_known = any("lse" in n for n in parameters(pykd.sparse_kd_loss))
    return [Case(f"sparse {short(d)} C={c} k={k}{' exact' if exact else ''}",
                 run_sparse(d, c, k, exact))
            for d in (torch.float32, torch.bfloat16) for c in (10, 1000, 50257)
            for k in (1, 8, 64) for exact in ((False, True) if exact_known else (False,))]


def fused_linear_cases(ctx):
    import pykd

    def run_fused(dtype, hidden, vocab, rows):
        def run(ctx):
            gen = generator(f"fused {dtype} {hidden} {vocab}")
            hs = make_logits(ctx, (rows, hidden), dtype, gen, scale=1.0).requires_grad_()
            ht = make_logits(ctx, (rows, hidden), dtype, gen, scale=1.0)
            ws = make_logits(ctx, (vocab, hidden), dtype, gen, scale=0.05).requires_grad_()
            wt = make_logits(ctx, (vocab, hidden), dtype, gen, scale=0.05)
            labels = make_labels(ctx, (rows,), vocab, gen, 0.25)
            module = pykd.FusedLinearKDLoss()
            offered = [(("student", "weight"), ws), (("teacher", "weight"), wt),
                       (("student",), hs), (("teacher",), ht), (("label",), labels)]
            args, kwargs = match_arguments(module.forward, offered)
            check_finite_grads(module(*args, **kwargs), [hs, ws])
        return run

    return [Case(f"fused linear {short(d)} H={h} V={v} N={n}", run_fused(d, h, v, n))
            for d in (torch.float32, torch.bfloat16)
            for h, v, n in ((64, 1000, 37), (128, 50257, 9))]


PATHS = [
    # name, features needed, case builder
    ("kd rows: every dtype x row length (short, medium, long rows; [B, L, V])", ("kd_loss",),
     rows_cases),
    ("kd gradients wanted: student only, teacher only, none (forward-only kernel)",
     ("kd_loss",), gradient_choice_cases),
    ("kd mixed dtype pairs", ("kd_loss",), mixed_cases),
    ("kd unaligned (slices) and strided aligned rows", ("kd_loss",), slice_cases),
    ("kd masked classes (-inf teacher logits; +inf loss)", ("kd_loss",), masked_class_cases),
    ("kd masked rows (labels == ignore_index: some, all, none) x reductions", ("labels",),
     masked_row_cases),
    ("kd divergences beta = 0, 0.5, 1, 0.1", ("beta",), divergence_cases),
    ("kd reductions none / sum / batchmean", ("kd_loss",), reduction_cases),
    ("kd upstream gradient 1 and not 1 (in-place scaling), per-row", ("kd_loss",),
     upstream_cases),
    ("KDLoss fused soft + hard cross-entropy", ("KDLoss",), kdloss_cases),
    ("kd empty inputs", ("kd_loss",), empty_cases),
    ("hint loss: mixed shapes, several pairs, >64 pairs, layouts", ("hint_loss",), hint_cases),
    ("sparse teacher (top-k)", ("sparse_kd_loss",), sparse_cases),
    ("fused linear (hidden states and output weights)", ("FusedLinearKDLoss",),
     fused_linear_cases),
]


# ---------------------------------------------------------------------------------------------

def plan(features, only):
    """[(name, needs, builder, missing reasons)] for the selected paths."""
    selected = []
    for name, needs, builder in PATHS:
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        missing = [features[n][1] for n in needs if not features[n][0]]
        selected.append((name, needs, builder, missing))
    return selected


def run_paths(ctx, selected, max_failures_shown, stop_after_s, progress=None):
    """Runs the selected paths; progress(results) after each (the JSON is rewritten, so that a
    run cut short keeps what it did)."""
    results = []
    start = time.monotonic()
    for name, needs, builder, missing in selected:
        if progress is not None:
            progress(results)
        entry = {"path": name, "needs": list(needs)}
        if missing:
            entry.update(status="skipped", reason="; ".join(missing))
            print(f"SKIP  {name}: {entry['reason']}", flush=True)
            results.append(entry)
            continue
        if stop_after_s and time.monotonic() - start > stop_after_s:
            entry.update(status="not run", reason=f"time limit of {stop_after_s} s reached")
            print(f"STOP  {name}: {entry['reason']}", flush=True)
            results.append(entry)
            continue
        t0 = time.monotonic()
        failures = []
        try:
            cases = builder(ctx)
        except Exception as error:  # noqa: BLE001
            cases = []
            failures.append({"case": "(building the cases)", "error": _describe(error)})
        for case in cases:
            try:
                case.fn(ctx)
            except Exception as error:  # noqa: BLE001  (record every failure, go on)
                failures.append({"case": case.label, "error": _describe(error)})
        if ctx.device == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception as error:  # noqa: BLE001
                failures.append({"case": "(synchronize)", "error": _describe(error)})
        entry.update(status="failed" if failures else "passed", cases=len(cases),
                     failed=len(failures), seconds=round(time.monotonic() - t0, 2),
                     failures=failures[:50])
        tag = "FAIL" if failures else "PASS"
        print(f"{tag}  {name}: {len(cases)} cases, {len(failures)} failed, "
              f"{entry['seconds']:.1f} s", flush=True)
        for f in failures[:max_failures_shown]:
            print(f"        {f['case']}: {f['error']}", flush=True)
        results.append(entry)
    return results


def _describe(error):
    if isinstance(error, CheckError):
        return str(error)
    last = traceback.extract_tb(error.__traceback__)[-1]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''} ({os.path.basename(last.filename)}" \
           f":{last.lineno})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the features found and the plan (paths, cases), run nothing")
    parser.add_argument("--only", action="append", default=[],
                        help="run only paths whose name contains this text (repeatable)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--label", default="", help="a name for this run, kept in the JSON")
    parser.add_argument("--max-seconds", type=float, default=0,
                        help="start no new path after this many seconds (0: no limit)")
    parser.add_argument("--show", type=int, default=5, help="failures printed per path")
    parser.add_argument("--checks", choices=["full", "light"], default="full",
                        help="full: every result against the float64 reference; light: run the "
                             "kernels only (under a sanitizer, after a full run on the same "
                             "inputs, which every case draws from its own seed)")
    args = parser.parse_args(argv)

    features, error = detect_features()
    report = {"label": args.label, "device": args.device, "checks": args.checks,
              "torch": torch.__version__,
              "features": {}, "paths": []}
    if features is None:
        print(error)
        features = {n: (False, error) for n in ("kd_loss", "beta", "labels", "KDLoss",
                                                  "KDLoss.beta", "hint_loss", "sparse_kd_loss",
                                                  "FusedLinearKDLoss")}
    report["features"] = {n: {"available": ok, "reason": why} for n, (ok, why) in features.items()}
    selected = plan(features, args.only)
    ctx = Ctx(args.device, features, args.checks)

    if args.dry_run:
        print("pykd features: " + ", ".join(f"{n}={'yes' if ok else 'no'}"
                                              for n, (ok, _) in features.items()))
        total = 0
        for name, needs, builder, missing in selected:
            if missing:
                print(f"  skip  {name}: {'; '.join(missing)}")
                report["paths"].append({"path": name, "status": "skipped",
                                        "reason": "; ".join(missing)})
                continue
            try:
                count = len(builder(ctx))
            except Exception as error:  # noqa: BLE001
                print(f"  error {name}: {_describe(error)}")
                report["paths"].append({"path": name, "status": "failed",
                                        "reason": _describe(error)})
                continue
            total += count
            print(f"  run   {name}: {count} cases")
            report["paths"].append({"path": name, "status": "planned", "cases": count})
        print(f"{total} cases in {sum(1 for *_, m in selected if not m)} paths")
        _write(args.json, report)
        return 0

    if error:
        _write(args.json, {**report, "error": error})
        return 1
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("gpu_exercise.py: --device cuda, but torch sees no CUDA GPU")
            return 2
        report["gpu"] = torch.cuda.get_device_name()
    ops = registered_ops()
    report["ops_registered"] = ops
    key = "CUDA" if args.device == "cuda" else "CPU"
    missing_kernels = [n for n, keys in ops.items() if not keys[key]]
    if not ops or (args.device == "cuda" and missing_kernels == list(ops)):
        print(f"gpu_exercise.py: pykd registered no {key} kernels ({sorted(ops)}); build it "
              "with its CUDA kernels first")
        _write(args.json, {**report, "error": f"no {key} kernels"})
        return 1

    counter = None
    try:
        counter = OpCounter()
        counter.__enter__()
    except Exception as error:  # noqa: BLE001  (counting is a report, never a reason to stop)
        print(f"(op counting unavailable: {error})")
        counter = None
    t0 = time.monotonic()
    try:
        report["paths"] = run_paths(ctx, selected, args.show, args.max_seconds,
                                    lambda done: _write(args.json, {**report, "paths": done,
                                                                    "partial": True}))
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
    report["seconds"] = round(time.monotonic() - t0, 1)
    if counter is not None:
        seen = {f"{n} [{d}]": c for (n, d), c in sorted(counter.counts.items())}
        report["ops_seen"] = seen
        called = {n for (n, d) in counter.counts if d == args.device}
        report["ops_never_seen_on_device"] = [n for n in ops if n not in called]
        print("pykd ops seen: " + (", ".join(f"{k} x{v}" for k, v in seen.items()) or "none"))
        if report["ops_never_seen_on_device"]:
            print("pykd ops registered but never seen on the device (not called by these paths, "
                  "or called on autograd's own thread, which a dispatch mode may not see): "
                  + ", ".join(report["ops_never_seen_on_device"]))
    failed = [p for p in report["paths"] if p["status"] == "failed"]
    skipped = [p for p in report["paths"] if p["status"] in ("skipped", "not run")]
    ran = [p for p in report["paths"] if p["status"] in ("passed", "failed")]
    cases = sum(p.get("cases", 0) for p in ran)
    print(f"{len(ran)} paths, {cases} cases on {args.device} in {report['seconds']} s: "
          f"{len(failed)} paths failed, {len(skipped)} skipped"
          + (" (" + "; ".join(p["path"].split(":")[0] for p in skipped) + ")" if skipped else ""))
    _write(args.json, report)
    return 1 if failed else 0


def _write(path, report):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
            f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
