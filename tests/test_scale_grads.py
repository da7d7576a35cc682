"""pykd::scale_grads_, the backward of every fused loss, and pykd.ops.scale_saved_grads."""
import pytest
import torch

from pykd import ops
from testing import DEVICES, DTYPES

SCALES = [1.0, -0.37, 0.0, 2.5]


def grads_of(shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            for s in shapes]


def expected(grad, scale):
    """grad * scale in the gradient's accumulation dtype, rounded once to its dtype."""
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return (grad.to(acc) * scale.to(acc)).to(grad.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", SCALES)
def test_one_scale_for_all(device, dtype, scale_dtype, value):
    # Odd sizes (vector tails), one larger than a CPU run of 2^16 elements, an empty one, a 0-d one.
    grads = grads_of([(3, 5, 7), (70001,), (0, 3), ()], dtype, device)
    scale = torch.tensor(value, dtype=scale_dtype, device=device)
    want = [expected(g, scale) for g in grads]
    versions = [g._version for g in grads]
    ops.scale_grads_(grads, scale)
    for g, w, v in zip(grads, want, versions):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert g._version == v + 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 11), (4, 5, 16), (1, 9), (6, 1)])
def test_one_scale_per_row(device, dtype, shape):
    grads = grads_of([shape, shape], dtype, device)  # the student's and the teacher's
    rows = shape[:-1]
    scale = torch.randn(rows, dtype=torch.float32, device=device)
    scale.view(-1)[::3] = 1.0  # rows left as they are
    want = [expected(g, scale.unsqueeze(-1)) for g in grads]
    ops.scale_grads_(grads, scale)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_scale_layouts(device):
    """The upstream gradient of a per-row loss can be an expanded 1 (loss.sum().backward()), a
    slice or any shape with one value per row."""
    g = grads_of([(6, 4, 10)], torch.float32, device)[0]
    for scale in [
        torch.ones((), device=device).expand(6, 4),
        torch.randn(6, 8, device=device)[:, ::2],
        torch.randn(24, device=device),
        torch.randn(2, 3, 4, device=device),
    ]:
        want = expected(g, scale.reshape(6, 4, 1))
        ops.scale_grads_([g], scale)
        torch.testing.assert_close(g, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_layouts_and_mixed_dtypes(device):
    cl = torch.randn(2, 3, 5, 7, device=device).contiguous(memory_format=torch.channels_last)
    transposed = torch.randn(9, 4, device=device).t()
    half = torch.randn(33, device=device, dtype=torch.bfloat16)
    grads = [cl, transposed, half]
    scale = torch.tensor(-1.5, dtype=torch.float64, device=device)
    want = [expected(g, scale) for g in grads]
    ops.scale_grads_(grads, scale)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert cl.is_contiguous(memory_format=torch.channels_last)


def flushed_by_a_write():
    """A float32 subnormal read or written under flush-to-zero becomes 0: so a subnormal that
    survives a call was not touched. Returns whether this thread flushes (it does on x86)."""
    x = torch.full((4,), 1e-40)
    x.mul_(1.0)
    return bool((x == 0).all())


def test_scale_one_touches_nothing():
    """A scale of exactly 1 leaves the gradient untouched, not multiplied by 1. Small tensors are
    scaled on the calling thread, whose flush-to-zero mode makes any write of a subnormal 0."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        if not flushed_by_a_write():
            pytest.skip("flush-to-zero does not flush on this thread")
        g = torch.full((5, 8), 1e-40)
        ops.scale_grads_([g], torch.tensor(1.0))
        assert (g == 1e-40).all()
        ops.scale_grads_([g], torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0]))  # rows 1 and 4 scaled
        assert (g[[0, 2, 3]] == 1e-40).all() and (g[[1, 4]] == 0).all()
        ops.scale_grads_([g], torch.tensor(2.0))
        assert (g == 0).all()
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    grads = grads_of([(3, 7), (5, 7)], torch.float32, device)
    torch.library.opcheck(ops.scale_grads_, (grads, torch.tensor(0.5, device=device)))
    torch.library.opcheck(ops.scale_grads_, (grads[:1], torch.rand(3, device=device)))


def test_errors():
    g = torch.randn(4, 3)
    with pytest.raises(TypeError, match="scale must be a floating-point tensor, got Long"):
        ops.scale_grads_([g], torch.tensor(2))
    with pytest.raises(TypeError, match=r"grads\[1\] must be a floating-point tensor, got Int"):
        ops.scale_grads_([g, torch.ones(3, dtype=torch.int32)], torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"grads\[0\] must be dense"):
        ops.scale_grads_([torch.randn(4, 6)[:, ::2]], torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"one per row of each gradient, got shape \[3\] for "
                                         r"grads\[0\] of shape \[4, 3\]"):
        ops.scale_grads_([g], torch.ones(3))
    with pytest.raises(ValueError, match=r"grads\[1\] of shape \[5, 3\]"):
        ops.scale_grads_([g, torch.randn(5, 3)], torch.ones(4))
    with pytest.raises(ValueError, match=r"one per row.*got shape \[2\] for grads\[0\] of shape \[\]"):
        ops.scale_grads_([torch.tensor(1.0)], torch.ones(2))
    with pytest.raises(ValueError, match=r"grads\[0\] is scaled per row and must be contiguous"):
        ops.scale_grads_([torch.randn(3, 4).t()], torch.ones(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch():
    with pytest.raises(ValueError, match=r"grads\[0\] and scale must be on one device"):
        ops.scale_grads_([torch.randn(3, device="cuda")], torch.tensor(2.0))


# scale_saved_grads, the helper every fused loss's backward calls


def test_scale_saved_grads_in_place():
    grads = grads_of([(4, 6), (4, 6)], torch.float32, "cpu")
    copies = [g.clone() for g in grads]
    out = ops.scale_saved_grads(grads, torch.tensor(3.0))
    assert all(o is g for o, g in zip(out, grads))  # zero-copy: the saved tensors themselves
    for o, c in zip(out, copies):
        torch.testing.assert_close(o, 3.0 * c, rtol=0, atol=0)
    rows = torch.tensor([1.0, 2.0, -1.0, 0.5])
    out = ops.scale_saved_grads(grads, rows)
    for o, c in zip(out, copies):
        torch.testing.assert_close(o, 3.0 * c * rows.unsqueeze(-1), rtol=0, atol=0)


def test_scale_saved_grads_functional():
    grads = grads_of([(4, 6), (4, 6)], torch.bfloat16, "cpu")
    copies = [g.clone() for g in grads]
    for scale in [torch.tensor(3.0), torch.tensor([1.0, 2.0, -1.0, 0.5])]:
        with ops.functional_backward():
            out = ops.scale_saved_grads(grads, scale)
        want = [expected(c, scale if scale.dim() == 0 else scale.unsqueeze(-1)) for c in copies]
        for o, g, c, w in zip(out, grads, copies, want):
            assert o is not g and o.dtype == g.dtype
            assert torch.equal(g, c)  # the saved gradient is left as it was
            torch.testing.assert_close(o, w, rtol=0, atol=0)
