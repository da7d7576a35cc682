"""pytest-benchmark: pykd.sparse_kd_loss (both modes) against dense pykd.kd_loss on the same
student and the eager PyTorch sparse formula (gather + log_softmax), forward+backward, at
(1024, 32000) with K = 64:

    THP_MEM_ALLOC_ENABLE=1 pytest bench/bench_sparse.py --benchmark-columns=median,rounds \
        --benchmark-group-by=param:dtype
"""
import pytest
import torch

import pykd
from pykd import reference

SHAPE, K, T = (1024, 32000), 64, 2.0


def inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(SHAPE, generator=gen).to(dtype).requires_grad_()
    teacher = torch.randn(SHAPE, generator=gen).to(dtype)
    values, indices = teacher.topk(K, dim=-1)
    lse = torch.logsumexp(teacher.float() / T, dim=-1)
    return student, teacher, values, indices.to(torch.int32), lse


IMPLEMENTATIONS = {
    "sparse_renormalised": lambda s, t, v, i, lse: pykd.sparse_kd_loss(s, v, i, T),
    "sparse_lse": lambda s, t, v, i, lse: pykd.sparse_kd_loss(s, v, i, T, teacher_lse=lse),
    "dense_kd_loss": lambda s, t, v, i, lse: pykd.kd_loss(s, t, T),
    "eager_sparse_renormalised": lambda s, t, v, i, lse: reference.eager_sparse_kd_loss(s, v, i, T),
    "eager_sparse_lse": lambda s, t, v, i, lse: reference.eager_sparse_kd_loss(
        s, v, i, T, teacher_lse=lse),
}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sparse_forward_backward(benchmark, impl, dtype):
    student, teacher, values, indices, lse = inputs(dtype)
    loss_fn = IMPLEMENTATIONS[impl]

    def step():
        student.grad = None
        loss_fn(student, teacher, values, indices, lse).backward()

    benchmark.pedantic(step, rounds=7, warmup_rounds=2)
