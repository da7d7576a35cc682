"""The fused losses under PyTorch's other ways of differentiating, against pykd.reference in
float64: torch.func (grad, vjp, jacrev, vmap of grad) and forward-mode AD
(torch.autograd.forward_ad, torch.func.jvp and jacfwd) give the reference's results; every way to
a second derivative (backward(create_graph=True), Hessians, gradient penalties, grad of grad)
raises instead of giving a silent zero."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import func

import pykd
from pykd import reference
from testing import DEVICES

T = 2.0


def randn64(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * 2


def cases(device):
    """name: (pykd's loss, the reference, the shapes of its differentiable arguments), on
    `device`. Losses of reduction "none" are weighted per row, so that the backward's per-row
    scaling is exercised."""

    def logits(*shape, seed):
        return randn64(shape, seed).to(device)

    labels = torch.tensor([1, -100, 3, 0, 2], device=device)  # one masked row
    row_weights = torch.linspace(0.5, 2.0, 5, dtype=torch.float64, device=device)
    values, indices = logits(5, 12, seed=3).topk(4, dim=-1)
    lse = torch.logsumexp(logits(5, 12, seed=3) / T, dim=-1)
    teacher_hidden, teacher_weight = logits(5, 6, seed=5), logits(12, 6, seed=6)
    second_teacher_feature = logits(2, 5, seed=4)

    def kd(impl):
        return lambda s, t: impl(s, t, T, beta=0.3, labels=labels)

    def kd_rows(impl):
        return lambda s, t: (impl(s, t, T, "none", labels=labels) * row_weights).sum()

    def sparse(impl):
        return lambda s: (impl(s, values, indices, T, "none", teacher_lse=lse)
                          * row_weights).sum()

    def multi(impl):
        return lambda s, t1, t2: impl(s, [t1, t2], [0.25, 0.75], T, labels=labels)

    def hint(impl):
        return lambda s1, s2, t1: impl([s1, s2], [t1, second_teacher_feature], [1.0, 3.0])

    def fused_linear(hidden, weight):
        return pykd.FusedLinearKDLoss(T, 0.5, 0.5, beta=0.3, chunk_size=2)(
            hidden, weight, teacher_hidden, teacher_weight, labels)

    def fused_linear_reference(hidden, weight):
        return reference.kd_loss(hidden @ weight.T, teacher_hidden @ teacher_weight.T, T,
                                 beta=0.3, labels=labels, soft_weight=0.5, hard_weight=0.5)

    rows = [(5, 12), (5, 12)]
    return {
        "kd_loss": (kd(pykd.kd_loss), kd(reference.kd_loss), rows),
        "kd_loss rows": (kd_rows(pykd.kd_loss), kd_rows(reference.kd_loss), rows),
        "KDLoss": (lambda s, t: pykd.KDLoss(T, 0.5, 0.5)(s, t, labels),
                   lambda s, t: reference.kd_loss(s, t, T, labels=labels, soft_weight=0.5,
                                                  hard_weight=0.5), rows),
        "sparse_kd_loss": (sparse(pykd.sparse_kd_loss), sparse(reference.sparse_kd_loss),
                           [(5, 12)]),
        "multi_teacher_kd_loss": (multi(pykd.multi_teacher_kd_loss),
                                  multi(reference.multi_teacher_kd_loss), rows + [(5, 12)]),
        "hint_loss": (hint(pykd.hint_loss), hint(reference.hint_loss),
                      [(3, 4), (2, 5), (3, 4)]),
        "FusedLinearKDLoss": (fused_linear, fused_linear_reference, [(5, 4), (12, 4)]),
    }


NAMES = list(cases("cpu"))
# What the error names.
OP_NAMES = {"kd_loss rows": "kd_loss", "KDLoss": "kd_loss",
            "FusedLinearKDLoss": "fused_linear_kd_loss"}


def case(name, device):
    loss, ref, shapes = cases(device)[name]
    args = [randn64(shape, seed=10 + i).to(device) for i, shape in enumerate(shapes)]
    return loss, ref, args


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_func_grad_vjp_and_jacrev(name, device):
    loss, ref, args = case(name, device)
    for argnum in range(len(args)):
        assert_close(func.grad(loss, argnums=argnum)(*args), func.grad(ref, argnums=argnum)(*args))
    assert_close(func.jacrev(loss, argnums=0)(*args), func.jacrev(ref, argnums=0)(*args))
    value, vjp = func.vjp(loss, *args)
    ref_value, ref_vjp = func.vjp(ref, *args)
    assert_close(value, ref_value)
    cotangent = torch.tensor(0.75, dtype=torch.float64, device=device)
    for got, expected in zip(vjp(cotangent), ref_vjp(cotangent)):
        assert_close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_vmap_of_grad(name, device):
    """Per-sample gradients, the usual reason for vmap(grad(...))."""
    loss, ref, args = case(name, device)
    batch = [torch.stack([a * scale for scale in (0.5, 1.0, 3.0)]) for a in args]
    assert_close(func.vmap(func.grad(loss))(*batch), func.vmap(func.grad(ref))(*batch))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_forward_mode(name, device):
    loss, ref, args = case(name, device)
    tangents = [randn64(a.shape, seed=20 + i).to(device) for i, a in enumerate(args)]
    expected_value, expected = func.jvp(ref, tuple(args), tuple(tangents))
    value, tangent = func.jvp(loss, tuple(args), tuple(tangents))
    assert_close(value, expected_value)
    assert_close(tangent, expected)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(loss(*[fwAD.make_dual(a, t) for a, t in zip(args, tangents)]))
    assert_close(dual.primal, expected_value)
    assert_close(dual.tangent, expected)
    # One input dual, another requiring grad for a backward, in the same call.
    student = args[0].clone().requires_grad_()
    with fwAD.dual_level():
        out = loss(student, *[fwAD.make_dual(a, t) for a, t in zip(args[1:], tangents[1:])])
        tangent = fwAD.unpack_dual(out).tangent
    out.backward()
    assert_close(student.grad, func.grad(ref)(*args))
    if len(args) > 1:
        assert_close(tangent, func.jvp(lambda *rest: ref(args[0], *rest), tuple(args[1:]),
                                       tuple(tangents[1:]))[1])
    else:
        assert tangent is None  # nothing but the student is differentiable
    assert_close(func.jacfwd(loss, argnums=0)(*args), func.jacrev(ref, argnums=0)(*args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
def test_second_derivatives_raise(name, device):
    """No second derivative is ever silently wrong: an eager backward(create_graph=True) raises at
    once, and so does whatever differentiates torch.func.grad's result."""
    loss, ref, args = case(name, device)
    error = f"{OP_NAMES.get(name, name)}: second derivatives are not implemented"
    student = args[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=error):
        torch.autograd.grad(loss(student, *args[1:]), student, create_graph=True)
    with pytest.raises(RuntimeError, match=error):
        torch.autograd.functional.hessian(lambda s: loss(s, *args[1:]), args[0])
    # A gradient penalty on the weights of a layer before the loss.
    weight = torch.eye(args[0].shape[-1], dtype=torch.float64, device=device).requires_grad_()
    with pytest.raises(RuntimeError, match=error):
        torch.autograd.grad(loss(args[0] @ weight, *args[1:]), weight, create_graph=True)
    with pytest.raises(RuntimeError, match=error):
        func.hessian(loss)(*args)
    with pytest.raises(RuntimeError, match=error):
        func.grad(lambda s: func.grad(loss)(s, *args[1:]).square().sum())(args[0])
    with pytest.raises(RuntimeError, match=error):
        func.jacfwd(func.grad(loss))(*args)
