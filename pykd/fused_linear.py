"""The KD loss straight from hidden states and the output layer (fused linear), in row chunks, so
that no [N, V] logits tensor is ever alive.

``torch.ops.pykd.fused_linear_kd_loss`` is a custom op written in Python (torch.library.custom_op):
its body is a loop over row chunks of the registered ops (two matmuls, ``pykd::kd_loss`` for the
loss and the logit gradient in one pass, two more matmuls for the input gradients). Like every
pykd loss it computes the gradients in the forward and autograd only scales them in the backward.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from . import ops
from .loss import check_settings

__all__ = ["FusedLinearKDLoss", "fused_linear_kd_loss", "default_chunk_size", "CHUNK_BYTES",
           "MAX_CHUNK_ROWS"]

# The automatic chunk: at most MAX_CHUNK_ROWS rows, at most CHUNK_BYTES of logits, and at most
# a quarter of the batch's rows (never fewer than 16); a multiple of 16 rows when that is at
# least 16. A step keeps three such chunks alive (student logits, teacher logits, the logit
# gradient): under the unfused form's three [N, V] tensors at any N. On the CPU 256-row chunks
# were the fastest measured at N = 4096, H = 1024, V = 32000 in float32 (vs 128) and bfloat16
# (vs 128 and 512): the matmuls' efficiency against the per-chunk work (bench/README.md).
CHUNK_BYTES = 32 * 2**20
MAX_CHUNK_ROWS = 256


def default_chunk_size(vocab, dtype, rows=None):
    """Rows per chunk when none is given: at most MAX_CHUNK_ROWS, a [rows, vocab] chunk of
    `dtype` logits of at most CHUNK_BYTES and, given the batch's `rows`, at most
    max(16, ceil(rows / 4)) rows; rounded down to a multiple of 16 rows when at least 16, at
    least 1 row."""
    chunk = min(MAX_CHUNK_ROWS,
                CHUNK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))
    if rows is not None:
        chunk = min(chunk, max(16, -(-rows // 4)))
    return max(1, chunk // 16 * 16 if chunk >= 16 else chunk)


def _check_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                  teacher_bias, labels, chunk_size):
    """Shapes, dtypes and devices of the op's (2-D) inputs; ValueError/TypeError naming them."""
    name = "fused_linear_kd_loss"
    sides = (("student", student_hidden, student_weight, student_bias),
             ("teacher", teacher_hidden, teacher_weight, teacher_bias))
    for side, hidden, weight, bias in sides:
        if hidden.dim() != 2:
            raise ValueError(f"{name}: {side}_hidden must be [N, H], got shape {tuple(hidden.shape)}")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
            raise ValueError(
                f"{name}: {side}_weight must be [V, H] with the H of {side}_hidden "
                f"({hidden.shape[1]}), got shape {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"{name}: {side}_bias must be [V] with the V of {side}_weight "
                f"({weight.shape[0]}), got shape {tuple(bias.shape)}")
        for tensor, what in ((hidden, "hidden"), (weight, "weight"), (bias, "bias")):
            if tensor is None:
                continue
            if not tensor.is_floating_point():
                raise TypeError(f"{name}: {side}_{what} must be a floating-point tensor, got "
                                f"{tensor.dtype}")
            if tensor.dtype != hidden.dtype:
                raise TypeError(
                    f"{name}: {side}_{what} must have the dtype of {side}_hidden ({hidden.dtype}), "
                    f"got {tensor.dtype} (under autocast FusedLinearKDLoss casts them)")
            if tensor.device != student_hidden.device:
                raise ValueError(f"{name}: {side}_{what} must be on student_hidden's device "
                                 f"({student_hidden.device}), got {tensor.device}")
    if teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"{name}: student_hidden and teacher_hidden must have the same number "
                         f"of rows, got {student_hidden.shape[0]} and {teacher_hidden.shape[0]}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"{name}: student_weight and teacher_weight must have the same vocabulary "
                         f"V, got {student_weight.shape[0]} and {teacher_weight.shape[0]}")
    if student_weight.shape[0] == 0:
        raise ValueError(f"{name}: the vocabulary must have at least one entry, got V = 0")
    if labels is not None:
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{name}: labels must be an integer tensor, got {labels.dtype}")
        if tuple(labels.shape) != (student_hidden.shape[0],):
            raise ValueError(f"{name}: labels must be [N] ({student_hidden.shape[0]}), got shape "
                             f"{tuple(labels.shape)}")
        if labels.device != student_hidden.device:
            raise ValueError(f"{name}: labels must be on student_hidden's device "
                             f"({student_hidden.device}), got {labels.device}")
    if chunk_size < 0:
        raise ValueError(f"{name}: chunk_size must be > 0 (or 0 for the automatic size), got "
                         f"{chunk_size}")


def _logits(hidden, weight, bias, out):
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


@torch.library.custom_op("pykd::fused_linear_kd_loss", mutates_args=())
def fused_linear_kd_loss(
    student_hidden: Tensor, student_weight: Tensor, student_bias: Optional[Tensor],
    teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Optional[Tensor],
    labels: Optional[Tensor], temperature: float, beta: float, soft_weight: float,
    hard_weight: float, ignore_index: int, chunk_size: int,
    hidden_grad: bool, weight_grad: bool, bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """pykd::kd_loss (reduction "batchmean") of the logits ``student_hidden @ student_weight.T +
    student_bias`` and ``teacher_hidden @ teacher_weight.T + teacher_bias``, computed in chunks of
    ``chunk_size`` rows (0: :func:`default_chunk_size`).

    Hidden states are [N, H] (teacher [N, Ht]), weights [V, H] ([V, Ht]), biases [V] or None, each
    side in one floating dtype; labels [N] or None. Returns the loss (0-d, the promoted dtype of
    the two sides) and, for an upstream gradient of 1, the gradients of student_hidden,
    student_weight and student_bias where hidden_grad / weight_grad / bias_grad is set (an empty
    [0] tensor where not), in their inputs' dtypes. The teacher takes no gradient. batchmean
    divides by the valid rows. On a GPU they are counted on the device (no host sync), each chunk
    is reduced with "sum" and the totals are divided once at the end; on the CPU the count is
    read first and the kernel's weights carry 1 / count, so that no pass over the gradients
    divides them (a tenth of a bfloat16 step at V = 32000, H = 1024). The weight gradient is
    accumulated over the chunks in the weight's dtype (one rounding per chunk in bfloat16), the
    bias gradient and the loss in float32 (float64 for float64).
    """
    _check_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                  teacher_bias, labels, chunk_size)
    rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    acc = ops.accumulation_dtype(student_hidden.dtype)
    loss_dtype = torch.promote_types(student_hidden.dtype, teacher_hidden.dtype)
    chunk = min(chunk_size or default_chunk_size(vocab, loss_dtype, rows), max(rows, 1))

    def gradient(wanted, like, dtype=None):
        if not wanted:
            return like.new_empty((0,))
        return like.new_empty(like.shape, dtype=dtype or like.dtype)

    # Every row of grad_hidden is written by its chunk; the first chunk writes grad_weight and
    # the others add to it (no zero fill, one read less); without rows both stay zero.
    grad_hidden = gradient(hidden_grad, student_hidden)
    grad_weight = gradient(weight_grad, student_weight)
    grad_bias = gradient(bias_grad, student_weight[:, 0], acc).zero_()
    if rows == 0:
        grad_weight.zero_()
    total = torch.zeros((), dtype=acc, device=student_hidden.device)
    on_cpu = student_hidden.device.type == "cpu"
    if on_cpu:
        count = 1
        inv_count = 1 / max(rows if labels is None else int((labels != ignore_index).sum()), 1)
        soft_weight, hard_weight = soft_weight * inv_count, hard_weight * inv_count
    elif labels is None:
        count = max(rows, 1)
    else:
        count = (labels != ignore_index).sum().clamp_(min=1)  # on the device
    student_logits = student_hidden.new_empty((chunk, vocab))
    teacher_logits = teacher_hidden.new_empty((chunk, vocab))
    wants_grad = hidden_grad or weight_grad or bias_grad
    # Autocast is decided by the caller (FusedLinearKDLoss casts the inputs); inside, every matmul
    # runs in its inputs' dtype, so that out= buffers keep theirs.
    with torch.autocast(student_hidden.device.type, enabled=False):
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            hidden = student_hidden[start:stop]
            s = _logits(hidden, student_weight, student_bias, student_logits[: stop - start])
            t = _logits(teacher_hidden[start:stop], teacher_weight, teacher_bias,
                        teacher_logits[: stop - start])
            loss, grad_logits, _ = ops.kd_loss(
                s, t, None if labels is None else labels[start:stop], temperature, beta,
                soft_weight, hard_weight, ignore_index, "sum", wants_grad, False)
            total += loss
            if hidden_grad:
                torch.mm(grad_logits, student_weight, out=grad_hidden[start:stop])
            if weight_grad and start == 0:
                torch.mm(grad_logits.t(), hidden, out=grad_weight)
            elif weight_grad:
                grad_weight.addmm_(grad_logits.t(), hidden)
            if bias_grad:
                grad_bias += grad_logits.sum(0, dtype=acc)
    if not on_cpu:
        for grad in (grad_hidden, grad_weight, grad_bias):
            grad.div_(count)
    return (total / count).to(loss_dtype), grad_hidden, grad_weight, grad_bias.to(
        student_weight.dtype)


@fused_linear_kd_loss.register_fake
def _fused_linear_kd_loss_fake(
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
    labels, temperature, beta, soft_weight, hard_weight, ignore_index, chunk_size,
    hidden_grad, weight_grad, bias_grad,
):
    _check_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                  teacher_bias, labels, chunk_size)
    loss_dtype = torch.promote_types(student_hidden.dtype, teacher_hidden.dtype)

    def gradient(wanted, shape, like):
        return like.new_empty(shape if wanted else (0,))

    return (
        student_hidden.new_empty((), dtype=loss_dtype),
        gradient(hidden_grad, student_hidden.shape, student_hidden),
        gradient(weight_grad, student_weight.shape, student_weight),
        gradient(bias_grad, student_weight.shape[:1], student_weight),
    )


def _setup_context(ctx, inputs, output):
    ctx.computed = inputs[-3:]  # hidden_grad, weight_grad, bias_grad
    ctx.loss_dtype = output[0].dtype
    ops.save_grads_for_backward(ctx, list(output[1:]))


def _backward(ctx, grad_loss, *_grads):
    inputs = 16
    if grad_loss is None:  # only the (non-differentiable) gradient outputs were used
        return (None,) * inputs
    needs = ctx.needs_input_grad[:3]  # student hidden, weight, bias; the teacher takes none
    if any(need and not computed for need, computed in zip(needs, ctx.computed)):
        raise RuntimeError(
            "fused_linear_kd_loss: a gradient is needed that the forward did not compute; call "
            "torch.ops.pykd.fused_linear_kd_loss with hidden_grad/weight_grad/bias_grad set for "
            "the student inputs that require grad (pykd.FusedLinearKDLoss does this)")
    grads, anchor = ops.saved_grads(ctx, "fused_linear_kd_loss")
    wanted = [g for g, need in zip(grads, needs) if need]
    scaled = iter(ops.backward_grads("fused_linear_kd_loss", wanted, grad_loss, anchor))
    return tuple(next(scaled) if need else None for need in needs) + (None,) * (inputs - 3)


fused_linear_kd_loss.register_autograd(_backward, setup_context=_setup_context)
torch.library.register_vmap(fused_linear_kd_loss, ops.vmap_by_loop(fused_linear_kd_loss))


def _forward(*inputs):
    with torch._C._AutoDispatchBelowAutograd():
        return fused_linear_kd_loss(*inputs)


def _jvp(ctx, hidden_tangent, weight_tangent, bias_tangent, *_):
    # As in the backward, the teacher's tensors are used as if detached: their tangents add nothing.
    tangent = ops.loss_tangent(ctx, [hidden_tangent, weight_tangent, bias_tangent], ctx.loss_dtype)
    return tangent, None, None, None


# The autograd registered above for eager calls, as pykd.ops does for the other losses (no
# per-call schema handling; torch.func transforms and forward-mode AD supported).
_eager_fused_linear_kd_loss = ops.autograd_function(
    "_EagerFusedLinearKDLoss", _forward, _setup_context, _backward, _jvp)


def _fused_linear_kd_loss_with_autograd(*inputs):
    """The loss of fused_linear_kd_loss(*inputs) with its autograd."""
    if torch.compiler.is_compiling():
        return fused_linear_kd_loss(*inputs)[0]
    if ops.forward_mode_active():
        inputs = (*inputs[:-3], True, True, inputs[2] is not None)
    elif not (torch.is_grad_enabled() and any(inputs[-3:])):
        with torch._C._AutoDispatchBelowAutograd():
            return fused_linear_kd_loss(*inputs)[0]
    return _eager_fused_linear_kd_loss(*inputs)[0]


def _autocast(tensor, device_type):
    """`tensor` as autocast would hand it to a matmul: floating tensors other than float64 in the
    autocast dtype, when autocast is on for the device."""
    if (tensor is None or not torch.is_autocast_enabled(device_type)
            or not tensor.is_floating_point() or tensor.dtype == torch.float64):
        return tensor
    return tensor.to(torch.get_autocast_dtype(device_type))


class FusedLinearKDLoss(nn.Module):
    """:class:`pykd.KDLoss` (reduction "batchmean") on the logits of two linear output layers,
    computed from the hidden states in row chunks so that no [N, V] logits tensor is ever alive:

        loss_fn(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None)
        == KDLoss(...)(student_hidden @ student_weight.T + student_bias,
                       teacher_hidden @ teacher_weight.T + teacher_bias, labels)

    Hidden states are [N, H] / [N, Ht] or [B, L, H] / [B, L, Ht] (any leading shape, the same for
    both, and for ``labels``), weights [V, H] / [V, Ht] (an ``nn.Linear``'s ``weight``), biases [V].
    Each chunk of ``chunk_size`` rows (default: :func:`default_chunk_size`, a chunk of logits of at
    most 32 MiB, 256 rows and a quarter of the batch) goes through two matmuls, pykd's one-pass
    kernel (loss and logit gradient) and the matmuls of the student's hidden-state, weight and
    bias gradients, all in the forward; the backward only scales them by the upstream gradient.
    The teacher takes no gradient: its tensors are used as if detached, even when they require
    grad.

    Under autocast (CPU or CUDA) the hidden states, weights and biases are cast to the autocast
    dtype first, as a matmul would do, and their gradients come back in their own dtypes. It is
    one op (``torch.ops.pykd.fused_linear_kd_loss``), so ``torch.compile(fullgraph=True)`` traces
    it without a graph break, and the weight's gradient reaches it as a normal parameter gradient
    (DDP's hooks included).
    """

    def __init__(self, temperature=1.0, soft_weight=1.0, hard_weight=0.0, beta=0.0,
                 ignore_index=-100, chunk_size=None):
        super().__init__()
        (self.temperature, self.soft_weight, self.hard_weight, self.beta,
         self.ignore_index) = check_settings(
            "FusedLinearKDLoss", temperature, soft_weight, hard_weight, beta, ignore_index)
        if chunk_size is not None and (
                isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(
                f"FusedLinearKDLoss: chunk_size must be a positive integer or None, got "
                f"{chunk_size!r}")
        self.chunk_size = chunk_size

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None):
        name = "FusedLinearKDLoss"
        for arg, value in (("student_hidden", student_hidden), ("student_weight", student_weight),
                           ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight),
                           ("labels", labels), ("student_bias", student_bias),
                           ("teacher_bias", teacher_bias)):
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(value).__name__}")
        if self.hard_weight != 0 and labels is None:
            raise ValueError(f"{name}: labels are required when hard_weight is not 0")
        if student_hidden.dim() < 2 or teacher_hidden.dim() < 2:
            raise ValueError(
                f"{name}: student_hidden and teacher_hidden must be [N, H] or [B, L, H], got "
                f"shapes {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}")
        leading = student_hidden.shape[:-1]
        if teacher_hidden.shape[:-1] != leading:
            raise ValueError(
                f"{name}: teacher_hidden must have the leading shape of student_hidden "
                f"{tuple(leading)}, got shape {tuple(teacher_hidden.shape)}")
        if labels is not None and labels.shape != leading:
            raise ValueError(f"{name}: labels must have the leading shape of the hidden states "
                             f"{tuple(leading)}, got shape {tuple(labels.shape)}")
        device = student_hidden.device.type
        student_hidden, student_weight, student_bias = (
            _autocast(t, device) for t in (student_hidden, student_weight, student_bias))
        teacher_hidden, teacher_weight, teacher_bias = (
            None if t is None else _autocast(t, device).detach()
            for t in (teacher_hidden, teacher_weight, teacher_bias))
        grad = torch.is_grad_enabled()
        return _fused_linear_kd_loss_with_autograd(
            student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
            teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias,
            None if labels is None else labels.reshape(-1), self.temperature, self.beta,
            self.soft_weight, self.hard_weight, self.ignore_index, self.chunk_size or 0,
            grad and student_hidden.requires_grad, grad and student_weight.requires_grad,
            grad and student_bias is not None and student_bias.requires_grad,
        )

    def extra_repr(self):
        return (
            f"temperature={self.temperature}, soft_weight={self.soft_weight}, "
            f"hard_weight={self.hard_weight}, beta={self.beta}, "
            f"ignore_index={self.ignore_index}, chunk_size={self.chunk_size}"
        )
