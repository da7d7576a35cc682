"""pykd.kd_loss and its ops against the float64 reference, on every dtype and device."""
import math

import pytest
import torch
import torch.nn.functional as F

import pykd
from pykd import reference
from testing import DEVICES, DTYPES, assert_close, run_python

CLASS_COUNTS = [1, 3, 10, 1000, 4099, 32000, 128256]


def logits(shape, dtype, device, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def loss_and_grads(fn, student, teacher, temperature, **kwargs):
    """fn's loss and the gradients of loss * a fixed weight, for both logits."""
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    loss = fn(s, t, temperature, **kwargs)
    loss.backward(torch.full_like(loss, 0.75))
    return loss.detach(), s.grad, t.grad


def check_against_reference(student, teacher, temperature, **kwargs):
    dtype = student.dtype
    loss, gs, gt = loss_and_grads(pykd.kd_loss, student, teacher, temperature, **kwargs)
    ref_loss, ref_gs, ref_gt = loss_and_grads(
        reference.kd_loss, student.double(), teacher.double(), temperature, **kwargs
    )
    assert loss.dtype == dtype and gs.dtype == dtype and gt.dtype == dtype
    assert gs.shape == student.shape and gt.shape == teacher.shape
    assert_close(loss, ref_loss, dtype, scale=ref_loss.abs().max().item() + 1e-30)
    # A gradient element is T * (p_s - p_t) * upstream / rows, and its rounding error grows with
    # the logits' size: eps * max|logit| * upstream / rows. Absolute tolerances follow that.
    batchmean = kwargs.get("reduction", "batchmean") == "batchmean"
    rows = student.numel() // student.shape[-1] if batchmean else 1
    largest = max(student.abs().max().item(), teacher.abs().max().item(), temperature)
    grad_scale = 0.75 * largest / rows
    assert_close(gs, ref_gs, dtype, scale=grad_scale)
    assert_close(gt, ref_gt, dtype, scale=grad_scale)
    return loss, gs, gt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", CLASS_COUNTS)
def test_matches_reference(device, dtype, classes):
    rows = 3 if classes > 10000 else 37
    student = logits((rows, classes), dtype, device, scale=3.0, seed=1)
    teacher = logits((rows, classes), dtype, device, scale=3.0, seed=2)
    check_against_reference(student, teacher, 2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions_on_3d_logits(device, dtype, reduction):
    student = logits((4, 5, 33), dtype, device, seed=3)
    teacher = logits((4, 5, 33), dtype, device, seed=4)
    loss, _, _ = check_against_reference(student, teacher, 1.5, reduction=reduction)
    assert loss.shape == ((4, 5) if reduction == "none" else ())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [10, 1000])
def test_non_contiguous_inputs(device, dtype, classes):
    wide = logits((16, classes + 7), dtype, device, seed=5)
    student = wide[:, 3 : classes + 3]  # rows evenly spaced, not packed
    teacher = logits((classes, 16), dtype, device, seed=6).t()  # column-major
    assert not student.is_contiguous() and not teacher.is_contiguous()
    check_against_reference(student, teacher, 2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("classes", [10, 3000])
def test_masked_teacher_classes(device, dtype, classes):
    """Classes the teacher gives no mass (logit -inf) add nothing: 0 * log 0 = 0."""
    student = logits((8, classes), dtype, device, seed=7)
    teacher = logits((8, classes), dtype, device, seed=8)
    teacher[:, ::3] = float("-inf")
    student[:2, ::3] = float("-inf")  # both masked: still no NaN
    loss, gs, gt = check_against_reference(student, teacher, 2.0)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gt[:, ::3] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_student_without_mass_where_teacher_has_some_is_inf(device):
    student = logits((2, 5), torch.float32, device)
    teacher = logits((2, 5), torch.float32, device)
    student[0, 2] = float("-inf")
    per_row = pykd.kd_loss(student, teacher, reduction="none")
    assert per_row[0] == math.inf and torch.isfinite(per_row[1])
    student[1, :] = float("-inf")
    assert pykd.kd_loss(student, teacher, reduction="none")[1] == math.inf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("classes", [5, 5000])
def test_student_without_mass_gives_infinite_cross_entropy(device, temperature, classes):
    """An all -inf student row gives its label probability 0: the cross-entropy is +inf at every
    temperature (not NaN at T != 1), and its gradient is the limit p_s = 0, finite."""
    student = logits((3, classes), torch.float32, device, seed=15)
    teacher = logits((3, classes), torch.float32, device, seed=16)
    labels = torch.tensor([1, 2, 3], device=device)
    student[1] = float("-inf")
    student.requires_grad_()
    loss = pykd.KDLoss(temperature, 0.5, 0.5)(student, teacher, labels)
    loss.backward()
    assert loss == math.inf
    p_t = torch.softmax(teacher[1].double() / temperature, -1)
    expected = -0.5 * temperature * p_t / 3
    expected[2] -= 0.5 / 3
    torch.testing.assert_close(student.grad[1].double(), expected, rtol=1e-5, atol=1e-7)
    assert student.grad[[0, 2]].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("classes", [5, 50, 5000])
def test_teacher_without_mass_is_nan(device, beta, classes):
    """A teacher row of only -inf is no distribution: that row's loss and gradients are NaN (as
    log_softmax makes them), never a finite loss with a made-up gradient; other rows are kept."""
    student = logits((3, classes), torch.float32, device, seed=13).requires_grad_()
    teacher = logits((3, classes), torch.float32, device, seed=14)
    teacher[1] = float("-inf")
    teacher.requires_grad_()
    per_row = pykd.kd_loss(student, teacher, 2.0, "none", beta=beta)
    per_row.sum().backward()
    assert per_row[1].isnan() and per_row[[0, 2]].isfinite().all()
    for grad in (student.grad, teacher.grad):
        assert grad[1].isnan().all() and grad[[0, 2]].isfinite().all()
    expected = reference.kd_loss(student.double(), teacher.double(), 2.0, "none", beta=beta)
    assert expected[1].isnan()
    torch.testing.assert_close(per_row[[0, 2]].double(), expected[[0, 2]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
@pytest.mark.parametrize("classes", [10, 5000])
def test_large_logits_and_temperatures(device, dtype, temperature, classes):
    student = logits((6, classes), dtype, device, scale=1e4, seed=9)
    teacher = logits((6, classes), dtype, device, scale=1e4, seed=10)
    loss, gs, gt = check_against_reference(student, teacher, temperature)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("offset", [-1e4, -1e3, 0.0, 1e3, 1e4])
def test_large_common_offset_keeps_float32_accuracy(device, temperature, offset):
    """Logits far from 0 (softmax is shift-invariant): no cancellation of two large LSEs."""
    student = logits((4, 3000), torch.float64, device, scale=3.0, seed=11) + offset
    teacher = logits((4, 3000), torch.float64, device, scale=3.0, seed=12) + offset
    student, teacher = student.float(), teacher.float()
    loss = pykd.kd_loss(student, teacher, temperature).double()
    expected = reference.kd_loss(student.double(), teacher.double(), temperature)
    torch.testing.assert_close(loss, expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_long_rows_masked_at_first_then_very_negative(device):
    """A row walked in blocks whose first blocks hold only -inf and whose maximum is far below 0:
    moving the running sums to the first finite maximum must not make 0 * inf."""
    student = logits((3, 5000), torch.float32, device, scale=3.0, seed=29) - 500.0
    teacher = logits((3, 5000), torch.float32, device, scale=3.0, seed=30) - 500.0
    teacher[:, :4100] = float("-inf")
    student[0, :4100] = float("-inf")
    loss, gs, gt = check_against_reference(student, teacher, 1.0)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("classes", [3, 40, 2500])
def test_gradcheck(device, classes):
    student = logits((3, classes), torch.float64, device, seed=13).requires_grad_()
    teacher = logits((3, classes), torch.float64, device, seed=14).requires_grad_()
    for reduction in ("batchmean", "none"):
        with pykd.ops.functional_backward():  # gradcheck runs backward more than once
            assert torch.autograd.gradcheck(
                lambda s, t: pykd.kd_loss(s, t, 1.7, reduction=reduction), (student, teacher)
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 2, (torch.bfloat16, torch.float32),
                                    (torch.float64,) * 2])
@pytest.mark.parametrize("classes", [7, 129])
def test_opcheck(device, dtypes, classes):
    student = logits((5, classes), dtypes[0], device, seed=15).requires_grad_()
    teacher = logits((5, classes), dtypes[1], device, seed=16).requires_grad_()
    labels = torch.tensor([1, -100, 3, 0, 2], device=device)
    for beta, soft, hard, lab, reduction in [
        (0.0, 1.0, 0.0, None, "batchmean"),
        (1.0, 1.0, 0.0, labels, "none"),
        (0.3, 0.5, 0.5, labels, "sum"),
        (0.0, 0.25, 0.75, labels, "batchmean"),
    ]:
        for wanted in [(True, False), (False, True), (True, True), (False, False)]:
            s = student.detach().requires_grad_(wanted[0])
            t = teacher.detach().requires_grad_(wanted[1])
            torch.library.opcheck(
                torch.ops.pykd.kd_loss.default,
                (s, t, lab, 2.0, beta, soft, hard, -100, reduction, *wanted),
            )


def test_second_derivatives_raise():
    student = logits((4, 10), torch.float64, "cpu").requires_grad_()
    teacher = logits((4, 10), torch.float64, "cpu", seed=1)
    with pytest.raises(RuntimeError, match="kd_loss: second derivatives are not implemented"):
        torch.autograd.grad(pykd.kd_loss(student, teacher, 2.0), student, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_only_teacher_requires_grad(device):
    student = logits((4, 50), torch.float32, device, seed=17)
    teacher = logits((4, 50), torch.float32, device, seed=18).requires_grad_()
    pykd.kd_loss(student, teacher, 2.0).backward(torch.tensor(0.75))
    _, _, ref_gt = loss_and_grads(reference.kd_loss, student.double(), teacher.double(), 2.0)
    assert_close(teacher.grad, ref_gt, torch.float32, scale=ref_gt.abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    compiled = torch.compile(pykd.kd_loss, fullgraph=True)
    student = logits((64, 1000), torch.float32, device, seed=19).requires_grad_()
    teacher = logits((64, 1000), torch.float32, device, seed=20)
    loss = compiled(student, teacher, 4.0)
    loss.backward()
    expected, grad, _ = loss_and_grads(pykd.kd_loss, student, teacher, 4.0)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(student.grad * 0.75, grad)


def test_reference_formulas_agree():
    student = logits((32, 100), torch.float64, "cpu", seed=21)
    teacher = logits((32, 100), torch.float64, "cpu", seed=22)
    expected = reference.kd_loss(student, teacher, 3.0)
    torch.testing.assert_close(reference.tutorial_kd_loss(student, teacher, 3.0), expected)
    torch.testing.assert_close(reference.kl_div_kd_loss(student, teacher, 3.0), expected)
    torch.testing.assert_close(pykd.kd_loss(student, teacher, 3.0), expected)


def test_masked_pytorch_forms_agree_with_the_reference():
    # The benchmarks' masked token-level forms (4 x 6 rows, a quarter of them and one whole
    # sequence position masked).
    student = logits((4, 6, 50), torch.float64, "cpu", seed=31)
    teacher = logits((4, 6, 50), torch.float64, "cpu", seed=32)
    labels = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(3))
    labels[:, 0] = -100
    expected = reference.kd_loss(student, teacher, 2.0, labels=labels)
    for form in (reference.tutorial_kd_loss, reference.kl_div_kd_loss):
        torch.testing.assert_close(form(student, teacher, 2.0, labels), expected)
        assert form(student, teacher, 2.0, torch.full_like(labels, -100)).item() == 0


def test_mixed_dtypes_are_promoted():
    student = logits((4, 10), torch.bfloat16, "cpu", seed=23)
    teacher = logits((4, 10), torch.float32, "cpu", seed=24)
    loss = pykd.kd_loss(student, teacher)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, pykd.kd_loss(student.float(), teacher))


def test_empty_batch_and_nan_logits_do_not_crash():
    empty = torch.empty(0, 10, requires_grad=True)
    assert pykd.kd_loss(empty, torch.empty(0, 10), reduction="none").shape == (0,)
    assert pykd.kd_loss(empty, torch.empty(0, 10), reduction="sum") == 0
    loss = pykd.kd_loss(empty, torch.empty(0, 10))
    assert loss == 0  # batchmean over no (valid) row is 0, never NaN
    loss.backward()
    assert empty.grad.shape == (0, 10)

    student, teacher = logits((3, 40), torch.float32, "cpu"), logits((3, 40), torch.float32, "cpu")
    student[1, 7] = float("nan")
    per_row = pykd.kd_loss(student, teacher, reduction="none")
    assert torch.isnan(per_row[1]) and torch.isfinite(per_row[[0, 2]]).all()
    teacher[2, 0] = float("nan")
    assert torch.isnan(pykd.kd_loss(student, teacher, reduction="none")[2])


@pytest.mark.parametrize(
    "student, teacher, kwargs, error, message",
    [
        (torch.zeros(4, 10), torch.zeros(4, 11), {}, ValueError, "same shape"),
        (torch.tensor(1.0), torch.tensor(1.0), {}, ValueError, "at least one dimension"),
        (torch.zeros(4, 0), torch.zeros(4, 0), {}, ValueError, "at least one class"),
        (torch.zeros(4, 10, dtype=torch.long), torch.zeros(4, 10, dtype=torch.long), {},
         TypeError, "floating-point"),
        (torch.zeros(4, 10), torch.zeros(4, 10), {"temperature": 0.0}, ValueError, "temperature"),
        (torch.zeros(4, 10), torch.zeros(4, 10), {"temperature": -1.0}, ValueError, "temperature"),
        (torch.zeros(4, 10), torch.zeros(4, 10), {"temperature": math.nan}, ValueError,
         "temperature"),
        (torch.zeros(4, 10), torch.zeros(4, 10), {"temperature": math.inf}, ValueError,
         "temperature"),
        (torch.zeros(4, 10), torch.zeros(4, 10), {"temperature": "2"}, TypeError, "temperature"),
        (torch.zeros(4, 10), torch.zeros(4, 10), {"reduction": "mean"}, ValueError, "reduction"),
        (torch.zeros(4, 10), torch.zeros(4, 10), {"reduction": None}, ValueError,
         "kd_loss: reduction must be one of"),
        (torch.zeros(4, 10), torch.zeros(4, 10), {"ignore_index": 1.5}, TypeError,
         "kd_loss: ignore_index must be an integer, got 1.5"),
        (torch.zeros(4, 10), torch.zeros(4, 10), {"ignore_index": True}, TypeError,
         "kd_loss: ignore_index must be an integer, got True"),
        (torch.zeros(4, 10), torch.zeros(4, 10), {"ignore_index": 2**63}, ValueError,
         "kd_loss: ignore_index must fit in int64"),
        ([[0.0, 1.0]], torch.zeros(1, 2), {}, TypeError, "student_logits must be a torch.Tensor"),
        (torch.zeros(1, 2), None, {}, TypeError, "teacher_logits must be a torch.Tensor"),
    ],
)
def test_bad_input(student, teacher, kwargs, error, message):
    with pytest.raises(error, match=message):
        pykd.kd_loss(student, teacher, **kwargs)


def test_op_checks_its_arguments():
    s, t = torch.zeros(4, 10), torch.zeros(4, 10)

    def op(**changes):
        args = dict(labels=None, temperature=1.0, beta=0.0, soft_weight=1.0, hard_weight=0.0,
                    ignore_index=-100, reduction="batchmean", student_grad=True,
                    teacher_grad=False)
        args.update(changes)
        return torch.ops.pykd.kd_loss(s, t, *args.values())

    with pytest.raises(ValueError, match="temperature"):
        op(temperature=-2.0)
    with pytest.raises(ValueError, match="beta must be a number in"):
        op(beta=1.5)
    with pytest.raises(ValueError, match="soft_weight"):
        op(soft_weight=-1.0)
    with pytest.raises(ValueError, match="hard_weight"):
        op(hard_weight=math.inf, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels are required"):
        op(hard_weight=1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        op(reduction="mean")


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_kernels_match_reference(capability):
    """The kernels built for CPUs without AVX2, and for AVX2 without AVX-512, forced through
    ATen's own capability switch (on an AVX2 machine "avx2" is its own build)."""
    code = (
        "import torch, pykd; from testing import assert_close;"
        "from pykd import reference as R\n"
        "for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):\n"
        "  for shape in ((37, 10), (5, 3000)):\n"
        "    s = torch.randn(shape).to(dtype).requires_grad_(); t = torch.randn(shape).to(dtype)\n"
        "    loss = pykd.kd_loss(s, t, 2.0); loss.backward()\n"
        "    s2 = s.detach().double().requires_grad_(); ref = R.kd_loss(s2, t.double(), 2.0)\n"
        "    ref.backward()\n"
        "    assert_close(loss, ref, dtype, scale=float(ref))\n"
        "    assert_close(s.grad, s2.grad, dtype, scale=float(s2.grad.abs().max()))\n"
        "    ts = [t, torch.randn(shape).to(dtype)]\n"
        "    loss = pykd.multi_teacher_kd_loss(s, ts, [0.3, 0.7], 2.0)\n"
        "    ref = R.multi_teacher_kd_loss(s2, [x.double() for x in ts], [0.3, 0.7], 2.0)\n"
        "    assert_close(loss, ref, dtype, scale=float(ref))\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    out = run_python(["-c", code], env={"ATEN_CPU_CAPABILITY": capability})
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() != capability.upper():
        pytest.skip(f"this CPU has no {capability} (ran {out.stdout.strip()})")


class TestKDLoss:
    def test_matches_tutorial_combination(self):
        student = logits((16, 10), torch.float32, "cpu", seed=25).requires_grad_()
        teacher = logits((16, 10), torch.float32, "cpu", seed=26)
        labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
        module = pykd.KDLoss(temperature=2.0, soft_weight=0.25, hard_weight=0.75)
        expected = 0.25 * reference.tutorial_kd_loss(student, teacher, 2.0) + 0.75 * (
            F.cross_entropy(student, labels)
        )
        torch.testing.assert_close(module(student, teacher, labels), expected)

    def test_ignore_index_on_token_logits(self):
        student = logits((2, 6, 11), torch.float32, "cpu", seed=27)
        teacher = logits((2, 6, 11), torch.float32, "cpu", seed=28)
        labels = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
        labels[0, :3] = -1
        module = pykd.KDLoss(temperature=1.0, soft_weight=0.0, hard_weight=1.0, ignore_index=-1)
        valid = labels != -1
        expected = F.cross_entropy(student[valid], labels[valid])
        torch.testing.assert_close(module(student, teacher, labels), expected)

    def test_soft_only_needs_no_labels(self):
        student = logits((4, 10), torch.float32, "cpu")
        teacher = logits((4, 10), torch.float32, "cpu", seed=1)
        torch.testing.assert_close(
            pykd.KDLoss(temperature=3.0, soft_weight=2.0, hard_weight=0.0)(student, teacher),
            2.0 * pykd.kd_loss(student, teacher, 3.0),
        )

    @pytest.mark.parametrize(
        "kwargs, error, message",
        [
            ({"temperature": 0}, ValueError, "temperature"),
            ({"soft_weight": -1.0}, ValueError, "soft_weight"),
            ({"hard_weight": math.nan}, ValueError, "hard_weight"),
            ({"hard_weight": "1"}, TypeError, "hard_weight"),
        ],
    )
    def test_bad_arguments(self, kwargs, error, message):
        with pytest.raises(error, match=message):
            pykd.KDLoss(**kwargs)

    def test_missing_or_misshapen_labels(self):
        module = pykd.KDLoss(hard_weight=1.0)
        student, teacher = torch.zeros(4, 10), torch.zeros(4, 10)
        with pytest.raises(ValueError, match="labels are required"):
            module(student, teacher)
        with pytest.raises(ValueError, match="labels must have"):
            module(student, teacher, torch.zeros(5, dtype=torch.long))


# The family: divergences, token masks, the fused hard-label term, mixed dtypes.
BETAS = [0.0, 0.1, 0.5, 1.0]


def token_labels(shape, classes, device, masked_every=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, shape, generator=gen)
    labels.view(-1)[::masked_every] = -100
    return labels.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("classes", [1, 10, 33, 3000, 4099])
@pytest.mark.parametrize("masked", [False, True])
def test_divergences_and_masks_match_reference(device, dtype, beta, classes, masked):
    student = logits((3, 7, classes), dtype, device, scale=3.0, seed=31)
    teacher = logits((3, 7, classes), dtype, device, scale=3.0, seed=32)
    labels = token_labels((3, 7), classes, device) if masked else None
    for reduction in ("batchmean", "none"):
        loss, gs, gt = check_against_reference(
            student, teacher, 2.0, beta=beta, labels=labels, reduction=reduction
        )
        if masked:
            rows = labels == -100
            assert (gs[rows] == 0).all() and (gt[rows] == 0).all()
            if reduction == "none":
                assert (loss[rows] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", BETAS)
def test_one_class_is_exactly_zero(device, beta):
    student = logits((9, 1), torch.float32, device, scale=100.0, seed=33).requires_grad_()
    teacher = logits((9, 1), torch.float32, device, scale=100.0, seed=34).requires_grad_()
    loss = pykd.KDLoss(3.0, 0.5, 0.5, beta=beta, reduction="none")(
        student, teacher, torch.zeros(9, dtype=torch.long, device=device)
    )
    loss.sum().backward()
    assert (loss == 0).all() and (student.grad == 0).all() and (teacher.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_jensen_shannon_with_logits_far_apart_stays_finite(device, temperature):
    # Logits thousands apart: probabilities underflow to 0 or to denormals whose share of m
    # rounds to 0 (m = 0 < p_t gave an infinite term and NaN gradients).
    student = logits((64, 50), torch.float32, device, scale=4e3, seed=37)
    teacher = logits((64, 50), torch.float32, device, scale=4e3, seed=38)
    for beta in (0.01, 0.5, 0.99):
        loss, grad, _ = check_against_reference(student, teacher, temperature, beta=beta)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_batchmean_divides_by_valid_rows_and_all_masked_is_zero(device):
    student = logits((6, 50), torch.float32, device, seed=35).requires_grad_()
    teacher = logits((6, 50), torch.float32, device, seed=36)
    labels = torch.tensor([3, -100, 4, -100, -100, 7], device=device)
    valid = labels != -100
    loss = pykd.kd_loss(student, teacher, 2.0, labels=labels)
    torch.testing.assert_close(loss, pykd.kd_loss(student[valid], teacher[valid], 2.0))
    everything_masked = torch.full_like(labels, -100)
    for beta in BETAS:
        loss = pykd.KDLoss(2.0, 0.5, 0.5, beta=beta)(student, teacher, everything_masked)
        (grad,) = torch.autograd.grad(loss, student)
        assert loss == 0 and (grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float64,) * 2, (torch.float32,) * 2,
                                    (torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("classes", [10, 3000])
def test_fused_hard_label_loss(device, dtypes, beta, temperature, classes):
    student = logits((4, 6, classes), dtypes[0], device, scale=2.0, seed=37)
    teacher = logits((4, 6, classes), dtypes[1], device, scale=2.0, seed=38)
    labels = token_labels((4, 6), classes, device, masked_every=3, seed=2)
    module = pykd.KDLoss(temperature, soft_weight=0.3, hard_weight=0.7, beta=beta)
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    loss = module(s, t, labels)
    loss.backward()
    s64 = student.double().requires_grad_()
    t64 = teacher.double().requires_grad_()
    expected = reference.kd_loss(s64, t64, temperature, beta=beta, labels=labels,
                                 soft_weight=0.3, hard_weight=0.7)
    expected.backward()
    assert loss.dtype == torch.promote_types(*dtypes)
    assert s.grad.dtype == dtypes[0] and t.grad.dtype == dtypes[1]
    worst = max(dtypes, key=lambda d: torch.finfo(d).eps)  # the less precise of the two
    assert_close(loss, expected, worst, scale=expected.abs().item())
    assert_close(s.grad, s64.grad, dtypes[0], scale=s64.grad.abs().max().item())
    assert_close(t.grad, t64.grad, dtypes[1], scale=t64.grad.abs().max().item())
    if dtypes[0] == torch.float32 and beta == 0:  # the hard term is F.cross_entropy's mean
        valid = labels != -100
        hard = F.cross_entropy(student[valid].float(), labels[valid])
        soft = pykd.kd_loss(student, teacher, temperature, labels=labels)
        torch.testing.assert_close(loss, (0.3 * soft + 0.7 * hard).to(loss.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("classes", [3, 40, 2500])
def test_gradcheck_every_divergence_with_masks_and_hard_labels(device, beta, classes):
    student = logits((5, classes), torch.float64, device, seed=39).requires_grad_()
    teacher = logits((5, classes), torch.float64, device, seed=40).requires_grad_()
    labels = torch.tensor([0, -100, 1, 2, -100], device=device)
    for soft, hard, lab in [(1.0, 0.0, None), (1.0, 0.0, labels), (0.4, 0.6, labels)]:
        for reduction in ("batchmean", "none"):
            module = pykd.KDLoss(1.7, soft, hard, beta=beta, reduction=reduction)
            # Rows of several blocks: a random projection of the Jacobian (fast_mode) keeps it short.
            with pykd.ops.functional_backward():
                assert torch.autograd.gradcheck(
                    lambda s, t: module(s, t, lab), (student, teacher), fast_mode=classes > 100
                )


def test_labels_are_checked():
    s, t = torch.zeros(4, 10), torch.zeros(4, 10)
    with pytest.raises(ValueError, match="labels must have the logits' shape"):
        pykd.kd_loss(s, t, labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        pykd.kd_loss(s, t, labels=torch.zeros(4))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        pykd.kd_loss(s, t, labels=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        pykd.KDLoss()(s, t, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="beta must be a number in"):
        pykd.kd_loss(s, t, beta=-0.1)
    with pytest.raises(ValueError, match="beta must be a number in"):
        pykd.KDLoss(beta=2)
    # Without a hard term, labels only mask: any value but ignore_index is a valid row.
    assert torch.isfinite(pykd.kd_loss(s, t, labels=torch.tensor([0, 99, -5, -100])))


def test_int32_labels_and_custom_ignore_index():
    student, teacher = logits((6, 12), torch.float32, "cpu", seed=41), logits((6, 12), torch.float32, "cpu", seed=42)
    labels = torch.tensor([1, -1, 2, 3, -1, 0], dtype=torch.int32)
    valid = labels != -1
    torch.testing.assert_close(
        pykd.KDLoss(2.0, 0.5, 0.5, ignore_index=-1)(student, teacher, labels),
        pykd.KDLoss(2.0, 0.5, 0.5)(student[valid], teacher[valid], labels[valid].long()),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_with_labels(device):
    torch._dynamo.reset()
    module = pykd.KDLoss(4.0, 0.5, 0.5, beta=0.5)
    compiled = torch.compile(module, fullgraph=True)
    student = logits((4, 16, 300), torch.float32, device, seed=43).requires_grad_()
    teacher = logits((4, 16, 300), torch.bfloat16, device, seed=44)
    labels = token_labels((4, 16), 300, device)
    loss = compiled(student, teacher, labels)
    (grad,) = torch.autograd.grad(loss * 3, student)
    expected = module(student, teacher, labels)
    (expected_grad,) = torch.autograd.grad(expected * 3, student)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_autograd_keeps_only_the_gradient():
    """Between forward and backward autograd holds the student gradient, never the logits."""
    student = logits((64, 1000), torch.float32, "cpu", seed=45).requires_grad_()
    teacher = logits((64, 1000), torch.float32, "cpu", seed=46)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = pykd.KDLoss(4.0, 0.5, 0.5)(student, teacher, torch.zeros(64, dtype=torch.long))
    kept = sum(x.numel() * x.element_size() for x in saved)
    assert kept <= 1.25 * student.numel() * student.element_size()
    assert all(x.data_ptr() not in (student.data_ptr(), teacher.data_ptr()) for x in saved)
    loss.backward()
    assert student.grad.shape == student.shape


def test_second_backward_through_the_same_graph_fails_loudly():
    student = logits((4, 10), torch.float32, "cpu", seed=47).requires_grad_()
    loss = pykd.kd_loss(student, logits((4, 10), torch.float32, "cpu", seed=48))
    loss.backward(torch.tensor(2.0), retain_graph=True)
    first = student.grad.clone()
    student.grad = None
    with pytest.raises(RuntimeError, match="a second backward through the same graph"):
        loss.backward(torch.tensor(2.0))
    loss = pykd.kd_loss(student, logits((4, 10), torch.float32, "cpu", seed=48))
    with pykd.ops.functional_backward():
        loss.backward(torch.tensor(2.0), retain_graph=True)
        student.grad = None
        loss.backward(torch.tensor(2.0))
    torch.testing.assert_close(student.grad, first)
