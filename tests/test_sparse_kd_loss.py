"""pykd.sparse_kd_loss (a teacher kept as its top-k) against the float64 reference, on every
dtype and device: both modes (renormalised top-k, and exact with the teacher's log-sum-exp and a
tail bucket), masks, reductions, repeated and out-of-range indices, autograd and torch.compile."""
import math

import pytest
import torch

import pykd
from pykd import reference
from testing import DEVICES, DTYPES, assert_close, run_python

MODES = ["renormalised", "lse"]


def logits(shape, dtype, device, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def sparse_teacher(teacher, k, temperature, values_dtype=None, index_dtype=torch.int64, seed=0):
    """The top-k of dense teacher logits in a shuffled order, and their log-sum-exp of t / T."""
    values, indices = teacher.double().topk(k, dim=-1)
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(values.shape, generator=gen), dim=-1).to(values.device)
    values, indices = values.gather(-1, order), indices.gather(-1, order)
    lse_dtype = torch.float64 if teacher.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(teacher.double() / temperature, dim=-1).to(lse_dtype)
    return values.to(values_dtype or teacher.dtype), indices.to(index_dtype), lse


def loss_and_grad(fn, student, values, indices, temperature, **kwargs):
    """fn's loss and the student gradient of loss * a fixed weight."""
    s = student.detach().clone().requires_grad_()
    loss = fn(s, values, indices, temperature, **kwargs)
    loss.backward(torch.full_like(loss, 0.75))
    return loss.detach(), s.grad


def check_against_reference(student, values, indices, temperature, **kwargs):
    dtype = student.dtype
    loss, grad = loss_and_grad(pykd.sparse_kd_loss, student, values, indices, temperature,
                               **kwargs)
    ref_kwargs = {name: (value.cpu() if isinstance(value, torch.Tensor) else value)
                  for name, value in kwargs.items()}
    ref_loss, ref_grad = loss_and_grad(
        reference.sparse_kd_loss, student.double().cpu(), values.cpu(), indices.cpu(),
        temperature, **ref_kwargs)
    assert loss.dtype == torch.promote_types(dtype, values.dtype) and grad.dtype == dtype
    assert grad.shape == student.shape
    tolerance_dtype = dtype if values.dtype == torch.float64 else (
        torch.bfloat16 if torch.bfloat16 in (dtype, values.dtype) else
        torch.float16 if torch.float16 in (dtype, values.dtype) else dtype)
    assert_close(loss.cpu(), ref_loss, tolerance_dtype, scale=ref_loss.abs().max().item() + 1e-30)
    batchmean = kwargs.get("reduction", "batchmean") == "batchmean"
    rows = student.numel() // student.shape[-1] if batchmean else 1
    largest = max(student.abs().max().item(), values.abs().max().item(), temperature)
    assert_close(grad.cpu(), ref_grad, tolerance_dtype, scale=0.75 * largest / rows)
    return loss, grad


def lse_kwargs(mode, lse, device):
    return {"teacher_lse": lse.to(device)} if mode == "lse" else {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("classes,k", [(10, 3), (1000, 64), (4099, 5), (32000, 64)])
def test_matches_reference(device, dtype, mode, classes, k):
    rows = 3 if classes > 10000 else 17
    student = logits((rows, classes), dtype, device, seed=1)
    teacher = logits((rows, classes), dtype, device, seed=2)
    values, indices, lse = sparse_teacher(teacher, k, 2.0)
    check_against_reference(student, values, indices, 2.0, **lse_kwargs(mode, lse, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("values_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_mixed_value_and_index_dtypes_with_float32_student(device, mode, values_dtype,
                                                           index_dtype):
    student = logits((9, 2500), torch.float32, device, seed=3)
    teacher = logits((9, 2500), torch.float32, device, seed=4)
    values, indices, lse = sparse_teacher(teacher, 40, 1.5, values_dtype, index_dtype)
    check_against_reference(student, values, indices, 1.5, **lse_kwargs(mode, lse, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_bf16_student_with_int32_indices(device, mode):
    student = logits((6, 32000), torch.bfloat16, device, seed=5)
    teacher = logits((6, 32000), torch.bfloat16, device, seed=6)
    values, indices, lse = sparse_teacher(teacher, 64, 1.0, index_dtype=torch.int32)
    check_against_reference(student, values, indices, 1.0, **lse_kwargs(mode, lse, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_reductions_and_masks_on_3d_logits(device, mode, reduction):
    student = logits((4, 5, 300), torch.float32, device, seed=7)
    teacher = logits((4, 5, 300), torch.float32, device, seed=8)
    values, indices, lse = sparse_teacher(teacher, 7, 2.0)
    labels = torch.randint(0, 300, (4, 5), generator=torch.Generator().manual_seed(0))
    labels[0, 1] = labels[2, 3] = labels[3, 0] = -1
    loss, grad = check_against_reference(
        student, values, indices, 2.0, reduction=reduction, labels=labels.to(device),
        ignore_index=-1, **lse_kwargs(mode, lse, device))
    assert loss.shape == ((4, 5) if reduction == "none" else ())
    assert (grad[0, 1] == 0).all() and (grad[3, 0] == 0).all()
    if reduction == "none":
        assert loss[0, 1] == 0 and loss[2, 3] == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_batchmean_divides_by_valid_rows_and_all_masked_is_zero(device, mode):
    student = logits((6, 50), torch.float32, device, seed=9).requires_grad_()
    teacher = logits((6, 50), torch.float32, device, seed=10)
    values, indices, lse = sparse_teacher(teacher, 4, 1.0)
    extra = lse_kwargs(mode, lse, device)
    labels = torch.tensor([0, -100, 1, -100, 2, 3], device=device)
    per_row = pykd.sparse_kd_loss(student, values, indices, reduction="none", labels=labels,
                                  **extra)
    mean = pykd.sparse_kd_loss(student, values, indices, labels=labels, **extra)
    torch.testing.assert_close(mean, per_row.sum() / 4)
    none_valid = torch.full((6,), -100, device=device)
    loss = pykd.sparse_kd_loss(student, values, indices, labels=none_valid, **extra)
    loss.backward()
    assert loss.item() == 0 and (student.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_one_entry(device, mode):
    """K = 1: renormalised, p = 1 and the loss is -T^2 log p_s[idx]."""
    student = logits((8, 700), torch.float64, device, seed=11)
    teacher = logits((8, 700), torch.float64, device, seed=12)
    values, indices, lse = sparse_teacher(teacher, 1, 3.0)
    loss, _ = check_against_reference(student, values, indices, 3.0,
                                      **lse_kwargs(mode, lse, device))
    if mode == "renormalised":
        log_ps = torch.log_softmax(student / 3.0, -1).gather(-1, indices)
        torch.testing.assert_close(loss, -9.0 * log_ps.mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("classes", [10, 5000])
def test_all_classes_equal_dense_kd_loss(device, dtype, mode, classes):
    """K = V with the indices a permutation: the dense loss (with teacher_lse, r = 0)."""
    student = logits((5, classes), dtype, device, seed=13).requires_grad_()
    teacher = logits((5, classes), dtype, device, seed=14)
    values, indices, lse = sparse_teacher(teacher, classes, 2.0)
    sparse = pykd.sparse_kd_loss(student, values, indices, 2.0, **lse_kwargs(mode, lse, device))
    (sparse_grad,) = torch.autograd.grad(sparse, student)
    dense = pykd.kd_loss(student, teacher, 2.0)
    (dense_grad,) = torch.autograd.grad(dense, student)
    assert_close(sparse, dense, dtype, scale=dense.abs().item())
    assert_close(sparse_grad, dense_grad, dtype, scale=student.abs().max().item() / 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_repeated_indices_are_separate_entries(device, mode):
    student = logits((4, 3000), torch.float32, device, seed=15)
    teacher = logits((4, 3000), torch.float32, device, seed=16)
    values, indices, lse = sparse_teacher(teacher, 20, 1.0)
    indices[:, 5] = indices[:, 2]  # the same class twice, with two values
    indices[1, 7] = indices[1, 9] = indices[1, 11] = indices[1, 0]  # four times
    values, lse = values.to(device), lse
    check_against_reference(student, values, indices.to(device), 1.0,
                            **lse_kwargs(mode, lse * 0.5 + 1.0, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_holding_nearly_all_student_mass_stays_finite(device, dtype):
    """The student's tail q is ~e^-60..e^-200 of its mass: 1 - sum(p_s[idx]) would be 0 (a loss
    of +inf); summed over the tail classes (relative to their own maximum) it is exact."""
    classes, k = 5000, 16
    teacher = logits((4, classes), torch.float32, device, seed=17)
    values, indices, lse = sparse_teacher(teacher, k, 1.0)
    student = torch.zeros(4, classes, dtype=torch.float64)
    for row, gap in enumerate([60.0, 90.0, 130.0, 200.0]):
        student[row].scatter_(0, indices[row].cpu(), gap)
    student = student.to(dtype).to(device)
    loss, grad = check_against_reference(student, values, indices, 1.0,
                                         teacher_lse=lse.to(device), reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_teacher_mass_above_one_clamps_the_tail(device):
    """A teacher_lse slightly too small makes sum p_k > 1: r is 0, not negative (no NaN)."""
    student = logits((3, 200), torch.float32, device, seed=18)
    teacher = logits((3, 200), torch.float32, device, seed=19)
    values, indices, lse = sparse_teacher(teacher, 200, 1.0)
    loss, grad = check_against_reference(student, values[:, :199], indices[:, :199], 1.0,
                                         teacher_lse=(lse - 1e-3).to(device))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_student_without_tail_mass_gives_inf(device):
    student = logits((2, 40), torch.float32, device, seed=20)
    teacher = logits((2, 40), torch.float32, device, seed=21)
    values, indices, lse = sparse_teacher(teacher, 5, 1.0)
    tail = torch.ones(2, 40, dtype=torch.bool).scatter(-1, indices.cpu(), False).to(device)
    student = student.masked_fill(tail, -math.inf).requires_grad_()
    per_row = pykd.sparse_kd_loss(student, values, indices, teacher_lse=lse.to(device),
                                  reduction="none")
    assert (per_row == math.inf).all()
    per_row.sum().backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("classes", [7, 3000])
def test_gradcheck(device, mode, classes):
    student = logits((3, classes), torch.float64, device, seed=22).requires_grad_()
    teacher = logits((3, classes), torch.float64, device, seed=23)
    values, indices, lse = sparse_teacher(teacher, 4, 2.0)
    labels = torch.tensor([1, -100, 2], device=device)
    extra = {"teacher_lse": lse.double().to(device)} if mode == "lse" else {}
    for reduction in ("batchmean", "none"):
        with pykd.ops.functional_backward():  # gradcheck runs backward more than once
            assert torch.autograd.gradcheck(
                lambda s: pykd.sparse_kd_loss(s, values, indices, 2.0, reduction, labels=labels,
                                              **extra),
                (student,), eps=1e-6, atol=1e-6, fast_mode=classes > 100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.float64,) * 2])
def test_opcheck(device, mode, dtypes):
    student = logits((4, 100), dtypes[0], device, seed=24).requires_grad_()
    teacher = logits((4, 100), dtypes[1], device, seed=25)
    values, indices, lse = sparse_teacher(teacher, 8, 2.0, index_dtype=torch.int32)
    lse = lse.to(device) if mode == "lse" else None
    labels = torch.tensor([1, -100, 2, 3], device=device)
    for args in [(None, "batchmean"), (labels, "none"), (labels, "sum")]:
        with pykd.ops.functional_backward():
            torch.library.opcheck(
                torch.ops.pykd.sparse_kd_loss,
                (student, values, indices, lse, args[0], 2.0, -100, args[1], True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_fullgraph(device, mode):
    torch._dynamo.reset()
    student = logits((6, 500), torch.float32, device, seed=26)
    teacher = logits((6, 500), torch.float32, device, seed=27)
    values, indices, lse = sparse_teacher(teacher, 10, 4.0)
    labels = torch.tensor([1, -100, 2, 3, 4, 5], device=device)
    extra = lse_kwargs(mode, lse, device)
    compiled = torch.compile(pykd.sparse_kd_loss, fullgraph=True)
    s = student.clone().requires_grad_()
    loss = compiled(s, values, indices, 4.0, labels=labels, **extra)
    loss.backward()
    s2 = student.clone().requires_grad_()
    expected = pykd.sparse_kd_loss(s2, values, indices, 4.0, labels=labels, **extra)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(s.grad, s2.grad)


def test_teacher_gets_no_gradient():
    student = logits((3, 30), torch.float32, "cpu").requires_grad_()
    values = logits((3, 4), torch.float32, "cpu").requires_grad_()
    indices = torch.tensor([[0, 1, 2, 3]] * 3)
    lse = torch.full((3,), 5.0, requires_grad=True)
    pykd.sparse_kd_loss(student, values, indices, teacher_lse=lse).backward()
    assert student.grad is not None and values.grad is None and lse.grad is None
    # Only the teacher requiring grad: the loss is a constant.
    loss = pykd.sparse_kd_loss(student.detach(), values, indices)
    assert not loss.requires_grad


def test_autograd_keeps_only_the_gradient():
    student = logits((4, 1000), torch.float32, "cpu").requires_grad_()
    values, indices, _ = sparse_teacher(logits((4, 1000), torch.float32, "cpu", seed=1), 8, 1.0)
    loss = pykd.sparse_kd_loss(student, values, indices)
    saved = loss.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == student.shape
    assert saved[0].data_ptr() != student.data_ptr()


@pytest.mark.parametrize("bad", [-1, 30, 1000])
def test_index_out_of_range_raises_on_cpu(bad):
    student = logits((3, 30), torch.float32, "cpu").requires_grad_()
    values = logits((3, 4), torch.float32, "cpu")
    indices = torch.tensor([[0, 1, 2, 3]] * 3)
    indices[1, 2] = bad
    with pytest.raises(ValueError, match=r"teacher_indices must be class indices in \[0, 30\)"):
        pykd.sparse_kd_loss(student, values, indices)
    # The indices of a masked row are not read.
    labels = torch.tensor([0, -100, 0])
    loss = pykd.sparse_kd_loss(student, values, indices, labels=labels)
    assert torch.isfinite(loss)


def test_empty_batch():
    student = torch.zeros(0, 10, requires_grad=True)
    loss = pykd.sparse_kd_loss(student, torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and student.grad.shape == (0, 10)


S, V3, I3 = torch.zeros(4, 10), torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long)


@pytest.mark.parametrize(
    "args,kwargs,error,message",
    [
        ((S, torch.zeros(4, 11), torch.zeros(4, 11, dtype=torch.long)), {}, ValueError,
         "K = 11 entries per row, more than the student's 10 classes"),
        ((S, torch.zeros(4, 0), torch.zeros(4, 0, dtype=torch.long)), {}, ValueError,
         r"at least one entry per row \(K >= 1\)"),
        ((S, torch.zeros(5, 3), torch.zeros(5, 3, dtype=torch.long)), {}, ValueError,
         "teacher_values must have the shape of student_logits"),
        ((S, torch.zeros(4, 1, 3), torch.zeros(4, 1, 3, dtype=torch.long)), {}, ValueError,
         "teacher_values must have the shape of student_logits"),
        ((S, V3, torch.zeros(4, 2, dtype=torch.long)), {}, ValueError,
         "teacher_indices must have the shape of teacher_values"),
        ((S, V3, I3.float()), {}, TypeError, "teacher_indices must be int32 or int64"),
        ((S, V3, I3.to(torch.int16)), {}, TypeError, "teacher_indices must be int32 or int64"),
        ((S, V3.long(), I3), {}, TypeError, "teacher_values must be a floating-point"),
        ((S.double(), V3, I3), {}, TypeError, "must both be float16/bfloat16/float32"),
        ((torch.tensor(1.0), V3, I3), {}, ValueError, "at least one dimension"),
        ((S, V3, I3), {"teacher_lse": torch.zeros(4, 1)}, ValueError,
         "teacher_lse must have the shape"),
        ((S, V3, I3), {"teacher_lse": torch.zeros(4, dtype=torch.bfloat16)}, TypeError,
         "teacher_lse must be float32 or float64"),
        ((S, V3, I3), {"labels": torch.zeros(3, dtype=torch.long)}, ValueError,
         "labels must have the shape"),
        ((S, V3, I3), {"labels": torch.zeros(4)}, TypeError, "labels must be an integer"),
        ((S, V3, I3, 0.0), {}, ValueError, "temperature must be a finite number > 0"),
        ((S, V3, I3, math.inf), {}, ValueError, "temperature must be a finite number > 0"),
        ((S, V3, I3, "2"), {}, TypeError, "temperature must be a Python number"),
        ((S, V3, I3, 1.0, "mean"), {}, ValueError, "reduction must be one of"),
        ((S, V3.tolist(), I3), {}, TypeError, "teacher_values must be a torch.Tensor"),
        ((S, V3, I3), {"teacher_lse": 1.0}, TypeError, "teacher_lse must be a torch.Tensor"),
        ((S, V3, I3), {"ignore_index": 1.5}, TypeError, "ignore_index must be an integer"),
        ((S, V3, I3), {"ignore_index": -2**63 - 1}, ValueError, "ignore_index must fit in int64"),
        ((S, V3, I3, 1.0, None), {}, ValueError, "reduction must be one of"),
    ],
)
def test_bad_input(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        pykd.sparse_kd_loss(*args, **kwargs)


def test_op_checks_its_reduction():
    with pytest.raises(ValueError, match="sparse_kd_loss: reduction must be one of"):
        torch.ops.pykd.sparse_kd_loss(S, V3, I3, None, None, 1.0, -100, "mean", False)


def test_eager_formula_agrees_with_the_reference():
    """The benchmarks' baseline computes the same loss (where 1 - sum p_s[idx] is accurate)."""
    student = logits((8, 400), torch.float64, "cpu", seed=28)
    teacher = logits((8, 400), torch.float64, "cpu", seed=29)
    values, indices, lse = sparse_teacher(teacher, 12, 2.0)
    for extra in ({}, {"teacher_lse": lse.double()}):
        torch.testing.assert_close(
            reference.eager_sparse_kd_loss(student, values, indices, 2.0, **extra),
            reference.sparse_kd_loss(student, values, indices, 2.0, **extra))


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_kernels_match_reference(capability):
    """The kernels built for CPUs without AVX2, and for AVX2 without AVX-512, forced through
    ATen's own capability switch (on an AVX2 machine "avx2" is its own build)."""
    code = (
        "import torch, pykd; from testing import assert_close; from pykd import reference as R\n"
        "for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):\n"
        "  for shape, k in (((7, 10), 3), ((5, 3000), 64)):\n"
        "    s = (torch.randn(shape) * 3).to(dtype).requires_grad_()\n"
        "    v, i = torch.randn(shape).double().topk(k, -1); v = v.to(dtype)\n"
        "    lse = torch.logsumexp(torch.randn(shape).double() + 5, -1)\n"
        "    for extra in ({}, {'teacher_lse': lse.float()}):\n"
        "      loss = pykd.sparse_kd_loss(s, v, i, 2.0, **extra); loss.backward()\n"
        "      s2 = s.detach().double().requires_grad_()\n"
        "      ref = R.sparse_kd_loss(s2, v, i, 2.0, **extra); ref.backward()\n"
        "      assert_close(loss, ref, dtype, scale=float(ref))\n"
        "      assert_close(s.grad, s2.grad, dtype, scale=float(s2.grad.abs().max()))\n"
        "      s.grad = None\n"
        "print(torch.backends.cpu.get_cpu_capability())\n"
    )
    out = run_python(["-c", code], env={"ATEN_CPU_CAPABILITY": capability})
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() != capability.upper():
        pytest.skip(f"this CPU has no {capability} (ran {out.stdout.strip()})")
