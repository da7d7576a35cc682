"""Python side of the pykd custom ops: fake (meta) kernels and autograd.

The ops themselves are declared in csrc/ops.cpp and implemented per backend in csrc/cpu and
csrc/cuda; importing pykd._C registers them as torch.ops.pykd.*.
"""
import torch

from . import _C  # noqa: F401

__all__ = ["kd_loss_fwd", "kd_loss_bwd"]

kd_loss_fwd = torch.ops.pykd.kd_loss_fwd
kd_loss_bwd = torch.ops.pykd.kd_loss_bwd


def accumulation_dtype(dtype):
    """The dtype the kernels accumulate in, and that per-row statistics are returned in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pykd::kd_loss_fwd")
def _kd_loss_fwd_fake(student_logits, teacher_logits, temperature):
    rows = student_logits.shape[:-1]
    dtype = accumulation_dtype(student_logits.dtype)
    return tuple(student_logits.new_empty(rows, dtype=dtype) for _ in range(3))


@torch.library.register_fake("pykd::kd_loss_bwd")
def _kd_loss_bwd_fake(
    grad_kl, student_logits, teacher_logits, student_lse, teacher_lse, kl, temperature,
    student_grad, teacher_grad,
):
    def gradient(logits, wanted):
        return logits.new_empty(logits.shape if wanted else (0,))

    return gradient(student_logits, student_grad), gradient(teacher_logits, teacher_grad)


def _kd_loss_setup_context(ctx, inputs, output):
    student_logits, teacher_logits, temperature = inputs
    kl, student_lse, teacher_lse = output
    ctx.save_for_backward(student_logits, teacher_logits, student_lse, teacher_lse, kl)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(student_lse, teacher_lse)


def _kd_loss_backward(ctx, grad_kl, _grad_student_lse, _grad_teacher_lse):
    student_grad, teacher_grad = ctx.needs_input_grad[:2]
    grad_student, grad_teacher = kd_loss_bwd(
        grad_kl, *ctx.saved_tensors, ctx.temperature, student_grad, teacher_grad
    )
    return (
        grad_student if student_grad else None,
        grad_teacher if teacher_grad else None,
        None,
    )


torch.library.register_autograd(
    "pykd::kd_loss_fwd", _kd_loss_backward, setup_context=_kd_loss_setup_context
)
