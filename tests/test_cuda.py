"""CUDA-specific tests of the KD loss kernels: every dtype and row-length regime against the CPU
kernel and the float64 reference, the scalar and 16-byte paths, extreme values, CUDA graphs and
torch.compile. The generic test matrix (test_kd_loss.py) covers the API on every device."""
import pytest
import torch

import pykd
from pykd import ops, reference
from testing import DTYPES, assert_close, cuda_kernels_built

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_kernels_built()),
    reason="needs a CUDA GPU and pykd built with its CUDA kernels",
)

# Short rows (a few threads or a warp per row), long rows (a block per row), and odd sizes that
# take the scalar path.
CLASS_COUNTS = [1, 3, 10, 1000, 4099, 32000, 128256, 262144]


def rows_for(classes):
    """Enough rows to fill several blocks of short rows (and not a multiple of a block's rows)."""
    return 67 if classes <= 1000 else 9 if classes <= 32000 else 3


def logits(shape, dtype, scale=3.0, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)


def run_kd(s, t, temperature, teacher_grad=False, weights=None):
    """The fused ops' outputs, the loss, and the gradients of the batch-mean loss (or of
    sum(weights * per-row loss))."""
    s = s.detach().requires_grad_()
    t = t.detach().requires_grad_(teacher_grad)
    kl, lse_s, lse_t = ops.kd_loss_fwd(s, t, temperature)
    if weights is None:
        loss = pykd.kd_loss(s, t, temperature)
    else:
        loss = (pykd.kd_loss(s, t, temperature, reduction="none") * weights).sum()
    grads = torch.autograd.grad(loss, [s, t] if teacher_grad else [s])
    return [kl.detach(), lse_s.detach(), lse_t.detach(), loss.detach(), *grads]


def run_reference(s, t, temperature, teacher_grad=False, weights=None):
    """The same quantities in float64 from the same input values: the loss from
    pykd.reference.kd_loss, the gradients from SPEC section 1's formulas."""
    s, t = s.detach().double(), t.detach().double()
    per_row = reference.kd_loss(s, t, temperature, reduction="none")
    kl = per_row / temperature**2
    rows = kl.numel()
    if weights is None:
        loss, grad_kl = per_row.sum() / rows, torch.full_like(kl, temperature**2 / rows)
    else:
        loss, grad_kl = (per_row * weights.double()).sum(), weights.double() * temperature**2
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = torch.log_softmax(t / temperature, dim=-1)
    p_t = log_pt.exp()
    scale = (grad_kl / temperature).unsqueeze(-1)
    grads = [scale * (log_ps.exp() - p_t)]
    if teacher_grad:
        teacher = torch.where(p_t > 0, p_t * (log_pt - log_ps - kl.unsqueeze(-1)), 0.0)
        grads.append(scale * teacher)
    lse_s = torch.logsumexp(s / temperature, dim=-1)
    lse_t = torch.logsumexp(t / temperature, dim=-1)
    return [kl, lse_s, lse_t, loss, *grads]


def check_results(actual, expected, dtype, grad_dtype=None):
    """Row statistics at the accumulation dtype's tolerance, the loss at the input dtype's and
    the gradients at grad_dtype's (default: the input dtype's); absolute tolerances relative to
    the largest finite expected value."""
    names = ["kl", "student_lse", "teacher_lse", "loss", "grad_student", "grad_teacher"]
    tol_dtypes = [ops.accumulation_dtype(dtype)] * 3 + [dtype] + [grad_dtype or dtype] * 2
    for name, tol_dtype, a, e in zip(names, tol_dtypes, actual, expected):
        finite = e[torch.isfinite(e)]
        scale = max(finite.abs().max().item(), 1e-30) if finite.numel() else 1.0
        try:
            assert_close(a.cpu(), e.cpu(), tol_dtype, scale=scale)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


def check_kd(s, t, temperature=2.0, teacher_grad=True, weights=None, grad_dtype=None):
    """CUDA against the CPU kernel on the same inputs and against the float64 reference."""
    cuda = run_kd(s, t, temperature, teacher_grad, weights)
    cpu_weights = None if weights is None else weights.cpu()
    cpu = run_kd(s.cpu(), t.cpu(), temperature, teacher_grad, cpu_weights)
    check_results(cuda, cpu, s.dtype, grad_dtype)
    reference_results = run_reference(s, t, temperature, teacher_grad, weights)
    check_results(cuda, reference_results, s.dtype, grad_dtype)
    for grad in cuda[4:]:
        assert grad.dtype == s.dtype and grad.shape == s.shape and grad.is_contiguous()
    return cuda


@pytest.mark.parametrize("classes", CLASS_COUNTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_cpu_and_reference(dtype, classes):
    rows = rows_for(classes)
    check_kd(logits((rows, classes), dtype), logits((rows, classes), dtype, seed=1))


@pytest.mark.parametrize("classes", [1, 10, 1000, 4099, 32000, 128256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_rows(dtype, classes):
    # Slices of wider tensors: rows start one element in (never 16-byte aligned), and their
    # stride is not the row length.
    rows = rows_for(classes)
    s = logits((rows, classes + 5), dtype)[:, 1 : classes + 1]
    t = logits((rows, classes + 5), dtype, seed=1)[:, 1 : classes + 1]
    assert not s.is_contiguous()
    check_kd(s, t)


@pytest.mark.parametrize("classes", [16, 1000, 32000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_aligned_strided_rows(dtype, classes):
    # Rows 16-byte aligned with a stride longer than the row: the vectorised path on a view.
    rows = rows_for(classes)
    s = logits((rows, classes + 64), dtype)[:, :classes]
    t = logits((rows, classes + 64), dtype, seed=1)[:, 64:]
    check_kd(s, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_other_layouts(dtype):
    # Token-level [B, L, V] logits, a transposed (column-strided) student, a broadcast teacher.
    s = logits((3, 5, 1000), dtype)
    t = logits((3, 5, 1000), dtype, seed=1)
    check_kd(s, t)
    s2 = logits((1000, 37), dtype).t()
    check_kd(s2, logits((37, 1000), dtype, seed=1))
    check_kd(logits((37, 1000), dtype), logits((1, 1000), dtype, seed=1).expand(37, 1000),
             teacher_grad=False)


@pytest.mark.parametrize("classes", [10, 1000, 32000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_upstream_gradient(dtype, classes):
    # reduction="none" with per-row weights: grad_kl is a real tensor, not a broadcast scalar.
    rows = rows_for(classes)
    weights = torch.rand(rows, device="cuda", dtype=dtype)
    check_kd(logits((rows, classes), dtype), logits((rows, classes), dtype, seed=1),
             weights=weights)


@pytest.mark.parametrize("classes", [10, 1000, 4099, 128256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_teacher_minus_inf(dtype, classes):
    # Classes the teacher rules out, scattered and in long leading runs (a thread, a warp or the
    # first chunks of a long row see nothing but -inf), never a whole row.
    rows = rows_for(classes)
    t = logits((rows, classes), dtype, seed=1)
    gen = torch.Generator(device="cuda").manual_seed(2)
    t[torch.rand(t.shape, generator=gen, device="cuda") < 0.3] = float("-inf")
    t[1::2, : classes - 1] = float("-inf")
    t[2::3, : (classes * 3) // 4] = float("-inf")
    t[:, -1] = 1.0
    check_kd(logits((rows, classes), dtype), t)


@pytest.mark.parametrize("classes", [10, 1000, 32000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_student_without_mass_gives_inf(dtype, classes):
    rows = rows_for(classes)
    s = logits((rows, classes), dtype)
    s[0, classes // 2] = float("-inf")  # the teacher gives this class mass: KL = +inf
    t = logits((rows, classes), dtype, seed=1)
    t[1, :] = float("-inf")
    t[1, 0] = 0.0
    s[1, 1:] = float("-inf")  # -inf exactly where the teacher gives no mass: finite
    kl = ops.kd_loss_fwd(s, t, 2.0)[0]
    assert kl[0].item() == float("inf")
    assert torch.isfinite(kl[1:]).all()
    expected = ops.kd_loss_fwd(s.cpu(), t.cpu(), 2.0)[0]
    assert expected[0].item() == float("inf")
    assert_close(kl[1:].cpu(), expected[1:], ops.accumulation_dtype(dtype))


@pytest.mark.parametrize("classes", [10, 1000, 32000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_large_magnitudes(dtype, classes):
    # Logits of magnitude 1e4: exp() would overflow without the running maxima; rows far below 0
    # would overflow a careless rescaling.
    rows = rows_for(classes)
    s = logits((rows, classes), dtype, scale=1e4)
    t = logits((rows, classes), dtype, scale=1e4, seed=1)
    # p = exp(x/T - lse) with an lse near 1e4 stored in float32 (spacing 1e-3): gradients are
    # good to about 1e-3 relative, whatever the kernel.
    grad_dtype = torch.float64 if dtype == torch.float64 else torch.bfloat16
    check_kd(s, t, temperature=1.0, grad_dtype=grad_dtype)
    check_kd(s - 1e4, t - 3e4, temperature=0.5, grad_dtype=grad_dtype)


def test_nan_propagates():
    s = logits((4, 1000), torch.float32)
    t = logits((4, 1000), torch.float32, seed=1)
    s[0, 17] = float("nan")
    t[1, 999] = float("nan")
    t[2, 3] = float("inf")
    kl, lse_s, lse_t = ops.kd_loss_fwd(s, t, 1.0)
    assert kl[:3].isnan().all() and lse_s[0].isnan() and lse_t[1].isnan()
    assert torch.isfinite(kl[3])


def test_empty_inputs():
    for shape in [(0, 10), (2, 0, 1000)]:
        s = torch.randn(shape, device="cuda", requires_grad=True)
        loss = pykd.kd_loss(s, torch.randn(shape, device="cuda"), reduction="sum")
        loss.backward()
        assert loss.item() == 0 and s.grad.shape == s.shape


def test_mismatched_devices_are_rejected():
    s = torch.randn(4, 10, device="cuda")
    with pytest.raises(ValueError, match="same device"):
        ops.kd_loss_fwd(s, s.cpu(), 1.0)
    kl, lse_s, lse_t = ops.kd_loss_fwd(s, s, 1.0)
    with pytest.raises(ValueError, match="grad_kl"):
        ops.kd_loss_bwd(kl.cpu(), s, s, lse_s, lse_t, kl, 1.0, True, False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_device():
    # The ops run on the logits' device, whatever the current device is.
    s = logits((67, 1000), torch.float32).to("cuda:1")
    t = logits((67, 1000), torch.float32, seed=1).to("cuda:1")
    with torch.cuda.device(0):
        result = run_kd(s, t, 2.0, teacher_grad=True)
    assert all(r.device == s.device for r in result)
    check_results(result, run_kd(s.cpu(), t.cpu(), 2.0, teacher_grad=True), torch.float32)


def test_more_than_2_31_elements():
    # Offsets past 2^31 elements: the last rows of a 2^31 + 2^17 element bfloat16 matrix.
    free, _ = torch.cuda.mem_get_info()
    rows, classes = 16385, 131072
    if free < 4 * rows * classes * 2 + (1 << 30):
        pytest.skip(f"needs {4 * rows * classes * 2 >> 30} GiB of free GPU memory")
    s = torch.empty((rows, classes), device="cuda", dtype=torch.bfloat16).normal_()
    t = torch.empty((rows, classes), device="cuda", dtype=torch.bfloat16).normal_()
    s = s.requires_grad_()
    kl = ops.kd_loss_fwd(s, t, 1.0)[0]
    (grad,) = torch.autograd.grad(pykd.kd_loss(s, t, reduction="sum"), [s])
    tail = slice(rows - 2, rows)
    expected = run_kd(s[tail].cpu(), t[tail].cpu(), 1.0)
    torch.testing.assert_close(kl[tail].cpu(), expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad[tail].cpu(), expected[4] * 2, rtol=2e-2, atol=1e-9)


def test_cuda_graph_capture():
    # Both ops are captured into a CUDA graph (no host synchronisation) and replayed on new data.
    s = logits((257, 1000), torch.bfloat16)
    t = logits((257, 1000), torch.bfloat16, seed=1)
    grad_kl = torch.full((257,), 2.0**2 / 257, device="cuda")  # of the batch-mean loss

    def step():
        kl, lse_s, lse_t = ops.kd_loss_fwd(s, t, 2.0)
        return kl, ops.kd_loss_bwd(grad_kl, s, t, lse_s, lse_t, kl, 2.0, True, True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kl, (grad_s, grad_t) = step()
    s.copy_(logits((257, 1000), torch.bfloat16, seed=2))
    graph.replay()
    expected = run_kd(s, t, 2.0, teacher_grad=True)
    torch.testing.assert_close(kl, expected[0])
    torch.testing.assert_close(grad_s, expected[4])
    torch.testing.assert_close(grad_t, expected[5])


def compiled_matches_eager(fn, dtype, steps):
    s = logits((64, 1000), dtype)
    t = logits((64, 1000), dtype, seed=1)
    expected = run_kd(s, t, 2.0)
    for _ in range(steps):
        student = s.detach().clone().requires_grad_()
        loss = fn(student, t, 2.0)
        loss.backward()
        torch.testing.assert_close(loss.detach().clone(), expected[3].to(dtype))
        torch.testing.assert_close(student.grad, expected[4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_fullgraph(dtype):
    torch._dynamo.reset()
    compiled_matches_eager(torch.compile(pykd.kd_loss, fullgraph=True), dtype, steps=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_reduce_overhead(dtype):
    # mode="reduce-overhead" runs the compiled graphs as CUDA graphs; inductor counts every graph
    # it had to leave out (a CPU tensor, a host sync).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_matches_eager(torch.compile(pykd.kd_loss, mode="reduce-overhead"), dtype, steps=4)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])

