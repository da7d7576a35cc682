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
        assert torch.autograd.gradcheck(
            lambda s, t: pykd.kd_loss(s, t, 1.7, reduction=reduction), (student, teacher)
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    student = logits((5, 129), dtype, device, seed=15).requires_grad_()
    teacher = logits((5, 129), dtype, device, seed=16).requires_grad_()
    torch.library.opcheck(torch.ops.pykd.kd_loss_fwd.default, (student, teacher, 2.0))
    with torch.no_grad():  # as autograd calls the backward op
        kl, lse_s, lse_t = torch.ops.pykd.kd_loss_fwd(student, teacher, 2.0)
    for wanted in [(True, False), (False, True), (True, True)]:
        torch.library.opcheck(
            torch.ops.pykd.kd_loss_bwd.default,
            (torch.rand_like(kl), student.detach(), teacher.detach(), lse_s, lse_t, kl, 2.0,
             *wanted),
        )


def test_second_derivatives_raise():
    student = logits((4, 10), torch.float64, "cpu").requires_grad_()
    teacher = logits((4, 10), torch.float64, "cpu", seed=1)
    (grad,) = torch.autograd.grad(pykd.kd_loss(student, teacher, 2.0), student, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives are not implemented"):
        grad.sum().backward()


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
    assert torch.isnan(loss)  # batchmean over no rows is 0 / 0, as in F.kl_div
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
        ([[0.0, 1.0]], torch.zeros(1, 2), {}, TypeError, "student_logits must be a torch.Tensor"),
        (torch.zeros(1, 2), None, {}, TypeError, "teacher_logits must be a torch.Tensor"),
    ],
)
def test_bad_input(student, teacher, kwargs, error, message):
    with pytest.raises(error, match=message):
        pykd.kd_loss(student, teacher, **kwargs)


def test_ops_check_their_arguments():
    s, t = torch.zeros(4, 10), torch.zeros(4, 10)
    kl, lse_s, lse_t = torch.ops.pykd.kd_loss_fwd(s, t, 1.0)
    with pytest.raises(ValueError, match="grad_kl"):
        torch.ops.pykd.kd_loss_bwd(torch.ones(3), s, t, lse_s, lse_t, kl, 1.0, True, False)
    with pytest.raises(ValueError, match="student_lse"):
        torch.ops.pykd.kd_loss_bwd(kl, s, t, lse_s.double(), lse_t, kl, 1.0, True, False)
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.pykd.kd_loss_fwd(s, t, -2.0)


def test_portable_cpu_kernel_matches_reference():
    """The kernels built for CPUs without AVX2, forced through ATen's own capability switch."""
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
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    out = run_python(["-c", code], env={"ATEN_CPU_CAPABILITY": "default"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DEFAULT"


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
            pykd.KDLoss(temperature=3.0, soft_weight=2.0)(student, teacher),
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
