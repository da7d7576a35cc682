"""Python side of the pykd custom ops: fake (meta) kernels and autograd.

The ops themselves are declared in csrc/ops.cpp and implemented per backend in csrc/cpu and
csrc/cuda; importing pykd._C registers them as torch.ops.pykd.*.
"""
import contextlib

import torch

from . import _C  # noqa: F401

__all__ = [
    "kd_loss", "scale_grads_", "hint_loss", "sparse_kd_loss", "multi_teacher_kd_loss",
    "scale_saved_grads",
    "functional_backward",
]

kd_loss = torch.ops.pykd.kd_loss
scale_grads_ = torch.ops.pykd.scale_grads_
hint_loss = torch.ops.pykd.hint_loss
sparse_kd_loss = torch.ops.pykd.sparse_kd_loss
multi_teacher_kd_loss = torch.ops.pykd.multi_teacher_kd_loss


def accumulation_dtype(dtype):
    """The dtype the kernels accumulate in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The backward of the fused losses. Their forward writes the gradients for an upstream gradient of
# 1 and autograd saves only those; the backward scales them by the real upstream gradient.

_functional_backward = 0  # how many functional_backward() blocks are open, in any thread


@contextlib.contextmanager
def functional_backward():
    """Backward passes run inside this block scale a copy of the saved gradients, not the saved
    gradients themselves: a graph can then be backpropagated through more than once
    (``retain_graph=True``; ``torch.autograd.gradcheck`` does this), at the cost of one new
    gradient per backward. Outside it, a second backward through a fused loss raises (see
    :func:`scale_saved_grads`). It applies to backward passes in every thread while it is open.
    """
    global _functional_backward
    _functional_backward += 1
    try:
        yield
    finally:
        _functional_backward -= 1


def _traced(tensors):
    """Whether the backward is being traced rather than run: under torch.compile (Dynamo and
    AOTAutograd, whose tensors are FunctionalTensors over fake ones) or any tensor subclass."""
    return torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors)


def scale_saved_grads(grads, grad_output):
    """The backward of a fused loss: its saved gradients times the upstream gradient.

    ``grad_output`` is one value (a 0-d loss), or one per row of every gradient ([..., C] rows, a
    per-row loss). When the backward runs eagerly, the saved gradients are scaled in place by
    ``torch.ops.pykd.scale_grads_`` (nothing is done where ``grad_output`` is exactly 1; no host
    sync on CUDA) and returned: they become the input gradients, without a copy. The in-place op
    bumps their version counters, so a second backward through the same graph
    (``retain_graph=True``) raises autograd's "modified by an inplace operation" error instead of
    using a gradient that was already scaled; inside :func:`functional_backward` it works instead.
    While torch.compile traces the backward (and for tensor subclasses) it returns the functional
    ``grad * grad_output`` in each gradient's dtype, which the compiler fuses.
    """
    grads = list(grads)
    if grad_output is None:  # no gradient reached the loss (save_grads_for_backward turns off
        return [None] * len(grads)  # materialize_grads): no input gets one either
    if _functional_backward or _traced([grad_output, *grads]):
        scale = grad_output if grad_output.dim() == 0 else grad_output.unsqueeze(-1)
        return [(g * scale).to(g.dtype) for g in grads]
    scale_grads_(grads, grad_output)
    return grads


def save_grads_for_backward(ctx, grads):
    """What every fused loss's setup_context does with the gradients its forward wrote: autograd
    keeps them (and nothing else of size) for the backward; they are outputs of the op that are no
    gradient of anything (non-differentiable), and no zeros are made up for their own upstream
    gradients (set_materialize_grads(False): otherwise every backward would first fill a
    gradient-sized tensor of zeros per saved gradient)."""
    ctx.save_for_backward(*grads)
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)


def saved_grads(ctx, loss_name):
    """ctx.saved_tensors, with the reason when a second backward finds them scaled already."""
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        raise RuntimeError(
            f"{loss_name}: a second backward through the same graph is not supported, because "
            "the first one scaled the saved gradients in place; run every backward pass inside "
            "pykd.ops.functional_backward() to allow it. (" + str(error) + ")"
        ) from error


@torch.library.register_fake("pykd::scale_grads_")
def _scale_grads_fake(grads, scale):
    return None


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
    save_grads_for_backward(ctx, [grad_student, grad_teacher])


def _kd_loss_backward(ctx, grad_loss, _grad_student, _grad_teacher):
    if grad_loss is None:  # only the (non-differentiable) gradient outputs were used
        return (None,) * 11
    needs_student, needs_teacher = ctx.needs_input_grad[:2]
    if (needs_student and not ctx.student_grad) or (needs_teacher and not ctx.teacher_grad):
        raise RuntimeError(
            "kd_loss: a gradient is needed that the forward did not compute; call "
            "torch.ops.pykd.kd_loss with student_grad/teacher_grad set for the inputs that "
            "require grad (pykd.kd_loss does this)"
        )
    grad_student, grad_teacher = saved_grads(ctx, "kd_loss")
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


class _EagerKDLoss(torch.autograd.Function):
    """The autograd registered above, for eager calls from pykd.kd_loss and KDLoss: the op runs
    below autograd directly instead of through torch.library's wrapper, whose per-call handling
    of the schema (filling in the defaults of 11 arguments) takes longer than the kernel itself
    at the seeds' batch sizes. torch.compile traces the registered op instead."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = kd_loss(*inputs)
        _kd_loss_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _kd_loss_backward(ctx, *grads)


def kd_loss_with_autograd(*inputs):
    """torch.ops.pykd.kd_loss(*inputs) with its autograd, the fastest way for the caller."""
    if torch.compiler.is_compiling():
        return kd_loss(*inputs)
    if torch.is_grad_enabled() and (inputs[-2] or inputs[-1]):
        return _EagerKDLoss.apply(*inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return kd_loss(*inputs)


@torch.library.register_fake("pykd::hint_loss")
def _hint_loss_fake(student_features, teacher_features, weights, student_grad, teacher_grad):
    first = student_features[0]
    loss = first.new_empty((), dtype=accumulation_dtype(first.dtype))

    def gradients(features, wanted):
        return [torch.empty_like(f) for f in features] if wanted else []

    return loss, gradients(student_features, student_grad), gradients(teacher_features, teacher_grad)


def _hint_loss_setup_context(ctx, inputs, output):
    _, grad_student, grad_teacher = output
    ctx.student_grad, ctx.teacher_grad = inputs[-2:]
    ctx.student_grads = len(grad_student)
    # Only the gradients are kept between forward and backward, never the features.
    save_grads_for_backward(ctx, [*grad_student, *grad_teacher])


def _hint_grads(ctx, grad_loss, student_needs, teacher_needs):
    """([gradient or None] per student feature, [... per teacher feature]) for grad_loss."""
    if torch.is_grad_enabled():  # backward(create_graph=True): the saved gradients have no graph
        raise RuntimeError("hint_loss: second derivatives are not implemented")
    if (any(student_needs) and not ctx.student_grad) or (any(teacher_needs) and not ctx.teacher_grad):
        raise RuntimeError(
            "hint_loss: a gradient is needed that the forward did not compute; call "
            "torch.ops.pykd.hint_loss with student_grad/teacher_grad set for the features that "
            "require grad (pykd.hint_loss does this)"
        )

    def masked(grads, needs):  # a list not asked for came back empty
        return [g if need else None for g, need in zip(grads or [None] * len(needs), needs)]

    if grad_loss is None:  # no gradient reached the loss (materialize_grads is off)
        return masked([], student_needs), masked([], teacher_needs)
    grads = scale_saved_grads(saved_grads(ctx, "hint_loss"), grad_loss)
    return (masked(grads[: ctx.student_grads], student_needs),
            masked(grads[ctx.student_grads :], teacher_needs))


def _hint_loss_backward(ctx, grad_loss, _grad_student, _grad_teacher):
    # For list inputs needs_input_grad holds one bool per tensor.
    student, teacher = _hint_grads(ctx, grad_loss, *ctx.needs_input_grad[:2])
    return student, teacher, None, None, None


torch.library.register_autograd(
    "pykd::hint_loss", _hint_loss_backward, setup_context=_hint_loss_setup_context
)


class _EagerHintLoss(torch.autograd.Function):
    """The autograd registered above for eager calls from pykd.hint_loss, as _EagerKDLoss does
    for kd_loss. The features come last and one by one (the student's, then the teacher's), so
    that autograd sees each of them as an input."""

    @staticmethod
    def forward(ctx, pairs, settings, *features):
        inputs = (list(features[:pairs]), list(features[pairs:]), *settings)
        with torch._C._AutoDispatchBelowAutograd():
            output = hint_loss(*inputs)
        _hint_loss_setup_context(ctx, inputs, output)
        ctx.pairs = pairs
        return output[0], *output[1], *output[2]

    @staticmethod
    def backward(ctx, grad_loss, *_grads):
        needs = ctx.needs_input_grad[2:]
        student, teacher = _hint_grads(ctx, grad_loss, needs[: ctx.pairs], needs[ctx.pairs :])
        return (None, None, *student, *teacher)


def hint_loss_with_autograd(student_features, teacher_features, *settings):
    """The loss of torch.ops.pykd.hint_loss(...) with its autograd, the fastest way for the
    caller."""
    if torch.compiler.is_compiling():
        return hint_loss(student_features, teacher_features, *settings)[0]
    if torch.is_grad_enabled() and (settings[-2] or settings[-1]):
        return _EagerHintLoss.apply(len(student_features), tuple(settings), *student_features,
                                    *teacher_features)[0]
    with torch._C._AutoDispatchBelowAutograd():
        return hint_loss(student_features, teacher_features, *settings)[0]


@torch.library.register_fake("pykd::sparse_kd_loss")
def _sparse_kd_loss_fake(
    student_logits, teacher_values, teacher_indices, teacher_lse, labels, temperature,
    ignore_index, reduction, student_grad,
):
    dtype = torch.promote_types(student_logits.dtype, teacher_values.dtype)
    shape = student_logits.shape[:-1] if reduction == "none" else ()
    loss = student_logits.new_empty(shape, dtype=dtype)
    grad = student_logits.new_empty(student_logits.shape if student_grad else (0,))
    return loss, grad


def _sparse_kd_loss_setup_context(ctx, inputs, output):
    ctx.student_grad = inputs[-1]
    save_grads_for_backward(ctx, [output[1]])


def _sparse_kd_loss_backward(ctx, grad_loss, _grad_student):
    # The teacher's values and log-sum-exp are data, like a target: they get no gradient.
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 9
    if not ctx.student_grad:
        raise RuntimeError(
            "sparse_kd_loss: a gradient is needed that the forward did not compute; call "
            "torch.ops.pykd.sparse_kd_loss with student_grad set when student_logits requires "
            "grad (pykd.sparse_kd_loss does this)"
        )
    (grad_student,) = saved_grads(ctx, "sparse_kd_loss")
    (scaled,) = first_order_only("sparse_kd_loss", scale_saved_grads([grad_student], grad_loss))
    return (scaled,) + (None,) * 8


torch.library.register_autograd(
    "pykd::sparse_kd_loss", _sparse_kd_loss_backward, setup_context=_sparse_kd_loss_setup_context
)


class _EagerSparseKDLoss(torch.autograd.Function):
    """The autograd registered above, for eager calls (as _EagerKDLoss)."""

    @staticmethod
    def forward(ctx, *inputs):
        with torch._C._AutoDispatchBelowAutograd():
            output = sparse_kd_loss(*inputs)
        _sparse_kd_loss_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _sparse_kd_loss_backward(ctx, *grads)


def sparse_kd_loss_with_autograd(*inputs):
    """torch.ops.pykd.sparse_kd_loss(*inputs) with its autograd, the fastest way for the caller."""
    if torch.compiler.is_compiling():
        return sparse_kd_loss(*inputs)
    if torch.is_grad_enabled() and inputs[-1]:
        return _EagerSparseKDLoss.apply(*inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return sparse_kd_loss(*inputs)
@torch.library.register_fake("pykd::multi_teacher_kd_loss")
def _multi_teacher_kd_loss_fake(
    student_logits, teacher_logits, weights, labels, temperature, ignore_index, reduction,
    student_grad, teacher_grad,
):
    dtype = torch.promote_types(student_logits.dtype, teacher_logits[0].dtype)
    shape = student_logits.shape[:-1] if reduction == "none" else ()
    loss = student_logits.new_empty(shape, dtype=dtype)
    grad_student = student_logits.new_empty(student_logits.shape if student_grad else (0,))
    grad_teacher = [t.new_empty(t.shape) for t in teacher_logits] if teacher_grad else []
    return loss, grad_student, grad_teacher


# The op's inputs, in schema order: student_logits, teacher_logits, weights, labels, temperature,
# ignore_index, reduction, student_grad, teacher_grad.
_MULTI_TEACHER_ARGS = 9


def _multi_teacher_setup_context(ctx, inputs, output):
    _, grad_student, grad_teacher = output
    ctx.student_grad, ctx.teacher_grad = inputs[-2:]
    ctx.teachers = len(inputs[1])
    save_grads_for_backward(ctx, [grad_student, *grad_teacher])


def _multi_teacher_grads(ctx, grad_loss, needs_student, needs_teachers):
    """(student gradient or None, [teacher gradient or None] * K) for the upstream grad_loss."""
    if grad_loss is None:  # only the (non-differentiable) gradient outputs were used
        return None, [None] * ctx.teachers
    if (needs_student and not ctx.student_grad) or (any(needs_teachers) and not ctx.teacher_grad):
        raise RuntimeError(
            "multi_teacher_kd_loss: a gradient is needed that the forward did not compute; call "
            "torch.ops.pykd.multi_teacher_kd_loss with student_grad/teacher_grad set for the "
            "inputs that require grad (pykd.multi_teacher_kd_loss does this)"
        )
    saved = saved_grads(ctx, "multi_teacher_kd_loss")
    grad_student, grad_teachers = saved[0], list(saved[1:])
    wanted = ([grad_student] if needs_student else []) + [
        g for g, need in zip(grad_teachers, needs_teachers) if need
    ]
    scaled = iter(first_order_only("multi_teacher_kd_loss", scale_saved_grads(wanted, grad_loss)))
    student = next(scaled) if needs_student else None
    return student, [next(scaled) if need else None for need in needs_teachers]


def _multi_teacher_backward(ctx, grad_loss, _grad_student, _grad_teacher):
    needs_student, needs_teachers = ctx.needs_input_grad[:2]  # a list's: one bool per tensor
    student, teachers = _multi_teacher_grads(ctx, grad_loss, needs_student, needs_teachers)
    return (student, teachers) + (None,) * (_MULTI_TEACHER_ARGS - 2)


torch.library.register_autograd(
    "pykd::multi_teacher_kd_loss", _multi_teacher_backward,
    setup_context=_multi_teacher_setup_context,
)


class _EagerMultiTeacherKDLoss(torch.autograd.Function):
    """The autograd registered above for eager calls from pykd.multi_teacher_kd_loss, as
    _EagerKDLoss does for kd_loss (no per-call schema handling of torch.library's wrapper). The
    teachers come last and one by one, so that autograd sees each of them as an input."""

    @staticmethod
    def forward(ctx, student_logits, settings, *teacher_logits):
        inputs = (student_logits, list(teacher_logits), *settings)
        with torch._C._AutoDispatchBelowAutograd():
            output = multi_teacher_kd_loss(*inputs)
        _multi_teacher_setup_context(ctx, inputs, output)
        return output[0], output[1], *output[2]

    @staticmethod
    def backward(ctx, grad_loss, *_grads):
        needs = ctx.needs_input_grad
        student, teachers = _multi_teacher_grads(ctx, grad_loss, needs[0], list(needs[2:]))
        return (student, None, *teachers)


def multi_teacher_kd_loss_with_autograd(*inputs):
    """The loss of torch.ops.pykd.multi_teacher_kd_loss(*inputs) with its autograd, the fastest
    way for the caller."""
    if torch.compiler.is_compiling():
        return multi_teacher_kd_loss(*inputs)[0]
    student, teachers, *settings = inputs
    if torch.is_grad_enabled() and (inputs[-2] or inputs[-1]):
        return _EagerMultiTeacherKDLoss.apply(student, tuple(settings), *teachers)[0]
    with torch._C._AutoDispatchBelowAutograd():
        return multi_teacher_kd_loss(*inputs)[0]
