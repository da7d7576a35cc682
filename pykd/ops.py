"""Python side of the pykd custom ops: fake (meta) kernels and autograd.

The ops themselves are declared in csrc/ops.cpp and implemented per backend in csrc/cpu and
csrc/cuda; importing pykd._C registers them as torch.ops.pykd.*.
"""
import torch

from . import _C  # noqa: F401

__all__ = ["kd_loss_fwd", "kd_loss_bwd", "hint_loss_fwd", "hint_loss_bwd"]

kd_loss_fwd = torch.ops.pykd.kd_loss_fwd
kd_loss_bwd = torch.ops.pykd.kd_loss_bwd
hint_loss_fwd = torch.ops.pykd.hint_loss_fwd
hint_loss_bwd = torch.ops.pykd.hint_loss_bwd


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


@torch.library.register_fake("pykd::hint_loss_fwd")
def _hint_loss_fwd_fake(student_features, teacher_features, weights):
    first = student_features[0]
    return first.new_empty((), dtype=accumulation_dtype(first.dtype))


@torch.library.register_fake("pykd::hint_loss_bwd")
def _hint_loss_bwd_fake(
    grad_loss, student_features, teacher_features, weights, student_grad, teacher_grad
):
    def gradients(features, wanted):
        return [torch.empty_like(f) for f in features] if wanted else []

    return gradients(student_features, student_grad), gradients(teacher_features, teacher_grad)


def _hint_loss_setup_context(ctx, inputs, output):
    student_features, teacher_features, weights = inputs
    ctx.save_for_backward(*student_features, *teacher_features)
    ctx.pairs = len(student_features)
    ctx.weights = weights


def _hint_loss_backward(ctx, grad_loss):
    # For list inputs needs_input_grad holds one bool per tensor.
    student_needs, teacher_needs = ctx.needs_input_grad[:2]
    saved = ctx.saved_tensors
    grad_student, grad_teacher = hint_loss_bwd(
        grad_loss, saved[: ctx.pairs], saved[ctx.pairs :], ctx.weights,
        any(student_needs), any(teacher_needs),
    )

    def masked(grads, needs):  # a list not asked for came back empty
        return [g if need else None for g, need in zip(grads or [None] * len(needs), needs)]

    return masked(grad_student, student_needs), masked(grad_teacher, teacher_needs), None


torch.library.register_autograd(
    "pykd::hint_loss_fwd", _hint_loss_backward, setup_context=_hint_loss_setup_context
)


def _no_second_derivatives(loss_name):
    def backward(ctx, *grads):
        raise RuntimeError(f"{loss_name}: second derivatives are not implemented")

    return backward


# Differentiating through a backward op (create_graph=True, then backward again) is an error,
# never a silent zero.
torch.library.register_autograd("pykd::kd_loss_bwd", _no_second_derivatives("kd_loss"))
torch.library.register_autograd("pykd::hint_loss_bwd", _no_second_derivatives("hint_loss"))
