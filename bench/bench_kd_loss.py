"""pytest-benchmark: pykd.kd_loss vs eager and compiled PyTorch at SPEC's CPU shapes.

    THP_MEM_ALLOC_ENABLE=1 pytest bench/bench_kd_loss.py --benchmark-columns=median,rounds \
        --benchmark-group-by=param:shape,param:dtype

Each benchmark's extra_info holds the effective bandwidth (3 * N * C * element_size / median) and
the bytes autograd keeps between forward and backward. `pykd bench` prints the same comparison as
one table with ratios and the copy bandwidth.
"""
import pytest
import torch

from pykd import benchmark as kd_bench

IMPLEMENTATIONS = kd_bench.implementations()
SHAPES = [pytest.param(shape, masked, id=kd_bench.shape_name(shape, masked))
          for shape, masked in kd_bench.CPU_SHAPES]


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,masked", SHAPES)
def test_kd_loss_forward_backward(benchmark, impl, dtype, shape, masked):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    teacher = torch.randn(shape, generator=gen).to(dtype)
    labels = kd_bench.masking_labels(shape, masked, student.device)
    loss_fn = kd_bench.implementations()[impl]  # fresh: see implementations()
    step = kd_bench.forward_backward(loss_fn, student, teacher, labels)
    benchmark.pedantic(step, rounds=5, warmup_rounds=2)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = 3 * student.nbytes / median_s / 1e9
    benchmark.extra_info["saved_bytes"] = kd_bench.saved_bytes(loss_fn, student, teacher, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,masked", SHAPES)
def test_copy_baseline(benchmark, dtype, shape, masked):
    src = torch.randn(shape).to(dtype)
    dst = torch.empty_like(src)
    benchmark.pedantic(lambda: dst.copy_(src), rounds=5, warmup_rounds=2)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = 2 * src.nbytes / median_s / 1e9
