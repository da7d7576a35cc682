"""Python side of the pykd custom ops: fake (meta) kernels and autograd.

The ops themselves are declared in csrc/ops.cpp and implemented per backend in csrc/cpu and
csrc/cuda; importing pykd._C registers them as torch.ops.pykd.*.
"""
import torch

from . import _C  # noqa: F401

__all__ = ["kd_loss", "scale_grads_", "hint_loss_fwd", "hint_loss_bwd"]

kd_loss = torch.ops.pykd.kd_loss
scale_grads_ = torch.ops.pykd.scale_grads_
hint_loss_fwd = torch.ops.pykd.hint_loss_fwd
hint_loss_bwd = torch.ops.pykd.hint_loss_bwd


def accumulation_dtype(dtype):
    """The dtype the kernels accumulate in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_saved_grads(grads, grad_output):
    """The backward of a fused loss: its saved gradients times the upstream gradient.

    grad_output is one value, or one per row of a single gradient ([..., C] rows).
    """
    if grad_output.dim() > 0:
        grad_output = grad_output.unsqueeze(-1)
    return [g * grad_output.to(g.dtype) for g in grads]


class _FirstOrderOnly(torch.autograd.Function):
    """Passes gradients through; differentiating them again is an error."""

    @staticmethod
    def forward(ctx, name, _requires_grad, *grads):
        ctx.name = name
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name}: second derivatives are not implemented")


def first_order_only(name, grads):
    """The gradients a fused loss's backward returns. Under backward(create_graph=True) they
    would only carry the upstream gradient's part of a second derivative (the kept gradient has no
    graph), so differentiating them raises instead of silently giving a wrong result."""
    if not torch.is_grad_enabled():
        return grads
    # The empty tensor that requires grad gives the outputs a grad_fn even when the upstream
    # gradient has none, so that differentiating them reaches the error.
    return list(_FirstOrderOnly.apply(name, torch.empty(0, requires_grad=True), *grads))


@torch.library.register_fake("pykd::kd_loss")
def _kd_loss_fake(
    student_logits, teacher_logits, labels, temperature, beta, soft_weight, hard_weight,
    ignore_index, reduction, student_grad, teacher_grad,
):
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    shape = student_logits.shape[:-1] if reduction == "none" else ()
    loss = student_logits.new_empty(shape, dtype=dtype)

    def gradient(logits, wanted):
        return logits.new_empty(logits.shape if wanted else (0,))

    return loss, gradient(student_logits, student_grad), gradient(teacher_logits, teacher_grad)


def _kd_loss_setup_context(ctx, inputs, output):
    _, grad_student, grad_teacher = output
    ctx.student_grad, ctx.teacher_grad = inputs[-2:]
    ctx.save_for_backward(grad_student, grad_teacher)
    ctx.mark_non_differentiable(grad_student, grad_teacher)


def _kd_loss_backward(ctx, grad_loss, _grad_student, _grad_teacher):
    needs_student, needs_teacher = ctx.needs_input_grad[:2]
    if (needs_student and not ctx.student_grad) or (needs_teacher and not ctx.teacher_grad):
        raise RuntimeError(
            "kd_loss: a gradient is needed that the forward did not compute; call "
            "torch.ops.pykd.kd_loss with student_grad/teacher_grad set for the inputs that "
            "require grad (pykd.kd_loss does this)"
        )
    grad_student, grad_teacher = ctx.saved_tensors
    wanted = [g for g, need in ((grad_student, needs_student), (grad_teacher, needs_teacher))
              if need]
    scaled = iter(first_order_only("kd_loss", scale_saved_grads(wanted, grad_loss)))
    return (
        next(scaled) if needs_student else None,
        next(scaled) if needs_teacher else None,
    ) + (None,) * 9


torch.library.register_autograd(
    "pykd::kd_loss", _kd_loss_backward, setup_context=_kd_loss_setup_context
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
torch.library.register_autograd("pykd::hint_loss_bwd", _no_second_derivatives("hint_loss"))
