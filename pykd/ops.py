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


def forward_mode_active():
    """Whether forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) or another torch.func
    transform may see a call. The fused losses then compute all their gradients in the forward:
    their jvp is made from them."""
    return (torch.autograd.forward_ad._current_level >= 0
            or torch._C._are_functorch_transforms_active())


def scale_saved_grads(grads, grad_output, functional=False):
    """The backward of a fused loss: its saved gradients times the upstream gradient.

    ``grad_output`` is one value (a 0-d loss), or one per row of every gradient ([..., C] rows, a
    per-row loss). When the backward runs eagerly, the saved gradients are scaled in place by
    ``torch.ops.pykd.scale_grads_`` (nothing is done where ``grad_output`` is exactly 1; no host
    sync on CUDA) and returned: they become the input gradients, without a copy. The in-place op
    bumps their version counters, so a second backward through the same graph
    (``retain_graph=True``) raises autograd's "modified by an inplace operation" error instead of
    using a gradient that was already scaled; inside :func:`functional_backward` it works instead.
    While torch.compile traces the backward (and for tensor subclasses), or when ``functional``
    (under torch.func transforms), it returns the functional ``grad * grad_output`` in each
    gradient's dtype, which the compiler fuses.
    """
    grads = list(grads)
    if grad_output is None:  # no gradient reached the loss (save_grads_for_backward turns off
        return [None] * len(grads)  # materialize_grads): no input gets one either
    if functional or _functional_backward or _traced([grad_output, *grads]):
        scale = grad_output if grad_output.dim() == 0 else grad_output.unsqueeze(-1)
        return [(g * scale).to(g.dtype) for g in grads]
    scale_grads_(grads, grad_output)
    return grads


def save_grads_for_backward(ctx, grads):
    """What every fused loss's setup_context does with the gradients its forward wrote: autograd
    keeps them (and nothing else of size) for the backward; they are outputs of the op that are no
    gradient of anything (non-differentiable), and no zeros are made up for their own upstream
    gradients (set_materialize_grads(False): otherwise every backward would first fill a
    gradient-sized tensor of zeros per saved gradient). Under torch.func transforms the anchor
    (see :func:`autograd_function`) is kept too; under forward-mode AD the gradients are also kept
    for the jvp."""
    anchor = getattr(ctx, "anchor", None)
    ctx.anchored = anchor is not None
    if ctx.anchored:
        ctx.anchor = None  # kept as a saved tensor: as an attribute it would be a reference cycle
    ctx.save_for_backward(*grads, *([anchor] if ctx.anchored else []))
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)
    if ctx.anchored or torch.autograd.forward_ad._current_level >= 0:  # forward_mode_active()
        ctx.save_for_forward(*grads)


def saved_grads(ctx, loss_name):
    """(the saved gradients, the anchor or None), with the reason when a second backward finds
    the gradients scaled already."""
    try:
        saved = ctx.saved_tensors
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        raise RuntimeError(
            f"{loss_name}: a second backward through the same graph is not supported, because "
            "the first one scaled the saved gradients in place; run every backward pass inside "
            "pykd.ops.functional_backward() to allow it. (" + str(error) + ")"
        ) from error
    return (saved[:-1], saved[-1]) if ctx.anchored else (saved, None)


def loss_tangent(ctx, tangents, dtype, per_row=False):
    """The jvp of a fused loss from the gradients its forward saved (in the order of
    ``tangents``, one per input that can have a tangent): the sum over classes of gradient times
    tangent, per row when ``per_row`` (reduction "none"), else over everything."""
    grads = ctx.saved_tensors
    total = grads[0].new_zeros(grads[0].shape[:-1] if per_row else (), dtype=dtype)
    for grad, tangent in zip(grads, tangents):
        if tangent is not None:
            product = grad.to(accumulation_dtype(grad.dtype)) * tangent
            total = total + (product.sum(-1) if per_row else product.sum())
    return total.to(dtype)


@torch.library.register_fake("pykd::scale_grads_")
def _scale_grads_fake(grads, scale):
    return None


def _second_derivative_error(name, detail=""):
    return RuntimeError(f"{name}: second derivatives are not implemented{detail}")


class _FirstOrderOnly(torch.autograd.Function):
    """Passes gradients through; differentiating them again, in either mode, is an error."""

    generate_vmap_rule = True

    @staticmethod
    def forward(name, _root, *grads):
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise _second_derivative_error(ctx.name)

    @staticmethod
    def jvp(ctx, *tangents):
        raise _second_derivative_error(ctx.name)


def first_order_only(name, grads, anchor=None):
    """The gradients a fused loss's backward returns. A second derivative through them would only
    carry the upstream gradient's part, since the kept gradient has no graph; so one never comes
    out silently wrong:
    - an eager backward(create_graph=True) raises at once (a Hessian, a gradient penalty on
      anything before the loss, or an unused second derivative alike);
    - under torch.func transforms the gradients come back through _FirstOrderOnly from the
      ``anchor``, an empty output of the loss's own node (see :func:`autograd_function`), so that
      torch.func.grad works and whatever differentiates its result (func.hessian, grad of grad)
      reaches the error;
    - while torch.compile traces the backward the same happens from a leaf that requires grad."""
    if anchor is None:
        if not torch.is_grad_enabled():
            return grads
        if not _traced(grads):
            raise _second_derivative_error(name, " (a backward with create_graph=True)")
        anchor = torch.empty(0, requires_grad=True)
    return list(_FirstOrderOnly.apply(name, anchor, *grads))


def backward_grads(name, grads, grad_output, anchor):
    """What a fused loss's backward returns for its saved ``grads`` and the ``anchor`` of
    :func:`saved_grads`: them scaled by the upstream gradient (:func:`scale_saved_grads`, in copies
    under torch.func transforms), guarded by :func:`first_order_only`."""
    scaled = scale_saved_grads(grads, grad_output, functional=anchor is not None)
    return first_order_only(name, scaled, anchor)


def vmap_by_loop(op):
    """The vmap rule of a fused op: the op once per sample, the outputs stacked along dim 0 (a
    sample is a call of its own because its reduction is its own)."""

    def select(arg, dim, i):
        if isinstance(dim, (list, tuple)):  # a list of tensors: one dim each
            return [select(a, d, i) for a, d in zip(arg, dim)]
        return arg if dim is None else arg.select(dim, i)

    def stack(parts):
        if isinstance(parts[0], (list, tuple)):  # lists of tensors: stacked entry by entry
            return [stack(entries) for entries in zip(*parts)]
        return torch.stack(parts)

    def rule(info, in_dims, *args):
        samples = [op(*(select(arg, dim, i) for arg, dim in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        stacked = tuple(stack(parts) for parts in zip(*samples))
        return stacked, tuple([0] * len(out) if isinstance(out, list) else 0 for out in stacked)

    return rule


def autograd_function(name, run, setup, loss_vjp, loss_jvp):
    """``apply`` of the torch.autograd.Function of a fused loss made of these pieces (``run``: the
    op below autograd; ``setup``: its setup_context; ``loss_vjp``, ``loss_jvp``: its backward and
    jvp). It is an old-style Function for plain eager calls, whose apply skips the argument
    binding that a Function with setup_context does on every call (which costs more than the
    kernel at the seeds' batch sizes), and one with setup_context and a vmap rule for calls under
    torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, vmap), which need them. The second one
    has one more output, an empty tensor of the loss's node kept for the backward: the anchor of
    :func:`first_order_only`."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = run(*args)
            setup(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return loss_vjp(ctx, *grads)

        @staticmethod
        def jvp(ctx, *tangents):
            return loss_jvp(ctx, *tangents)

    class UnderTransforms(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            output = run(*args)
            return (*output, output[0].new_empty(0))

        @staticmethod
        def setup_context(ctx, args, output):
            ctx.anchor, ctx.anchor_device = output[-1], output[-1].device
            setup(ctx, args, output[:-1])

        @staticmethod
        def backward(ctx, *grads):
            return loss_vjp(ctx, *grads[:-1])

        @staticmethod
        def jvp(ctx, *tangents):
            # A differentiable output needs a tangent.
            return (*loss_jvp(ctx, *tangents), torch.zeros(0, device=ctx.anchor_device))

    Eager.__name__, UnderTransforms.__name__ = name, name + "UnderTransforms"

    def apply(*args):
        if torch._C._are_functorch_transforms_active():
            return UnderTransforms.apply(*args)
        return Eager.apply(*args)

    return apply


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
    ctx.per_row, ctx.loss_dtype = inputs[8] == "none", output[0].dtype
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
    (grad_student, grad_teacher), anchor = saved_grads(ctx, "kd_loss")
    wanted = [g for g, need in ((grad_student, needs_student), (grad_teacher, needs_teacher))
              if need]
    scaled = iter(backward_grads("kd_loss", wanted, grad_loss, anchor))
    return (
        next(scaled) if needs_student else None,
        next(scaled) if needs_teacher else None,
    ) + (None,) * 9


torch.library.register_autograd(
    "pykd::kd_loss", _kd_loss_backward, setup_context=_kd_loss_setup_context
)


def _kd_loss_forward(*inputs):
    with torch._C._AutoDispatchBelowAutograd():
        return kd_loss(*inputs)


def _kd_loss_jvp(ctx, student_tangent, teacher_tangent, *_):
    tangent = loss_tangent(ctx, [student_tangent, teacher_tangent], ctx.loss_dtype, ctx.per_row)
    return tangent, None, None


# The autograd registered above, for eager calls from pykd.kd_loss and KDLoss: the op runs below
# autograd directly instead of through torch.library's wrapper, whose per-call handling of the
# schema (filling in the defaults of 11 arguments) takes longer than the kernel itself at the
# seeds' batch sizes. torch.compile traces the registered op instead.
_eager_kd_loss = autograd_function(
    "_EagerKDLoss", _kd_loss_forward, _kd_loss_setup_context, _kd_loss_backward, _kd_loss_jvp)


def kd_loss_with_autograd(*inputs):
    """torch.ops.pykd.kd_loss(*inputs) with its autograd, the fastest way for the caller."""
    if torch.compiler.is_compiling():
        return kd_loss(*inputs)
    if forward_mode_active():
        return _eager_kd_loss(*inputs[:-2], True, True)
    if torch.is_grad_enabled() and (inputs[-2] or inputs[-1]):
        return _eager_kd_loss(*inputs)
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
    ctx.loss_dtype = output[0].dtype
    # Only the gradients are kept between forward and backward, never the features.
    save_grads_for_backward(ctx, [*grad_student, *grad_teacher])


def _hint_grads(ctx, grad_loss, student_needs, teacher_needs):
    """([gradient or None] per student feature, [... per teacher feature]) for grad_loss."""
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
    grads, anchor = saved_grads(ctx, "hint_loss")
    grads = backward_grads("hint_loss", grads, grad_loss, anchor)
    return (masked(grads[: ctx.student_grads], student_needs),
            masked(grads[ctx.student_grads :], teacher_needs))


def _hint_loss_backward(ctx, grad_loss, _grad_student, _grad_teacher):
    # For list inputs needs_input_grad holds one bool per tensor.
    student, teacher = _hint_grads(ctx, grad_loss, *ctx.needs_input_grad[:2])
    return student, teacher, None, None, None


torch.library.register_autograd(
    "pykd::hint_loss", _hint_loss_backward, setup_context=_hint_loss_setup_context
)


# The autograd registered above for eager calls from pykd.hint_loss, as _eager_kd_loss is for
# kd_loss. The features come last and one by one (the student's, then the teacher's), so that
# autograd sees each of them as an input; the outputs are the loss and the gradients one by one.
def _hint_loss_forward(pairs, settings, *features):
    inputs = (list(features[:pairs]), list(features[pairs:]), *settings)
    with torch._C._AutoDispatchBelowAutograd():
        loss, grad_student, grad_teacher = hint_loss(*inputs)
    return loss, *grad_student, *grad_teacher


def _eager_hint_loss_setup_context(ctx, args, output):
    pairs, settings, *features = args
    student = pairs if settings[-2] else 0
    grads = output[1:]
    _hint_loss_setup_context(
        ctx, (features[:pairs], features[pairs:], *settings),
        (output[0], grads[:student], grads[student:]))
    ctx.pairs = pairs


def _eager_hint_loss_backward(ctx, grad_loss, *_grads):
    needs = ctx.needs_input_grad[2:]
    student, teacher = _hint_grads(ctx, grad_loss, needs[: ctx.pairs], needs[ctx.pairs :])
    return (None, None, *student, *teacher)


def _eager_hint_loss_jvp(ctx, _pairs, _settings, *feature_tangents):
    grads = len(ctx.saved_tensors)
    return (loss_tangent(ctx, feature_tangents, ctx.loss_dtype), *[None] * grads)


_eager_hint_loss = autograd_function(
    "_EagerHintLoss", _hint_loss_forward, _eager_hint_loss_setup_context,
    _eager_hint_loss_backward, _eager_hint_loss_jvp)


def hint_loss_with_autograd(student_features, teacher_features, *settings):
    """The loss of torch.ops.pykd.hint_loss(...) with its autograd, the fastest way for the
    caller."""
    if torch.compiler.is_compiling():
        return hint_loss(student_features, teacher_features, *settings)[0]
    if forward_mode_active():
        settings = (*settings[:-2], True, True)
    elif not (torch.is_grad_enabled() and (settings[-2] or settings[-1])):
        with torch._C._AutoDispatchBelowAutograd():
            return hint_loss(student_features, teacher_features, *settings)[0]
    return _eager_hint_loss(len(student_features), tuple(settings), *student_features,
                            *teacher_features)[0]


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
    ctx.per_row, ctx.loss_dtype = inputs[7] == "none", output[0].dtype
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
    (grad_student,), anchor = saved_grads(ctx, "sparse_kd_loss")
    (scaled,) = backward_grads("sparse_kd_loss", [grad_student], grad_loss, anchor)
    return (scaled,) + (None,) * 8


torch.library.register_autograd(
    "pykd::sparse_kd_loss", _sparse_kd_loss_backward, setup_context=_sparse_kd_loss_setup_context
)


def _sparse_kd_loss_forward(*inputs):
    with torch._C._AutoDispatchBelowAutograd():
        return sparse_kd_loss(*inputs)


def _sparse_kd_loss_jvp(ctx, student_tangent, *_):
    # As in the backward, the teacher's values are data: their tangents add nothing.
    tangent = loss_tangent(ctx, [student_tangent], ctx.loss_dtype, ctx.per_row)
    return tangent, None


# The autograd registered above, for eager calls (as _eager_kd_loss).
_eager_sparse_kd_loss = autograd_function(
    "_EagerSparseKDLoss", _sparse_kd_loss_forward, _sparse_kd_loss_setup_context,
    _sparse_kd_loss_backward, _sparse_kd_loss_jvp)


def sparse_kd_loss_with_autograd(*inputs):
    """torch.ops.pykd.sparse_kd_loss(*inputs) with its autograd, the fastest way for the caller."""
    if torch.compiler.is_compiling():
        return sparse_kd_loss(*inputs)
    if forward_mode_active():
        return _eager_sparse_kd_loss(*inputs[:-1], True)
    if torch.is_grad_enabled() and inputs[-1]:
        return _eager_sparse_kd_loss(*inputs)
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
    ctx.per_row, ctx.loss_dtype = inputs[6] == "none", output[0].dtype
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
    saved, anchor = saved_grads(ctx, "multi_teacher_kd_loss")
    grad_student, grad_teachers = saved[0], list(saved[1:])
    wanted = ([grad_student] if needs_student else []) + [
        g for g, need in zip(grad_teachers, needs_teachers) if need
    ]
    scaled = iter(backward_grads("multi_teacher_kd_loss", wanted, grad_loss, anchor))
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


# The autograd registered above for eager calls from pykd.multi_teacher_kd_loss, as
# _eager_kd_loss is for kd_loss. The teachers come last and one by one, so that autograd sees each
# of them as an input; the outputs are the loss, the student's gradient and the teachers' one by
# one.
def _multi_teacher_forward(student_logits, settings, *teacher_logits):
    with torch._C._AutoDispatchBelowAutograd():
        loss, grad_student, grad_teachers = multi_teacher_kd_loss(
            student_logits, list(teacher_logits), *settings)
    return loss, grad_student, *grad_teachers


def _eager_multi_teacher_setup_context(ctx, args, output):
    student_logits, settings, *teacher_logits = args
    _multi_teacher_setup_context(
        ctx, (student_logits, teacher_logits, *settings),
        (output[0], output[1], output[2:]))


def _eager_multi_teacher_backward(ctx, grad_loss, *_grads):
    needs = ctx.needs_input_grad
    student, teachers = _multi_teacher_grads(ctx, grad_loss, needs[0], list(needs[2:]))
    return (student, None, *teachers)


def _eager_multi_teacher_jvp(ctx, student_tangent, _settings, *teacher_tangents):
    tangent = loss_tangent(ctx, [student_tangent, *teacher_tangents], ctx.loss_dtype, ctx.per_row)
    return (tangent, *[None] * (1 + len(teacher_tangents)))


_eager_multi_teacher_kd_loss = autograd_function(
    "_EagerMultiTeacherKDLoss", _multi_teacher_forward, _eager_multi_teacher_setup_context,
    _eager_multi_teacher_backward, _eager_multi_teacher_jvp)


def multi_teacher_kd_loss_with_autograd(*inputs):
    """The loss of torch.ops.pykd.multi_teacher_kd_loss(*inputs) with its autograd, the fastest
    way for the caller."""
    if torch.compiler.is_compiling():
        return multi_teacher_kd_loss(*inputs)[0]
    student, teachers, *settings = inputs
    if forward_mode_active():
        settings[-2:] = True, True
    elif not (torch.is_grad_enabled() and (inputs[-2] or inputs[-1])):
        with torch._C._AutoDispatchBelowAutograd():
            return multi_teacher_kd_loss(*inputs)[0]
    return _eager_multi_teacher_kd_loss(student, tuple(settings), *teachers)[0]


for _op in (kd_loss, hint_loss, sparse_kd_loss, multi_teacher_kd_loss):
    torch.library.register_vmap(_op._qualified_op_name, vmap_by_loop(_op))
