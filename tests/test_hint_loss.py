"""The batched feature-hint loss (SPEC section 2), HintRegressor and FeatureCapture."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykd
from pykd import FeatureCapture, HintRegressor, ops, reference
from testing import DEVICES, DTYPES, assert_close, run_python

# A 4-D conv map, one larger than a CPU chunk (2^16 elements, split across threads), 2-D vectors,
# a 1x1 map and single elements: pairs of different shapes in one call.
SHAPES = [(4, 8, 7, 5), (3, 5, 97, 89), (3, 17), (2, 3, 1, 1), (1,), ()]
WEIGHTS = [0.5, 2.0, 1.0, 0.25, 3.0, 1.5]


def make_features(shapes, dtype, device, requires_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def make(shape):
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    return [make(shape) for shape in shapes], [make(shape) for shape in shapes]


def reference_loss_and_grads(student, teacher, weights):
    """The reference loop in float64 on copies of the same values, with its gradients."""
    s = [x.detach().double().requires_grad_() for x in student]
    t = [x.detach().double().requires_grad_() for x in teacher]
    loss = reference.hint_loss(s, t, weights)
    grads = torch.autograd.grad(loss, s + t)
    return loss, grads[: len(s)], grads[len(s):]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(dtype, device):
    student, teacher = make_features(SHAPES, dtype, device)
    loss = pykd.hint_loss(student, teacher, WEIGHTS)
    assert loss.shape == () and loss.dtype == dtype and loss.device.type == device
    grads = torch.autograd.grad(loss, student + teacher)

    ref_loss, ref_student, ref_teacher = reference_loss_and_grads(student, teacher, WEIGHTS)
    assert_close(loss, ref_loss, dtype)
    for k, (g, g_s, g_t, x) in enumerate(zip(grads, ref_student, ref_teacher, student)):
        assert g.dtype == dtype and g.shape == x.shape, k
        assert_close(g, g_s, dtype)
        assert_close(grads[len(student) + k], g_t, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_default_weights_and_tuples(device):
    student, teacher = make_features(SHAPES[:3], torch.float32, device, requires_grad=False)
    expected = reference.hint_loss(student, teacher)
    assert_close(pykd.hint_loss(tuple(student), tuple(teacher)), expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_student_only_gradient(device):
    """The usual case: a frozen teacher. Only the student's gradients are computed."""
    student, teacher = make_features(SHAPES, torch.float32, device)
    teacher = [t.detach() for t in teacher]
    grads = torch.autograd.grad(pykd.hint_loss(student, teacher, WEIGHTS), student)
    _, ref_student, _ = reference_loss_and_grads(student, teacher, WEIGHTS)
    for g, ref in zip(grads, ref_student):
        assert_close(g, ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_upstream_gradient_scales(device):
    student, teacher = make_features(SHAPES[:3], torch.float32, device)
    (g1,) = torch.autograd.grad(pykd.hint_loss(student, teacher), student[0])
    (g3,) = torch.autograd.grad(-3.0 * pykd.hint_loss(student, teacher), student[0])
    torch.testing.assert_close(g3, -3.0 * g1)


def test_deterministic_across_thread_counts():
    student, teacher = make_features([(2, 300, 500), (33, 1000)], torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            loss = pykd.hint_loss(student, teacher)
            results.append((loss, *torch.autograd.grad(loss, student)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_cpu_kernels_match(capability):
    """The portable kernels and the AVX2 ones (ATEN_CPU_CAPABILITY=default, =avx2) agree with the
    ones this CPU runs."""
    code = (
        "import torch, pykd\n"
        "torch.manual_seed(0)\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    s = [torch.randn(3, 5, 77, 91).to(dtype).requires_grad_(), torch.randn(37).to(dtype)]\n"
        "    t = [torch.randn(3, 5, 77, 91).to(dtype), torch.randn(37).to(dtype)]\n"
        "    loss = pykd.hint_loss(s, t, [0.5, 2.0])\n"
        "    print(repr(loss.item()), repr(torch.autograd.grad(loss, s[0])[0].double().abs().sum().item()))\n"
    )
    outputs = {}
    for forced in (capability, None):
        run = run_python(["-c", code], env={"ATEN_CPU_CAPABILITY": forced}, check=True)
        outputs[forced] = [[float(v) for v in line.split()] for line in run.stdout.splitlines()]
    for dtype, a, b in zip(DTYPES[1:], outputs[capability], outputs[None]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0, msg=str(dtype))


def test_gradcheck():
    """gradcheck backpropagates through one graph twice (its reentrancy check), which the in-place
    backward refuses: functional_backward() lets it. The in-place backward is the same math
    (test_in_place_backward_matches_functional)."""
    student, teacher = make_features([(2, 3, 4, 3), (5, 2), (1,)], torch.float64, "cpu")
    pairs = len(student)

    def fn(*features):
        return pykd.hint_loss(features[:pairs], features[pairs:], [0.7, 1.3, 2.0])

    with ops.functional_backward():
        assert torch.autograd.gradcheck(fn, (*student, *teacher))
        assert torch.autograd.gradcheck(fn, (*student, *teacher), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_backward_matches_functional(device, dtype):
    student, teacher = make_features(SHAPES, dtype, device)
    results = []
    for functional in (False, True):
        with ops.functional_backward() if functional else contextlib.nullcontext():
            loss = pykd.hint_loss(student, teacher, WEIGHTS)
            results.append(torch.autograd.grad(-0.37 * loss, student + teacher))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_opcheck(device, teacher_grad):
    student, teacher = make_features([(2, 3, 4, 5), (3, 7), (1,)], torch.float32, device)
    teacher = [t.detach().requires_grad_(teacher_grad) for t in teacher]
    weights = [1.0, 0.5, 2.0]
    torch.library.opcheck(ops.hint_loss, (student, teacher, weights, True, teacher_grad))
    for wanted in [(True, False), (False, True), (True, True), (False, False)]:
        detached = [s.detach() for s in student], [t.detach() for t in teacher]
        torch.library.opcheck(ops.hint_loss, (*detached, weights, *wanted))


def test_one_pass_outputs():
    """The op's gradients for an upstream gradient of 1, the teacher's the exact negative of the
    student's, and the same loss (bit for bit) whichever gradients are written."""
    student, teacher = make_features(SHAPES, torch.float32, "cpu", requires_grad=False)
    losses = {}
    for wanted in [(False, False), (True, False), (False, True), (True, True)]:
        loss, grad_s, grad_t = ops.hint_loss(student, teacher, WEIGHTS, *wanted)
        losses[wanted] = loss
        assert len(grad_s) == (len(SHAPES) if wanted[0] else 0)
        assert len(grad_t) == (len(SHAPES) if wanted[1] else 0)
        if all(wanted):
            for gs, gt in zip(grad_s, grad_t):
                assert torch.equal(gt, -gs)
    _, ref_student, _ = reference_loss_and_grads(student, teacher, WEIGHTS)
    for g, ref in zip(ops.hint_loss(student, teacher, WEIGHTS, True, False)[1], ref_student):
        assert_close(g, ref, torch.float32)
    for loss in losses.values():
        assert torch.equal(loss, losses[False, False])


def test_forward_only_without_grad():
    student, teacher = make_features(SHAPES[:3], torch.float32, "cpu")
    with torch.no_grad():
        loss = pykd.hint_loss(student, teacher)
    assert not loss.requires_grad
    frozen = [s.detach() for s in student]
    assert not pykd.hint_loss(frozen, [t.detach() for t in teacher]).requires_grad
    with torch.inference_mode():
        assert torch.equal(pykd.hint_loss(student, teacher), loss)


def test_saves_only_the_gradients():
    """Between forward and backward autograd holds the gradients the forward wrote (only those
    asked for), never the features, and the backward returns those very tensors, scaled."""
    student, teacher = make_features([(8, 16, 9, 7), (33, 65), (1,)], torch.float32, "cpu")
    teacher = [teacher[0], teacher[1].detach(), teacher[2].detach()]  # one teacher needs grad
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = pykd.hint_loss(student, teacher, [1.0, 2.0, 3.0])
    features = {f.data_ptr() for f in student + teacher}
    assert not any(t.data_ptr() in features for t in saved)
    assert [t.shape for t in saved] == [f.shape for f in student] + [f.shape for f in teacher]
    feature_bytes = sum(f.nbytes for f in student)
    assert sum(t.nbytes for t in saved) == feature_bytes + sum(f.nbytes for f in teacher)
    grads = torch.autograd.grad(2.5 * loss, student + teacher[:1])
    assert [g.data_ptr() for g in grads] == [t.data_ptr() for t in saved[:4]]  # no copy


@pytest.mark.parametrize("device", DEVICES)
def test_second_backward_raises(device):
    """The backward scales the saved gradients in place, so backpropagating through the same graph
    again must fail loudly (autograd's version counter) instead of using rescaled gradients."""
    student, teacher = make_features([(3, 4), (5,)], torch.float32, device)
    loss = pykd.hint_loss(student, teacher)
    first = torch.autograd.grad(3.0 * loss, student, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph is not "
                                           "supported.*modified by an inplace operation"):
        torch.autograd.grad(loss, student)
    # Even with an upstream gradient of exactly 1 (nothing rescaled, the version still bumped).
    loss = pykd.hint_loss(student, teacher)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # functional_backward() allows it.
    with ops.functional_backward():
        loss = pykd.hint_loss(student, teacher)
        again = [torch.autograd.grad(3.0 * loss, student, retain_graph=True) for _ in range(2)]
    for a, b, c in zip(first, *again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_backward_needs_the_forward_gradients():
    student, teacher = make_features([(3, 4)], torch.float32, "cpu")
    loss = ops.hint_loss(student, [t.detach() for t in teacher], [1.0], False, False)[0]
    with pytest.raises(RuntimeError, match="a gradient is needed that the forward did not compute"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_compile_fullgraph(device, teacher_grad):
    student, teacher = make_features([(2, 3, 4, 5), (3, 7), (1,)], torch.float32, device)
    teacher = [t.detach().requires_grad_(teacher_grad) for t in teacher]
    inputs = student + teacher if teacher_grad else student
    weights = [1.0, 0.5, 2.0]

    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t: 0.5 * pykd.hint_loss(s, t, weights), fullgraph=True)
    loss = compiled(student, teacher)
    grads = torch.autograd.grad(loss, inputs)
    expected_loss = 0.5 * pykd.hint_loss(student, teacher, weights)
    expected_grads = torch.autograd.grad(expected_loss, inputs)
    torch.testing.assert_close(loss, expected_loss)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    with torch.no_grad():
        torch.testing.assert_close(compiled(student, teacher), expected_loss)


def layouts(device):
    """(student, teacher) pairs of one shape in various layouts."""
    def randn(*shape):
        return torch.randn(*shape, device=device)

    cl = torch.channels_last
    return {
        "strided slice": (randn(4, 12, 10, 8)[:, ::2], randn(4, 6, 10, 8)),
        "permuted": (randn(4, 6, 8, 10).transpose(2, 3), randn(4, 6, 10, 8)),
        "channels_last both": (
            randn(4, 6, 10, 8).contiguous(memory_format=cl),
            randn(4, 6, 10, 8).contiguous(memory_format=cl),
        ),
        "channels_last student": (randn(4, 6, 10, 8).contiguous(memory_format=cl), randn(4, 6, 10, 8)),
        "channels_last teacher": (randn(4, 6, 10, 8), randn(4, 6, 10, 8).contiguous(memory_format=cl)),
        "expanded teacher": (randn(4, 6, 10, 8), randn(1, 6, 1, 8).expand(4, 6, 10, 8)),
        "column": (randn(5, 3)[:, 1], randn(5, 3)[:, 2]),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(layouts("cpu")))
def test_non_contiguous_features(device, layout):
    s, t = layouts(device)[layout]
    student = [s.requires_grad_(), torch.randn(7, 3, device=device, requires_grad=True)]
    teacher = [t.requires_grad_(), torch.randn(7, 3, device=device, requires_grad=True)]
    loss = pykd.hint_loss(student, teacher, [1.0, 2.0])
    grads = torch.autograd.grad(loss, student + teacher)
    ref_loss, ref_student, ref_teacher = reference_loss_and_grads(student, teacher, [1.0, 2.0])
    assert_close(loss, ref_loss, torch.float32)
    for g, ref, x in zip(grads, ref_student + ref_teacher, student + teacher):
        assert_close(g, ref, torch.float32)
        assert g.stride() == torch.empty_like(x).stride()


def test_promotes_mixed_dtypes():
    student, teacher = make_features([(3, 4), (5,)], torch.float32, "cpu")
    teacher = [teacher[0].bfloat16(), teacher[1].double()]
    loss = pykd.hint_loss(student, teacher)
    assert loss.dtype == torch.float64
    assert_close(loss, reference.hint_loss(student, teacher), torch.float32)
    grads = torch.autograd.grad(loss, student)
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]


def test_empty_pair_is_nan_like_mse_loss():
    student, teacher = make_features([(0, 3), (2, 2)], torch.float32, "cpu")
    loss = pykd.hint_loss(student, teacher)
    assert torch.isnan(loss)
    grads = torch.autograd.grad(loss, student)
    assert grads[0].shape == (0, 3)


def test_errors():
    s, t = make_features([(2, 3), (4,)], torch.float32, "cpu", requires_grad=False)
    with pytest.raises(ValueError, match="at least one feature pair"):
        pykd.hint_loss([], [])
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        pykd.hint_loss(s, t[:1])
    with pytest.raises(TypeError, match="student_features must be a list or tuple"):
        pykd.hint_loss(s[0], t[0])
    with pytest.raises(TypeError, match=r"teacher_features\[1\] must be a torch.Tensor"):
        pykd.hint_loss(s, [t[0], 1.0])
    with pytest.raises(ValueError, match=r"student_features\[1\] and teacher_features\[1\] must "
                                         r"have the same shape, got \[4\] and \[5\]"):
        pykd.hint_loss(s, [t[0], torch.zeros(5)])
    with pytest.raises(ValueError, match=r"weights must hold one number per pair \(2\), got 3"):
        pykd.hint_loss(s, t, [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match=r"weights\[1\] must be a number"):
        pykd.hint_loss(s, t, [1.0, "2"])
    with pytest.raises(ValueError, match=r"weights\[0\] must be finite"):
        pykd.hint_loss(s, t, [float("nan"), 1.0])
    with pytest.raises(TypeError, match="floating-point"):
        pykd.hint_loss([torch.ones(3, dtype=torch.long)], [torch.ones(3, dtype=torch.long)])
    # The op itself does not promote dtypes.
    with pytest.raises(TypeError, match=r"hint_loss: all features must have the dtype of "
                                        r"student_features\[0\].*in pair 1"):
        ops.hint_loss(s, [t[0], t[1].double()], [1.0, 1.0], True, False)
    with pytest.raises(ValueError, match=r"hint_loss: weights\[1\] must be finite"):
        ops.hint_loss(s, t, [1.0, float("inf")], False, False)
    with pytest.raises(ValueError, match=r"hint_loss: weights must hold one number per pair"):
        ops.hint_loss(s, t, [1.0], False, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_names_the_pair():
    s, t = make_features([(2, 3), (4,)], torch.float32, "cuda", requires_grad=False)
    with pytest.raises(ValueError, match=r"device of student_features\[0\].*in pair 1"):
        ops.hint_loss(s, [t[0], t[1].cpu()], [1.0, 1.0], True, False)


# HintRegressor


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_regressor_conv_keeps_size(kernel_size):
    reg = HintRegressor(8, 16, kernel_size=kernel_size)
    x = torch.randn(2, 8, 9, 7)
    out = reg(x)
    assert out.shape == (2, 16, 9, 7)
    torch.testing.assert_close(out, reg.proj(x))
    torch.testing.assert_close(reg(x, size=(9, 7)), out)


def test_regressor_resizes():
    reg = HintRegressor(4, 6)
    x = torch.randn(2, 4, 14, 10)
    plain = reg(x)
    torch.testing.assert_close(reg(x, size=(7, 5)), F.adaptive_avg_pool2d(plain, (7, 5)))
    torch.testing.assert_close(reg(x, size=[7, 10]), F.adaptive_avg_pool2d(plain, (7, 10)))
    grown = reg(x, size=(28, 20))
    torch.testing.assert_close(
        grown, F.interpolate(plain, size=(28, 20), mode="bilinear", align_corners=False)
    )
    assert reg(x, size=(28, 5)).shape == (2, 6, 28, 5)


def test_regressor_linear():
    reg = HintRegressor(12, 20, kind="linear")
    x = torch.randn(5, 12)
    assert reg(x).shape == (5, 20)
    torch.testing.assert_close(reg(x), reg.proj(x))


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_regressor_parameters_train(kind):
    torch.manual_seed(0)
    reg = HintRegressor(3, 5, kind=kind)
    shape = (2, 3, 6, 6) if kind == "conv" else (4, 3)
    x = torch.randn(shape, requires_grad=True)
    teacher = torch.randn(2, 5, 3, 3) if kind == "conv" else torch.randn(4, 5)
    size = teacher.shape[-2:] if kind == "conv" else None
    loss = pykd.hint_loss([reg(x, size=size)], [teacher])
    loss.backward()
    for name, p in reg.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None
    before = loss.item()
    opt = torch.optim.SGD(reg.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        loss = pykd.hint_loss([reg(x, size=size)], [teacher])
        loss.backward()
        opt.step()
    assert loss.item() < before


def test_regressor_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        HintRegressor(3, 4, kind="mlp")
    with pytest.raises(ValueError, match="kernel_size must be 1 or 3, got 2"):
        HintRegressor(3, 4, kernel_size=2)
    with pytest.raises(ValueError, match="kernel_size applies to kind='conv' only"):
        HintRegressor(3, 4, kernel_size=3, kind="linear")
    with pytest.raises(ValueError, match="student_channels must be > 0"):
        HintRegressor(0, 4)
    with pytest.raises(TypeError, match="teacher_channels must be an int"):
        HintRegressor(3, 4.0)
    conv, linear = HintRegressor(3, 4), HintRegressor(3, 4, kind="linear")
    with pytest.raises(ValueError, match=r"expected a feature map \[N, 3, H, W\], got shape \(2, 5, 4, 4\)"):
        conv(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"expected a feature map"):
        conv(torch.randn(2, 3))
    with pytest.raises(ValueError, match="size must be the teacher's spatial size"):
        conv(torch.randn(2, 3, 4, 4), size=(4, 0))
    with pytest.raises(ValueError, match="size must be the teacher's spatial size"):
        conv(torch.randn(2, 3, 4, 4), size=4)
    with pytest.raises(ValueError, match=r"expected features \[N, 3\]"):
        linear(torch.randn(2, 4))
    with pytest.raises(ValueError, match="size applies to kind='conv' only"):
        linear(torch.randn(2, 3), size=(2, 2))


# FeatureCapture


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_features():
    model = small_net()
    x = torch.randn(2, 3, 6, 6)
    with FeatureCapture(model, ["2", "0.2", "0"]) as cap:
        assert cap.features == {}
        out = model(x)
        feats = cap.features
        assert list(feats) == ["2", "0.2", "0"]
        torch.testing.assert_close(feats["2"], out)
        torch.testing.assert_close(feats["0.2"], model[0][2](model[0][1](model[0][0](x))))
        torch.testing.assert_close(feats["0"], model[0](x))
        assert feats["0.2"].requires_grad
        out2 = model(x + 1)  # every forward refreshes the capture
        torch.testing.assert_close(cap.features["2"], out2)
    assert hook_count(model) == 0
    torch.testing.assert_close(cap.features["2"], out2)  # still readable after removal
    model(x)
    torch.testing.assert_close(cap.features["2"], out2)  # no longer updated


def test_capture_remove_and_exceptions():
    model = small_net()
    cap = FeatureCapture(model, ["0.1"])
    assert hook_count(model) == 2
    cap.remove()
    cap.remove()  # idempotent
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureCapture(model, ["0.1", "2"]):
            raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_capture_errors():
    model = small_net()
    with pytest.raises(KeyError, match=r"no submodule named \['features.9', '5'\]"):
        FeatureCapture(model, ["0.1", "features.9", "5"])
    assert hook_count(model) == 0
    with pytest.raises(TypeError, match="names must be a list or tuple"):
        FeatureCapture(model, "0.1")
    with pytest.raises(ValueError, match="must not repeat"):
        FeatureCapture(model, ["0.1", "0.1"])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        FeatureCapture(lambda x: x, ["0"])


def test_capture_distillation_step():
    """Hints from captured layers train the student and its regressor, the teacher is untouched."""
    teacher, student = small_net(), small_net()
    regressor = HintRegressor(4, 8, kind="conv")
    x = torch.randn(2, 3, 6, 6)
    with FeatureCapture(teacher, ["0.3"]) as t_cap, FeatureCapture(student, ["0.1"]) as s_cap:
        with torch.no_grad():
            teacher(x)
        student(x)
        t_feat = t_cap.features["0.3"]
        s_feat = regressor(s_cap.features["0.1"], size=t_feat.shape[-2:])
        pykd.hint_loss([s_feat], [t_feat]).backward()
    assert student[0][0].weight.grad is not None and regressor.proj.weight.grad is not None
    assert student[2].weight.grad is None  # after the hinted layer
    assert all(p.grad is None for p in teacher.parameters())


def test_second_derivatives_raise():
    student = [torch.randn(3, 4, dtype=torch.float64, requires_grad=True)]
    teacher = [torch.randn(3, 4, dtype=torch.float64)]
    with pytest.raises(RuntimeError, match="hint_loss: second derivatives are not implemented"):
        torch.autograd.grad(pykd.hint_loss(student, teacher), student, create_graph=True)
