"""pykd.multi_teacher_kd_loss (one fused call) against K calls of pykd.kd_loss and the PyTorch loop
over teachers (eager and torch.compile), forward+backward, K = 4 teachers at (1024, 32000):

    THP_MEM_ALLOC_ENABLE=1 pytest bench/bench_multi_teacher.py --benchmark-columns=median,rounds \
        --benchmark-group-by=param:dtype

or, interleaved (each round times every form once, in turn; medians and ratios to the fused call):

    THP_MEM_ALLOC_ENABLE=1 python bench/bench_multi_teacher.py [--rounds 9] [--dtype bfloat16]
"""
import argparse
import statistics
import time

import pytest
import torch

import pykd
from pykd import reference

SHAPE, TEACHERS, T = (1024, 32000), 4, 2.0
WEIGHTS = [0.4, 0.3, 0.2, 0.1]


def inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(SHAPE, generator=gen).to(dtype).requires_grad_()
    teachers = torch.randn((TEACHERS, *SHAPE), generator=gen).to(dtype)
    return student, teachers


def pytorch_loop(student, teachers):
    loss = 0
    for w, t in zip(WEIGHTS, teachers):
        loss = loss + w * reference.kl_div_kd_loss(student, t, T)
    return loss


def kd_loss_loop(student, teachers):
    loss = 0
    for w, t in zip(WEIGHTS, teachers):
        loss = loss + w * pykd.kd_loss(student, t, T)
    return loss


IMPLEMENTATIONS = {
    "multi_teacher_kd_loss": lambda s, ts: pykd.multi_teacher_kd_loss(s, ts, WEIGHTS, T),
    "kd_loss_loop": kd_loss_loop,
    "eager_loop": pytorch_loop,
    "compiled_loop": torch.compile(pytorch_loop),
}


def step_for(impl, student, teachers):
    loss_fn = IMPLEMENTATIONS[impl]

    def step():
        student.grad = None
        loss_fn(student, teachers).backward()

    return step


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_multi_teacher_forward_backward(benchmark, impl, dtype):
    student, teachers = inputs(dtype)
    benchmark.pedantic(step_for(impl, student, teachers), rounds=7, warmup_rounds=2)


def interleaved(dtype, rounds):
    student, teachers = inputs(dtype)
    steps = {impl: step_for(impl, student, teachers) for impl in IMPLEMENTATIONS}
    times = {impl: [] for impl in steps}
    for step in steps.values():  # warm-up, and compilation
        step()
        step()
    for _ in range(rounds):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - start)
    fused = statistics.median(times["multi_teacher_kd_loss"])
    print(f"K={TEACHERS} {SHAPE[0]}x{SHAPE[1]} {dtype} T={T}, {rounds} interleaved rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'form':>22} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'/ fused':>8}")
    for impl, ts in times.items():
        median = statistics.median(ts)
        print(f"{impl:>22} {median * 1e3:10.1f} {min(ts) * 1e3:8.1f} {max(ts) * 1e3:8.1f} "
              f"{median / fused:7.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    interleaved(getattr(torch, args.dtype), args.rounds)
