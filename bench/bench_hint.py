"""Benchmark: pykd's batched hint loss vs a Python loop of F.mse_loss, forward + backward.

    pytest bench/bench_hint.py             # not collected by `pytest tests`

K = 4 and 16 (student, teacher) pairs of ResNet-like feature maps (64x56x56, 128x28x28,
256x14x14, 512x7x7, cycled) with batch BENCH_BATCH (default 128), fp32 and bf16, the student
requiring grad. Each configuration runs, side by side in this process: a copy of a tensor of the
same number of elements into an existing one (the machine's bandwidth: bytes read plus written),
the same copy into a fresh tensor (clone: what writing a fresh gradient costs, page faults
included, the bound for any loss whose gradients are new tensors), the eager loop
(pykd.reference.hint_loss), the same loop under torch.compile, and pykd.hint_loss. Results are
checked against the eager loop before timing. The table at the end gives median times, the
effective bandwidth 3 * sum(numel) * element_size / time (SPEC section 3), its share of the copy
bandwidth, the speed-up over the eager loop and the minor page faults per step (fresh large CPU
allocations are faulted in 4 KiB at a time unless transparent huge pages are used). GPU times come
from CUDA events.
"""
import functools
import os
import resource
import statistics

import pytest
import torch

import pykd
from pykd import reference

DEVICE = os.environ.get("BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
BATCH = int(os.environ.get("BENCH_BATCH", "128"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
SHAPES = [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = {
    "copy": None,
    "clone": None,
    "eager": reference.hint_loss,
    "compiled": torch.compile(reference.hint_loss),
    "pykd": pykd.hint_loss,
}
MEDIANS = {}  # (dtype, pairs, impl) -> seconds


@functools.lru_cache(maxsize=1)
def features(dtype_name, pairs):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    dtype = DTYPES[dtype_name]

    def make(shape, requires_grad):
        x = torch.randn((BATCH, *shape), generator=gen, device=DEVICE, dtype=dtype)
        return x.requires_grad_(requires_grad)

    shapes = [SHAPES[k % len(SHAPES)] for k in range(pairs)]
    return [make(s, True) for s in shapes], [make(s, False) for s in shapes]


def forward_backward(fn, student, teacher):
    loss = fn(student, teacher)
    return (loss, *torch.autograd.grad(loss, student))


def check(dtype, result, expected):
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for a, b in zip(result, expected):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 1e-3)


def cuda_event_median(step, rounds):
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("pairs", [4, 16])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_hint_loss(benchmark, results, dtype_name, pairs, impl):
    dtype = DTYPES[dtype_name]
    student, teacher = features(dtype_name, pairs)
    numel = sum(s.numel() for s in student)
    if impl in ("copy", "clone"):
        src = torch.cat([t.reshape(-1) for t in teacher])
        dst = torch.empty_like(src)
        step = functools.partial(dst.copy_, src) if impl == "copy" else src.clone
        moved = 2 * numel * src.element_size()
    else:
        step = functools.partial(forward_backward, IMPLS[impl], student, teacher)
        moved = 3 * numel * student[0].element_size()
        if impl != "eager":
            check(dtype, step(), forward_backward(reference.hint_loss, student, teacher))
    if DEVICE == "cuda":
        sync_step = step

        def step():
            sync_step()
            torch.cuda.synchronize()

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (ROUNDS + 2)
    median = benchmark.stats.stats.median
    if DEVICE == "cuda":
        median = cuda_event_median(step, ROUNDS)
    MEDIANS[dtype_name, pairs, impl] = median

    gbps = moved / median / 1e9
    copy = MEDIANS.get((dtype_name, pairs, "copy"))
    eager = MEDIANS.get((dtype_name, pairs, "eager"))
    copy_gbps = 2 * numel * student[0].element_size() / copy / 1e9 if copy else None
    benchmark.extra_info.update(gbps=gbps, faults_per_step=faults)
    results.append({
        "device": DEVICE,
        "dtype": dtype_name,
        "K": pairs,
        "batch": BATCH,
        "impl": impl,
        "median ms": f"{median * 1e3:.1f}",
        "GB/s": f"{gbps:.1f}",
        "% copy": f"{100 * gbps / copy_gbps:.0f}" if copy_gbps else "",
        "x eager": f"{eager / median:.2f}" if eager else "",
        "faults/step": f"{faults:.0f}",
    })
