"""CUDA-specific tests of pykd::kd_loss: every dtype pair, every divergence, every path of the row
kernel (rows staged in shared memory and the long-row path, aligned and misaligned rows, masked
rows and classes, one class, the hard-label cross-entropy), reductions, extreme values, CUDA
graphs and torch.compile, each against the CPU kernel on the same inputs and against the float64
reference. The generic test matrix (test_kd_loss.py) covers the API on every device.

Which path a shape takes (csrc/cuda/kd_loss_rows.cuh): rows up to ~5600 classes of a float32 pair
(~11000 of a 16-bit pair, ~1400 of float64) are staged in shared memory; longer rows (32001,
50257, 128256 here, and float64 rows of 2000) are read again from global memory/L2.

With PYKD_EMULATED_CUDA=forward|reverse|shuffled (see conftest.py) the same tests run the CUDA
drivers and kernels on the host instead (tests/emulated_cuda: CPU tensors, the "device" results
from the CUDA code, the "cpu" ones from the CPU kernels), except those that need a GPU (CUDA
graphs, torch.compile, devices, device-side asserts in a child process, 2^31 elements)."""
import contextlib
import os

import pytest
import torch

import pykd
from emulated_cuda import build as emulated_cuda
from pykd import ops, reference
from testing import TOLERANCES, cuda_kernels_built, run_python

EMULATED = os.environ.get("PYKD_EMULATED_CUDA")
DEVICE = "cpu" if EMULATED else "cuda"
if EMULATED:
    pytestmark = pytest.mark.skipif(
        emulated_cuda.cuda_include_dir() is None,
        reason="emulated CUDA needs the CUDA toolkit's headers (CUDA_HOME)")
else:
    pytestmark = pytest.mark.skipif(
        not (torch.cuda.is_available() and cuda_kernels_built()),
        reason="needs a CUDA GPU and pykd built with its CUDA kernels",
    )
gpu_only = pytest.mark.skipif(bool(EMULATED), reason="needs a GPU (not emulated)")


def device_kernels():
    """Where the pykd ops called within run their CUDA kernels: on the GPU, or emulated."""
    if not EMULATED:
        return contextlib.nullcontext()
    return emulated_cuda.emulated()

REDUCED = [torch.float32, torch.bfloat16, torch.float16]
# Every (student, teacher) pair the op accepts.
DTYPE_PAIRS = [(a, b) for a in REDUCED for b in REDUCED] + [(torch.float64, torch.float64)]
# A few pairs for the wider matrices: same dtype, mixed widths, float64.
SOME_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.bfloat16),
    (torch.float64, torch.float64),
]
BETAS = [0.0, 0.1, 0.5, 1.0]
GRADS = [(True, False), (False, True), (True, True), (False, False)]


def pair_id(pair):
    return "-".join(str(d).removeprefix("torch.") for d in pair)


def rows_for(classes):
    """Several blocks of short rows (not a multiple of a block's rows), few long rows."""
    return 67 if classes <= 1000 else 9 if classes <= 32001 else 3


def logits(shape, dtype, scale=3.0, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(shape, generator=gen, device=DEVICE) * scale).to(dtype)


def random_labels(rows, classes, masked=0.25, ignore_index=-100, seed=3):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=gen, device=DEVICE)
    drop = torch.rand(rows, generator=gen, device=DEVICE) < masked
    return torch.where(drop, torch.full_like(labels, ignore_index), labels)


def raw_kd_loss(s, t, labels=None, temperature=2.0, beta=0.0, soft_weight=1.0, hard_weight=0.0,
                ignore_index=-100, reduction="batchmean", grads=(True, True)):
    """The op's CUDA kernel."""
    with device_kernels():
        return ops.kd_loss(s, t, labels, temperature, beta, soft_weight, hard_weight,
                           ignore_index, reduction, *grads)


def cpu_kd_loss(s, t, labels=None, temperature=2.0, beta=0.0, soft_weight=1.0, hard_weight=0.0,
                ignore_index=-100, reduction="batchmean", grads=(True, True)):
    """The op's CPU kernel, on copies of the inputs."""
    labels = None if labels is None else labels.cpu()
    return ops.kd_loss(s.cpu(), t.cpu(), labels, temperature, beta, soft_weight, hard_weight,
                       ignore_index, reduction, *grads)


def reference_kd_loss(s, t, labels=None, temperature=2.0, beta=0.0, soft_weight=1.0,
                      hard_weight=0.0, ignore_index=-100, reduction="batchmean"):
    """The float64 loss and its gradients (of each row's loss for "none") from the same values."""
    s64 = s.detach().double().cpu().requires_grad_()
    t64 = t.detach().double().cpu().requires_grad_()
    loss = reference.kd_loss(
        s64, t64, temperature, reduction, beta=beta,
        labels=None if labels is None else labels.cpu(), ignore_index=ignore_index,
        soft_weight=soft_weight, hard_weight=hard_weight)
    finite = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))
    grad_s, grad_t = torch.autograd.grad(finite.sum(), [s64, t64], allow_unused=True)
    return loss.detach(), grad_s, grad_t


def finite_max(x):
    x = x.detach().double().cpu()
    x = x[torch.isfinite(x)]
    return x.abs().max().item() if x.numel() else 0.0


def compare(name, actual, expected, tol_dtype, scale, floor):
    """assert_close with tol_dtype's tolerances; the absolute one relative to the largest finite
    expected value and never below `floor` (the rounding of a float32 kernel where the expected
    value is exactly 0)."""
    rtol, atol = TOLERANCES[tol_dtype]
    try:
        torch.testing.assert_close(
            actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol,
            atol=max(atol * max(scale, 1e-30), floor), equal_nan=True)
    except AssertionError as error:
        raise AssertionError(f"{name}: {error}") from None


def check(s, t, labels=None, temperature=2.0, beta=0.0, soft_weight=1.0, hard_weight=0.0,
          ignore_index=-100, reduction="batchmean", grads=(True, True), reference_grads=True):
    """CUDA against the CPU kernel on the same inputs and against the float64 reference (its
    gradients too unless reference_grads is False); checks the outputs' dtypes and shapes.
    Returns the CUDA outputs."""
    kwargs = dict(temperature=temperature, beta=beta, soft_weight=soft_weight,
                  hard_weight=hard_weight, ignore_index=ignore_index, reduction=reduction)
    loss, grad_s, grad_t = raw_kd_loss(s, t, labels, grads=grads, **kwargs)
    cpu = cpu_kd_loss(s, t, labels, grads=grads, **kwargs)
    loss_dtype = torch.promote_types(s.dtype, t.dtype)
    assert loss.dtype == loss_dtype and loss.device == s.device
    assert loss.shape == (s.shape[:-1] if reduction == "none" else ())
    for grad, x, wanted in ((grad_s, s, grads[0]), (grad_t, t, grads[1])):
        assert grad.dtype == x.dtype and grad.device == x.device
        assert grad.shape == (x.shape if wanted else (0,))
        if wanted:
            assert grad.is_contiguous()

    # The rounding of the accumulation dtype where an expected value is exactly 0: a
    # log-probability is good to about eps * max|logit| / T, so a probability to that much, the
    # soft gradient (T * soft_weight / D * p) and the cross-entropy's (hard_weight / D * p) to
    # eps * max|logit| times their weights / D, a row's divergence (T^2 * soft_weight * ...) to
    # T * soft_weight * eps * max|logit|.
    eps = torch.finfo(ops.accumulation_dtype(s.dtype)).eps
    magnitude = max(finite_max(s), finite_max(t), 1.0)
    rows = 1 if reduction != "batchmean" else max(
        1, s[..., 0].numel() if labels is None else int((labels != ignore_index).sum()))
    loss_floor = 16 * eps * magnitude * (soft_weight * temperature + hard_weight)
    grad_floor = 16 * eps * magnitude * (soft_weight + hard_weight) / rows
    for where, (e_loss, e_s, e_t) in [("cpu", cpu), ("reference", reference_kd_loss(s, t, labels,
                                                                                 **kwargs))]:
        compare(f"loss vs {where}", loss, e_loss, loss_dtype, finite_max(e_loss), loss_floor)
        if where == "reference" and not reference_grads:
            continue
        if grads[0]:
            compare(f"grad_student vs {where}", grad_s, e_s, s.dtype, finite_max(e_s), grad_floor)
        if grads[1]:
            compare(f"grad_teacher vs {where}", grad_t, e_t, t.dtype, finite_max(e_t), grad_floor)
    return loss, grad_s, grad_t


# ---- dtypes, row lengths, layouts ----

@pytest.mark.parametrize("classes", [2, 3, 10, 100, 1000, 4099, 32001])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_dtype_pairs_and_row_lengths(pair, classes):
    rows = rows_for(classes)
    check(logits((rows, classes), pair[0]), logits((rows, classes), pair[1], seed=1))


@pytest.mark.parametrize("classes", [50257, 128256])
@pytest.mark.parametrize("pair", SOME_PAIRS[:3], ids=pair_id)
def test_vocabulary_sized_rows(pair, classes):
    # Token-level distillation rows: the long-row path, with a scalar head and tail on most rows
    # (50257 is odd: consecutive rows start at every alignment).
    check(logits((3, classes), pair[0]), logits((3, classes), pair[1], seed=1), temperature=1.0)


@pytest.mark.parametrize("classes", [1500, 2000, 3000])
def test_float64_rows_on_both_paths(classes):
    # float64 rows of 1500-2048 and over ~2800 classes are not staged in shared memory.
    check(logits((5, classes), torch.float64), logits((5, classes), torch.float64, seed=1))


@pytest.mark.parametrize("classes", [10, 1000, 4099, 32001, 50257])
@pytest.mark.parametrize("pair", SOME_PAIRS, ids=pair_id)
def test_misaligned_slices(pair, classes):
    # Rows starting 1 and 3 elements into wider tensors: the student and the teacher have
    # different alignments, and neither agrees with the contiguous gradients.
    rows = rows_for(classes)
    s = logits((rows, classes + 7), pair[0])[:, 1 : classes + 1]
    t = logits((rows, classes + 7), pair[1], seed=1)[:, 3 : classes + 3]
    assert not s.is_contiguous() and not t.is_contiguous()
    check(s, t)


@pytest.mark.parametrize("classes", [16, 1000, 32000])
@pytest.mark.parametrize("pair", SOME_PAIRS, ids=pair_id)
def test_aligned_strided_rows(pair, classes):
    # Aligned rows with a stride longer than the row (a padded vocabulary): the logits are
    # aligned, the gradients of 32000 classes too; 1000 + 64 keeps every row aligned.
    rows = rows_for(classes)
    s = logits((rows, classes + 64), pair[0])[:, :classes]
    t = logits((rows, classes + 64), pair[1], seed=1)[:, 64:]
    check(s, t)


@pytest.mark.parametrize("pair", SOME_PAIRS, ids=pair_id)
def test_other_layouts(pair):
    # Token-level [B, L, V] logits, a transposed (column-strided) student that as_rows copies,
    # a broadcast teacher (row stride 0).
    check(logits((3, 5, 1000), pair[0]), logits((3, 5, 1000), pair[1], seed=1))
    check(logits((1000, 37), pair[0]).t(), logits((37, 1000), pair[1], seed=1))
    check(logits((37, 1000), pair[0]), logits((1, 1000), pair[1], seed=1).expand(37, 1000),
          grads=(True, False))


# ---- the family: divergences, gradients, masks, hard labels ----

@pytest.mark.parametrize("grads", GRADS, ids=lambda g: f"s{int(g[0])}t{int(g[1])}")
@pytest.mark.parametrize("classes", [10, 1000, 32001])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("pair", SOME_PAIRS, ids=pair_id)
def test_divergences_and_gradients(pair, beta, classes, grads):
    rows = rows_for(classes)
    s, t = logits((rows, classes), pair[0]), logits((rows, classes), pair[1], seed=1)
    check(s, t, beta=beta, grads=grads)
    check(s, t, random_labels(rows, classes), beta=beta, grads=grads, temperature=4.0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("classes", [10, 1000, 32001])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("pair", SOME_PAIRS, ids=pair_id)
def test_hard_label_cross_entropy(pair, beta, classes, temperature, reduction):
    # soft_weight * T^2 * D + hard_weight * CE in one kernel: at T = 1 the cross-entropy's softmax
    # is the student's, at T = 4 its own (a second log-sum-exp in the same read).
    rows = rows_for(classes)
    s, t = logits((rows, classes), pair[0]), logits((rows, classes), pair[1], seed=1)
    labels = random_labels(rows, classes)
    check(s, t, labels, temperature=temperature, beta=beta, soft_weight=0.3, hard_weight=0.7,
          reduction=reduction)
    # The cross-entropy alone (soft_weight 0 drops the divergence) equals F.cross_entropy.
    loss = raw_kd_loss(s, t, labels, temperature=temperature, soft_weight=0.0, hard_weight=1.0,
                       reduction="sum", grads=(False, False))[0]
    expected = torch.nn.functional.cross_entropy(
        s.double(), labels, ignore_index=-100, reduction="sum")
    compare("cross_entropy", loss, expected, loss.dtype, expected.abs().item(), 0.0)


@pytest.mark.parametrize("module_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kdloss_module(module_dtype):
    # KDLoss: one fused call, masked tokens ignored by both terms.
    s = logits((4, 33, 1000), module_dtype).requires_grad_()
    t = logits((4, 33, 1000), module_dtype, seed=1)
    labels = random_labels(4 * 33, 1000).view(4, 33)
    with device_kernels():
        loss = pykd.KDLoss(temperature=4.0, soft_weight=0.5, hard_weight=0.5)(s, t, labels)
        loss.backward()
    s64 = s.detach().double().requires_grad_()
    expected = reference.kd_loss(s64, t.double(), 4.0, labels=labels, soft_weight=0.5,
                                 hard_weight=0.5)
    expected.backward()
    compare("loss", loss, expected, module_dtype, expected.abs().item(), 0.0)
    compare("grad", s.grad, s64.grad, module_dtype, s64.grad.abs().max().item(), 0.0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("pair", SOME_PAIRS, ids=pair_id)
def test_reductions(pair, reduction):
    s, t = logits((3, 5, 1000), pair[0]), logits((3, 5, 1000), pair[1], seed=1)
    check(s, t, reduction=reduction, beta=0.5)
    check(s, t, random_labels(15, 1000).view(3, 5), reduction=reduction)


@pytest.mark.parametrize("classes", [10, 1000, 4099, 128256])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("pair", SOME_PAIRS[:3], ids=pair_id)
def test_masked_teacher_classes(pair, beta, classes):
    # Classes the teacher rules out (-inf), scattered and in long leading runs (a thread, a warp
    # or the first chunks of a long row see nothing but -inf), never a whole row.
    rows = rows_for(classes)
    t = logits((rows, classes), pair[1], seed=1)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    t[torch.rand(t.shape, generator=gen, device=DEVICE) < 0.3] = float("-inf")
    t[1::2, : classes - 1] = float("-inf")
    t[2::3, : (classes * 3) // 4] = float("-inf")
    t[:, -1] = 1.0
    # Reverse KL and JSD need the student to give the teacher's -inf classes no mass either for
    # a finite loss; the forward KL takes any student. (Where both are -inf the reference's own
    # JSD gradient is NaN, d log m / dm at m = 0: there the gradients are checked against the CPU.)
    s = logits((rows, classes), pair[0])
    if beta > 0:
        s = torch.where(torch.isinf(t), torch.full_like(s, float("-inf")), s)
    check(s, t, beta=beta, grads=(True, beta == 0.0), reference_grads=beta in (0.0, 1.0))


@pytest.mark.parametrize("classes", [1, 10, 1000, 32001])
@pytest.mark.parametrize("pair", SOME_PAIRS[:2], ids=pair_id)
def test_masked_rows(pair, classes):
    rows = rows_for(classes)
    s, t = logits((rows, classes), pair[0]), logits((rows, classes), pair[1], seed=1)
    labels = random_labels(rows, classes, masked=0.5)
    labels[0] = -100
    for reduction in ["batchmean", "sum", "none"]:
        loss, grad_s, grad_t = check(s, t, labels, reduction=reduction, hard_weight=0.5,
                                     soft_weight=0.5)
        masked = labels == -100
        assert (grad_s[masked] == 0).all() and (grad_t[masked] == 0).all()
        if reduction == "none":
            assert (loss[masked] == 0).all()


@pytest.mark.parametrize("classes", [1, 10, 1000, 32001])
def test_all_rows_masked_give_zero(classes):
    rows = rows_for(classes)
    s, t = logits((rows, classes), torch.float32), logits((rows, classes), torch.float32, seed=1)
    labels = torch.full((rows,), -7, device=DEVICE)
    for reduction in ["batchmean", "sum"]:
        loss, grad_s, grad_t = raw_kd_loss(s, t, labels, reduction=reduction, hard_weight=1.0,
                                           ignore_index=-7)
        assert loss.item() == 0 and not loss.isnan()
        assert (grad_s == 0).all() and (grad_t == 0).all()


def test_batchmean_divides_by_the_valid_rows_counted_on_the_device():
    s, t = logits((64, 100), torch.float32), logits((64, 100), torch.float32, seed=1)
    labels = random_labels(64, 100, masked=0.5)
    valid = int((labels != -100).sum())
    mean = raw_kd_loss(s, t, labels, grads=(False, False))[0]
    total = raw_kd_loss(s, t, labels, reduction="sum", grads=(False, False))[0]
    torch.testing.assert_close(mean, total / valid)


# ---- one class, extreme values ----

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_one_class_is_exactly_zero(pair, beta):
    s = logits((67, 1), pair[0], scale=1e3)
    t = logits((67, 1), pair[1], scale=1e3, seed=1)
    labels = torch.zeros(67, dtype=torch.long, device=DEVICE)
    labels[::5] = -100
    for kwargs in [{}, dict(labels=labels, hard_weight=0.5)]:
        loss, grad_s, grad_t = raw_kd_loss(s, t, beta=beta, temperature=0.3, **kwargs)
        assert loss.item() == 0 and (grad_s == 0).all() and (grad_t == 0).all()
    # A NaN or infinite logit makes its row NaN, and its own gradient, as on the CPU.
    s[3, 0], t[4, 0], s[5, 0] = float("nan"), float("inf"), float("-inf")
    cuda = raw_kd_loss(s, t, beta=beta, reduction="none")
    cpu = cpu_kd_loss(s, t, beta=beta, reduction="none")
    for a, e in zip(cuda, cpu):
        torch.testing.assert_close(a.cpu(), e, equal_nan=True, rtol=0, atol=0)
    assert cuda[0][3:6].isnan().all() and (cuda[0][:3] == 0).all()


@pytest.mark.parametrize("classes", [10, 1000, 32001])
@pytest.mark.parametrize("pair", SOME_PAIRS, ids=pair_id)
def test_student_without_mass_gives_inf(pair, classes):
    rows = rows_for(classes)
    s = logits((rows, classes), pair[0])
    t = logits((rows, classes), pair[1], seed=1)
    s[0, classes // 2] = float("-inf")  # the teacher gives this class mass: KL = +inf
    t[1, :] = float("-inf")
    t[1, 0] = 0.0
    s[1, 1:] = float("-inf")  # -inf exactly where the teacher gives no mass: finite
    s[2, :] = float("-inf")  # a student with no mass at all: +inf, not NaN
    loss = raw_kd_loss(s, t, reduction="none", grads=(True, False))
    expected = cpu_kd_loss(s, t, reduction="none", grads=(True, False))
    assert loss[0][0].item() == float("inf") and loss[0][2].item() == float("inf")
    assert torch.isfinite(loss[0][1]) and torch.isfinite(loss[0][3:]).all()
    torch.testing.assert_close(loss[0].cpu(), expected[0], rtol=1e-4, atol=1e-5)
    # The forward KL's student gradient stays finite (p_s - p_t).
    torch.testing.assert_close(loss[1].cpu(), expected[1], rtol=2e-2, atol=2e-3)


def test_nan_propagates():
    s = logits((6, 1000), torch.float32)
    t = logits((6, 1000), torch.float32, seed=1)
    s[0, 17] = float("nan")
    t[1, 999] = float("nan")
    t[2, 3] = float("inf")
    s[3, 500] = float("inf")
    for beta in BETAS:
        loss = raw_kd_loss(s, t, beta=beta, reduction="none")
        assert loss[0][:4].isnan().all() and torch.isfinite(loss[0][4:]).all()
        expected = cpu_kd_loss(s, t, beta=beta, reduction="none")
        for a, e in zip(loss, expected):
            assert (a.isnan().cpu() == e.isnan()).all()


@pytest.mark.parametrize("classes", [10, 1000, 32001])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_large_magnitudes(dtype, classes):
    # Logits of magnitude 1e4: exp() would overflow without the running maxima; rows far below 0
    # would overflow a careless rescaling. Where an expected gradient is exactly 0 the tolerance
    # floor is the rounding of a float32 logit over T.
    rows = rows_for(classes)
    s = logits((rows, classes), dtype, scale=1e4)
    t = logits((rows, classes), dtype, scale=1e4, seed=1)
    check(s, t, temperature=1.0)
    check(s - 1e4, t - 3e4, temperature=0.5)
    check(s, t, random_labels(rows, classes), temperature=20.0, hard_weight=0.5)
    # Large common offsets (accuracy relative to the row maximum) for every divergence. (Not with
    # logits spread over 1e4: probabilities there are subnormal, and divergence.h's
    # m = beta * p_t + (1 - beta) * p_s underflows to 0, so the JSD of such rows is NaN in the
    # kernels and inf in the reference, on the CPU too.)
    s, t = logits((rows, classes), dtype, seed=5) + 1e4, logits((rows, classes), dtype, seed=6) - 1e4
    for beta in BETAS:
        check(s, t, random_labels(rows, classes), temperature=4.0, beta=beta, hard_weight=0.5)


# ---- errors, devices, sizes ----

@gpu_only
def test_label_out_of_range_is_a_device_assert():
    # As F.cross_entropy on CUDA: a device-side assert (which ends the CUDA context, so in a
    # child process).
    code = (
        "import torch, pykd\n"
        "s = torch.randn(4, 10, device='cuda')\n"
        "labels = torch.tensor([1, 2, 10, 3], device='cuda')\n"
        "loss = pykd.KDLoss()(s, s, labels)\n"
        "torch.cuda.synchronize()\n"
        "print('no error')\n"
    )
    result = run_python(["-c", code])
    assert result.returncode != 0 and "no error" not in result.stdout, result.stdout
    assert "assert" in result.stderr.lower(), result.stderr[-2000:]


@gpu_only
def test_mismatched_devices_raise_our_error():
    s = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="same device"):
        raw_kd_loss(s, s.cpu())
    with pytest.raises(ValueError, match="same device"):
        raw_kd_loss(s.cpu(), s)
    with pytest.raises(ValueError, match="labels must be on the logits' device"):
        raw_kd_loss(s, s, torch.zeros(4, dtype=torch.long), hard_weight=1.0)


def test_empty_inputs():
    for shape in [(0, 10), (2, 0, 1000)]:
        s = torch.randn(shape, device=DEVICE, requires_grad=True)
        with device_kernels():
            loss = pykd.kd_loss(s, torch.randn(shape, device=DEVICE), reduction="sum")
            loss.backward()
        assert loss.item() == 0 and s.grad.shape == s.shape


def test_deterministic():
    s, t = logits((1000, 1000), torch.float32), logits((1000, 1000), torch.float32, seed=1)
    labels = random_labels(1000, 1000)
    first = raw_kd_loss(s, t, labels, beta=0.5, hard_weight=0.5)
    for _ in range(3):
        again = raw_kd_loss(s, t, labels, beta=0.5, hard_weight=0.5)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@gpu_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_device():
    # The op runs on the logits' device, whatever the current device is.
    s = logits((67, 1000), torch.float32).to("cuda:1")
    t = logits((67, 1000), torch.float32, seed=1).to("cuda:1")
    with torch.cuda.device(0):
        result = check(s, t, random_labels(67, 1000).to("cuda:1"), hard_weight=0.5)
    assert all(r.device == s.device for r in result)


@gpu_only
def test_more_than_2_31_elements():
    # Offsets past 2^31 elements: the last rows of a 2^31 + 2^17 element bfloat16 matrix.
    free, _ = torch.cuda.mem_get_info()
    rows, classes = 16385, 131072
    if free < 4 * rows * classes * 2 + (1 << 30):
        pytest.skip(f"needs {4 * rows * classes * 2 >> 30} GiB of free GPU memory")
    s = torch.empty((rows, classes), device=DEVICE, dtype=torch.bfloat16).normal_()
    t = torch.empty((rows, classes), device=DEVICE, dtype=torch.bfloat16).normal_()
    loss, grad_s, _ = raw_kd_loss(s, t, temperature=1.0, reduction="none", grads=(True, False))
    tail = slice(rows - 2, rows)
    expected = cpu_kd_loss(s[tail], t[tail], temperature=1.0, reduction="none",
                           grads=(True, False))
    torch.testing.assert_close(loss[tail].cpu(), expected[0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(grad_s[tail].cpu(), expected[1], rtol=2e-2, atol=1e-7)


# ---- CUDA graphs and torch.compile ----

@gpu_only
def test_cuda_graph_capture_with_labels():
    # The op, its valid-row count and its reduction are captured into a CUDA graph (no host
    # synchronisation) and replayed on new data and new labels.
    s = logits((257, 1000), torch.bfloat16)
    t = logits((257, 1000), torch.float32, seed=1)
    labels = random_labels(257, 1000)

    def step():
        return raw_kd_loss(s, t, labels, beta=0.5, soft_weight=0.5, hard_weight=0.5)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad_s, grad_t = step()
    s.copy_(logits((257, 1000), torch.bfloat16, seed=2))
    labels.copy_(random_labels(257, 1000, masked=0.6, seed=4))
    graph.replay()
    expected = step()
    torch.testing.assert_close(loss, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(grad_s, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(grad_t, expected[2], rtol=0, atol=0)


def distillation_step(module, s, t, labels):
    """KDLoss with labels plus a Jensen-Shannon kd_loss: two fused calls in one graph."""
    return module(s, t, labels) + pykd.kd_loss(s, t, 2.0, beta=0.5, labels=labels) * 0.5


def compiled_matches_eager(compiled, dtype, steps):
    s = logits((64, 1000), dtype)
    t = logits((64, 1000), dtype, seed=1)
    labels = random_labels(64, 1000)
    module = pykd.KDLoss(temperature=2.0, soft_weight=0.7, hard_weight=0.3)
    y = s.detach().clone().requires_grad_()
    expected = distillation_step(module, y, t, labels)
    expected.backward()
    for _ in range(steps):
        x = s.detach().clone().requires_grad_()
        loss = compiled(module, x, t, labels)
        loss.backward()
        torch.testing.assert_close(loss.detach().clone(), expected.detach())
        torch.testing.assert_close(x.grad, y.grad)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph_with_labels(dtype):
    torch._dynamo.reset()
    compiled_matches_eager(torch.compile(distillation_step, fullgraph=True), dtype, steps=2)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_reduce_overhead(dtype):
    # mode="reduce-overhead" runs the compiled graphs as CUDA graphs; inductor counts every graph
    # it had to leave out (a CPU tensor, a host sync).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_matches_eager(
        torch.compile(distillation_step, mode="reduce-overhead"), dtype, steps=4)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


# ---- sparse_kd_loss (a teacher kept as its top-k) ----

def sparse_inputs(rows, classes, k, dtype, values_dtype, index_dtype=torch.int64, seed=0):
    student = logits((rows, classes), dtype, seed=seed)
    teacher = logits((rows, classes), torch.float32, seed=seed + 1)
    values, indices = teacher.topk(k, dim=-1)
    lse = torch.logsumexp(teacher.double() / 2.0, dim=-1)
    lse = lse.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return student, values.to(values_dtype), indices.to(index_dtype), lse


def sparse_check(student, values, indices, lse=None, labels=None, reduction="batchmean"):
    """The CUDA op against the CPU op on the same inputs and against the float64 reference."""
    def run(s, v, i, t_lse, lab):
        s = s.detach().clone().requires_grad_()
        loss = pykd.sparse_kd_loss(s, v, i, 2.0, reduction, teacher_lse=t_lse, labels=lab)
        loss.backward(torch.full_like(loss, 0.5))
        return loss.detach(), s.grad

    cpu = lambda x: None if x is None else x.cpu()  # noqa: E731
    with device_kernels():
        loss, grad = run(student, values, indices, lse, labels)
    cpu_loss, cpu_grad = run(*(cpu(x) for x in (student, values, indices, lse, labels)))
    s64 = student.detach().double().cpu().requires_grad_()
    ref = reference.sparse_kd_loss(s64, cpu(values), cpu(indices), 2.0, reduction,
                                   teacher_lse=cpu(lse), labels=cpu(labels))
    ref.backward(torch.full_like(ref, 0.5))
    rtol, atol = TOLERANCES[student.dtype if values.dtype != torch.bfloat16 else torch.bfloat16]
    rows = student.shape[0] if reduction == "batchmean" else 1
    grad_atol = atol * 0.5 * max(finite_max(student), 2.0) / rows
    torch.testing.assert_close(loss.cpu().double(), ref.detach(), rtol=rtol,
                               atol=atol * (ref.abs().max().item() + 1))
    torch.testing.assert_close(grad.cpu().double(), s64.grad, rtol=rtol, atol=grad_atol)
    torch.testing.assert_close(loss.cpu().double(), cpu_loss.double(), rtol=rtol,
                               atol=atol * (ref.abs().max().item() + 1))
    torch.testing.assert_close(grad.cpu().double(), cpu_grad.double(), rtol=rtol, atol=grad_atol)


SPARSE_DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                 (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                 (torch.float64, torch.float64)]


@pytest.mark.parametrize("pair", SPARSE_DTYPES, ids=pair_id)
@pytest.mark.parametrize("classes,k", [(10, 3), (1000, 64), (32000, 64), (128256, 64),
                                       (5000, 2000)])
@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sparse_kd_loss_matches_cpu_and_reference(pair, classes, k, with_lse, index_dtype):
    s, v, i, lse = sparse_inputs(rows_for(classes), classes, k, *pair, index_dtype=index_dtype)
    sparse_check(s, v, i, lse if with_lse else None)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("with_lse", [False, True])
def test_sparse_kd_loss_masks_and_reductions(reduction, with_lse):
    s, v, i, lse = sparse_inputs(67, 4000, 16, torch.float32, torch.bfloat16)
    sparse_check(s, v, i, lse if with_lse else None, random_labels(67, 4000), reduction)
    none_valid = torch.full((67,), -100, device=DEVICE)
    s = s.requires_grad_()
    with device_kernels():
        loss = pykd.sparse_kd_loss(s, v, i, labels=none_valid,
                                   teacher_lse=lse if with_lse else None)
        loss.backward()
    assert loss.item() == 0 and (s.grad == 0).all()


def test_sparse_kd_loss_repeated_indices_and_small_tail():
    s, v, i, lse = sparse_inputs(5, 3000, 20, torch.float32, torch.float32)
    i[:, 5] = i[:, 2]
    i[1, 7] = i[1, 9] = i[1, 0]
    sparse_check(s, v, i, lse)
    sparse_check(s, v, i)
    # The top-k holds nearly all of the student's mass: q summed over the tail stays exact.
    s = torch.zeros_like(s).scatter(-1, i, 120.0)
    sparse_check(s, v, i, lse, reduction="none")


@gpu_only
def test_sparse_kd_loss_index_out_of_range_is_a_device_assert():
    code = (
        "import torch, pykd\n"
        "s = torch.randn(4, 10, device='cuda')\n"
        "i = torch.tensor([[0, 1], [2, 10], [3, 4], [5, 6]], device='cuda')\n"
        "loss = pykd.sparse_kd_loss(s, torch.randn(4, 2, device='cuda'), i)\n"
        "torch.cuda.synchronize()\n"
        "print('no error')\n"
    )
    result = run_python(["-c", code])
    assert result.returncode != 0 and "no error" not in result.stdout, result.stdout
    assert "assert" in result.stderr.lower(), result.stderr[-2000:]


@gpu_only
def test_sparse_kd_loss_cuda_graph_and_compile():
    s, v, i, lse = sparse_inputs(16, 2000, 8, torch.float32, torch.float32)
    labels = random_labels(16, 2000)
    compiled = torch.compile(pykd.sparse_kd_loss, fullgraph=True)
    expected = pykd.sparse_kd_loss(s, v, i, 2.0, teacher_lse=lse, labels=labels)
    torch.testing.assert_close(compiled(s, v, i, 2.0, teacher_lse=lse, labels=labels), expected)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        pykd.sparse_kd_loss(s, v, i, 2.0, teacher_lse=lse, labels=labels)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = pykd.sparse_kd_loss(s, v, i, 2.0, teacher_lse=lse, labels=labels)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)
