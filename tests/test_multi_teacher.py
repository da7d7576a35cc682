"""pykd.multi_teacher_kd_loss against the float64 reference (pykd.reference)."""
import pytest
import torch

import pykd
from pykd import reference
from testing import DEVICES


def logits(shape, dtype=torch.float64, seed=0, scale=3.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


def run(fn, student, teachers, *args, **kwargs):
    s = student.detach().clone().requires_grad_()
    ts = [t.detach().clone().requires_grad_() for t in teachers]
    loss = fn(s, ts, *args, **kwargs)
    loss.backward(torch.full_like(loss, 0.75))
    return loss.detach(), s.grad, [t.grad for t in ts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("classes", [1, 10, 33, 4099, 32000])
@pytest.mark.parametrize("teachers", [1, 2, 5])
def test_matches_reference_float64(device, classes, teachers):
    rows = 3 if classes > 10000 else 9
    s = logits((rows, classes), seed=1, device=device)
    ts = [logits((rows, classes), seed=2 + k, device=device) for k in range(teachers)]
    w = [0.25 + k for k in range(teachers)]
    loss, gs, gt = run(pykd.multi_teacher_kd_loss, s, ts, w, 2.0)
    ref, rgs, rgt = run(reference.multi_teacher_kd_loss, s, ts, w, 2.0)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gs, rgs, rtol=1e-9, atol=1e-12)
    for a, b in zip(gt, rgt):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_masks_and_reductions(device, reduction):
    s = logits((4, 5, 40), seed=3, device=device)
    ts = torch.stack([logits((4, 5, 40), seed=4 + k, device=device) for k in range(3)])
    labels = (torch.arange(20, device=device).reshape(4, 5) % 3 - 1)
    labels[labels == -1] = -100
    loss, gs, _ = run(pykd.multi_teacher_kd_loss, s, list(ts), reduction=reduction,
                      labels=labels)
    ref, rgs, _ = run(reference.multi_teacher_kd_loss, s, list(ts), reduction=reduction,
                      labels=labels)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gs, rgs)
    assert (gs[labels == -100] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_all_masked_gives_zero(device):
    s = logits((3, 20), seed=5, device=device).requires_grad_()
    ts = torch.stack([logits((3, 20), seed=6, device=device),
                      logits((3, 20), seed=7, device=device)])
    loss = pykd.multi_teacher_kd_loss(s, ts, labels=torch.full((3,), -100, device=device))
    loss.backward()
    assert loss.item() == 0 and (s.grad == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_one_teacher_equals_kd_loss(device):
    s = logits((8, 300), torch.float32, seed=8, device=device)
    t = logits((8, 300), torch.float32, seed=9, device=device)
    a = pykd.multi_teacher_kd_loss(s, [t], temperature=3.0)
    b = pykd.kd_loss(s, t, temperature=3.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("classes", [3000, 32000])
def test_bf16_student_fp32_teachers(device, classes):
    s = logits((6, classes), torch.bfloat16, seed=10, device=device)
    ts = torch.stack([logits((6, classes), torch.float32, seed=11 + k, device=device)
                      for k in range(4)])
    loss, gs, _ = run(pykd.multi_teacher_kd_loss, s, list(ts), None, 2.0)
    ref, rgs, _ = run(reference.multi_teacher_kd_loss, s.double(), [t.double() for t in ts],
                      None, 2.0)
    assert gs.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gs.double(), rgs, rtol=2e-2, atol=2e-3 * 0.75 * 9 / 6)


def test_gradcheck_and_opcheck():
    s = logits((3, 7), seed=12).requires_grad_()
    ts = [logits((3, 7), seed=13).requires_grad_(), logits((3, 7), seed=14).requires_grad_()]
    with pykd.ops.functional_backward():
        assert torch.autograd.gradcheck(
            lambda a, b, c: pykd.multi_teacher_kd_loss(a, [b, c], [0.3, 0.7], 1.5), (s, *ts))
    torch.library.opcheck(
        torch.ops.pykd.multi_teacher_kd_loss,
        (s.detach(), [t.detach() for t in ts], [0.3, 0.7], None, 1.5, -100, "batchmean", True,
         True))


def test_compile_fullgraph():
    s = logits((4, 50), torch.float32, seed=15).requires_grad_()
    ts = torch.stack([logits((4, 50), torch.float32, seed=16 + k) for k in range(3)])
    fn = torch.compile(lambda a, b: pykd.multi_teacher_kd_loss(a, b, [0.2, 0.3, 0.5], 2.0),
                       fullgraph=True)
    loss = fn(s, ts)
    loss.backward(torch.tensor(0.75))
    ref, rgs, _ = run(reference.multi_teacher_kd_loss, s, list(ts), [0.2, 0.3, 0.5], 2.0)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.grad, rgs.float(), rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    s = logits((2, 5))
    t = logits((2, 5))
    with pytest.raises(ValueError, match="1 to 32"):
        pykd.multi_teacher_kd_loss(s, [])
    with pytest.raises(ValueError, match="one number per teacher"):
        pykd.multi_teacher_kd_loss(s, [t, t], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        pykd.multi_teacher_kd_loss(s, [t], [-1.0])
    with pytest.raises(ValueError, match=">= 0"):
        pykd.multi_teacher_kd_loss(s, [t], [float("nan")])
    with pytest.raises(TypeError, match="one dtype"):
        pykd.multi_teacher_kd_loss(s.float(), [t.float(), t.half()])
    with pytest.raises(ValueError, match="multi_teacher_kd_loss: reduction must be one of"):
        pykd.multi_teacher_kd_loss(s, [t], reduction=None)
    with pytest.raises(TypeError, match="multi_teacher_kd_loss: ignore_index must be an integer"):
        pykd.multi_teacher_kd_loss(s, [t], ignore_index="x")
    with pytest.raises(ValueError, match="multi_teacher_kd_loss: ignore_index must fit in int64"):
        pykd.multi_teacher_kd_loss(s, [t], ignore_index=2**64)
