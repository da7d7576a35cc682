"""pykd.FusedLinearKDLoss against the unfused loss (materialised logits + pykd.KDLoss, float64)."""
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykd
from pykd import fused_linear
from testing import DEVICES, TOLERANCES, assert_close, run_python

BETAS = [0.0, 0.5, 1.0]
HIDDEN, TEACHER_HIDDEN, VOCAB = 16, 24, 300


def tensor(shape, dtype, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def inputs(rows, dtype, bias=False, seed=0, leading=None):
    """Hidden states, weights and biases of both sides; logits of a few units."""
    leading = leading or (rows,)
    return dict(
        student_hidden=tensor((*leading, HIDDEN), dtype, seed=seed),
        student_weight=tensor((VOCAB, HIDDEN), dtype, 2 / HIDDEN**0.5, seed=seed + 1),
        teacher_hidden=tensor((*leading, TEACHER_HIDDEN), dtype, seed=seed + 2),
        teacher_weight=tensor((VOCAB, TEACHER_HIDDEN), dtype, 2 / TEACHER_HIDDEN**0.5, seed + 3),
        student_bias=tensor((VOCAB,), dtype, seed=seed + 4) if bias else None,
        teacher_bias=tensor((VOCAB,), dtype, seed=seed + 5) if bias else None,
    )


def labels_for(leading, masked_every=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, leading, generator=gen)
    labels.view(-1)[::masked_every] = -100
    return labels


STUDENT = ("student_hidden", "student_weight", "student_bias")


def loss_and_grads(fn, tensors, labels, upstream=0.75):
    """fn's loss and the gradients of loss * upstream for the student's tensors."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(k in STUDENT)
              for k, v in tensors.items()}
    loss = fn(labels=labels, **leaves)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype))
    return loss.detach(), {k: leaves[k].grad for k in STUDENT if leaves[k] is not None}


def unfused(settings):
    """The same loss on materialised logits: F.linear + pykd.KDLoss."""
    module = pykd.KDLoss(**settings)

    def fn(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
           student_bias=None, teacher_bias=None):
        return module(F.linear(student_hidden, student_weight, student_bias),
                      F.linear(teacher_hidden, teacher_weight, teacher_bias), labels)
    return fn


def assert_as_close_as(actual, baseline, expected, dtype, scale):
    """For bfloat16: `actual` is at most 2.5x as far from the float64 `expected` as `baseline`, the
    unfused loss in the same dtype (whose bfloat16 logits and logit gradient already cost it up to
    ~2% of the largest gradient; the fused loss rounds once more per chunk and when it divides by
    the valid rows), plus the dtype's absolute tolerance."""
    error = (actual.double() - expected).abs().max().item()
    baseline_error = (baseline.double() - expected).abs().max().item()
    assert error <= 2.5 * baseline_error + TOLERANCES[dtype][1] * scale, (error, baseline_error)


def on_device(fn, tensors, labels, device):
    """loss_and_grads with the tensors and labels on `device`, the results back on the CPU."""
    moved = {k: None if v is None else v.to(device) for k, v in tensors.items()}
    loss, grads = loss_and_grads(fn, moved, None if labels is None else labels.to(device))
    return loss.cpu(), {k: g.cpu() for k, g in grads.items()}


def check_against_unfused(tensors, labels, chunk_size=None, device="cpu", **settings):
    """The fused loss on `device` against the float64 unfused loss on the CPU (for bfloat16: as
    close as the unfused loss in bfloat16 on the same device)."""
    dtype = tensors["student_hidden"].dtype
    settings = dict(dict(temperature=2.0, soft_weight=1.0, hard_weight=0.0), **settings)
    loss, grads = on_device(
        pykd.FusedLinearKDLoss(**settings, chunk_size=chunk_size), tensors, labels, device)
    as64 = {k: None if v is None else v.double() for k, v in tensors.items()}
    ref_loss, ref_grads = loss_and_grads(unfused(settings), as64, labels)
    assert loss.dtype == dtype
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == tensors[name].shape, name
    if dtype == torch.bfloat16:
        same_loss, same_grads = on_device(unfused(settings), tensors, labels, device)
        assert_as_close_as(loss, same_loss, ref_loss, dtype, ref_loss.abs().item())
        for name, grad in grads.items():
            assert_as_close_as(grad, same_grads[name], ref_grads[name], dtype,
                               ref_grads[name].abs().max().item())
        return loss, grads
    assert_close(loss, ref_loss, dtype, scale=ref_loss.abs().item() + 1e-30)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], dtype, scale=ref_grads[name].abs().max().item())
    return loss, grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("terms", ["soft", "masked_soft", "masked_soft_and_hard"])
def test_matches_unfused(device, dtype, beta, bias, terms):
    rows = 23  # 5 chunks of 5 rows and one of 3
    labels = None if terms == "soft" else labels_for((rows,))
    weights = dict(soft_weight=0.3, hard_weight=0.7) if terms.endswith("hard") else {}
    loss, grads = check_against_unfused(
        inputs(rows, dtype, bias), labels, chunk_size=5, device=device, beta=beta, **weights)
    if labels is not None:
        assert (grads["student_hidden"][labels == -100] == 0).all()


def test_float64_and_the_automatic_chunk():
    check_against_unfused(inputs(37, torch.float64, bias=True), labels_for((37,)), beta=0.5,
                          soft_weight=0.5, hard_weight=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 40, None])
def test_chunk_boundaries(device, chunk_size):
    """Chunks that do not divide N, one chunk of all rows, a chunk larger than N."""
    check_against_unfused(inputs(17, torch.float32, bias=True), labels_for((17,)),
                          chunk_size=chunk_size, device=device, hard_weight=0.5)


def test_chunks_bound_the_logits(monkeypatch):
    """No kd_loss call sees more rows than a chunk: the [N, V] logits never exist."""
    seen = []
    kd_loss = pykd.ops.kd_loss

    def recording(student, teacher, *args):
        seen.append((tuple(student.shape), tuple(teacher.shape)))
        return kd_loss(student, teacher, *args)
    monkeypatch.setattr(pykd.ops, "kd_loss", recording)
    check_against_unfused(inputs(23, torch.float32), None, chunk_size=6)
    fused_calls = seen[: len(seen) - 1]  # the last call is the unfused reference's
    assert fused_calls == [((6, VOCAB),) * 2] * 3 + [((5, VOCAB),) * 2]


def test_default_chunk_size_rule():
    budget = fused_linear.CHUNK_BYTES
    assert fused_linear.default_chunk_size(32000, torch.float32) == budget // (32000 * 4) // 16 * 16
    assert fused_linear.default_chunk_size(128256, torch.bfloat16) == 128  # 32 MiB of logits
    assert fused_linear.default_chunk_size(32000, torch.bfloat16) == fused_linear.MAX_CHUNK_ROWS
    assert fused_linear.default_chunk_size(budget // 40, torch.float32) == 10  # < 16: not rounded
    assert fused_linear.default_chunk_size(budget, torch.float32) == 1
    # At most a quarter of the batch (at least 16 rows), so that the three chunk buffers stay
    # under the unfused logits.
    assert fused_linear.default_chunk_size(32000, torch.bfloat16, rows=1024) == 256
    assert fused_linear.default_chunk_size(32000, torch.bfloat16, rows=4096) == 256
    assert fused_linear.default_chunk_size(32000, torch.float32, rows=8) == 16
    assert fused_linear.default_chunk_size(32000, torch.float32, rows=100) == 16


@pytest.mark.parametrize("beta", BETAS)
def test_three_dimensional_hidden_states(beta):
    tensors = inputs(None, torch.float32, bias=True, leading=(3, 7))
    labels = labels_for((3, 7))
    loss, grads = check_against_unfused(tensors, labels, chunk_size=4, beta=beta, hard_weight=0.5)
    flat = {k: v if v is None or v.dim() == 1 or k.endswith("weight") else v.reshape(21, -1)
            for k, v in tensors.items()}
    flat_loss, flat_grads = loss_and_grads(
        pykd.FusedLinearKDLoss(2.0, hard_weight=0.5, beta=beta, chunk_size=4), flat,
        labels.reshape(-1))
    torch.testing.assert_close(loss, flat_loss)
    torch.testing.assert_close(grads["student_hidden"].reshape(21, -1), flat_grads["student_hidden"])


@pytest.mark.parametrize("device", DEVICES)
def test_an_all_masked_chunk(device):
    labels = labels_for((20,))
    labels[5:10] = -100  # the second chunk of 5
    loss, grads = check_against_unfused(inputs(20, torch.float32, bias=True), labels,
                                        chunk_size=5, device=device, soft_weight=0.5,
                                        hard_weight=0.5)
    assert (grads["student_hidden"][5:10] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", BETAS)
def test_an_all_masked_batch_and_an_empty_one_give_zero(device, beta):
    module = pykd.FusedLinearKDLoss(2.0, soft_weight=0.5, hard_weight=0.5, beta=beta, chunk_size=4)
    for rows in (10, 0):
        tensors = inputs(rows, torch.float32, bias=True)
        loss, grads = on_device(module, tensors, torch.full((rows,), -100), device)
        assert loss == 0
        assert all((g == 0).all() for g in grads.values()) and len(grads) == 3


def test_only_what_requires_grad_is_computed():
    tensors = inputs(12, torch.float32, bias=True)
    module = pykd.FusedLinearKDLoss(2.0, chunk_size=5)
    full_loss, full_grads = loss_and_grads(module, tensors, None)
    weight = tensors["student_weight"].clone().requires_grad_()
    loss = module(tensors["student_hidden"], weight, tensors["teacher_hidden"],
                  tensors["teacher_weight"], student_bias=tensors["student_bias"],
                  teacher_bias=tensors["teacher_bias"])
    loss.backward(torch.tensor(0.75))
    torch.testing.assert_close(weight.grad, full_grads["student_weight"])
    with torch.no_grad():  # forward only
        torch.testing.assert_close(module(labels=None, **tensors), full_loss)
    op = torch.ops.pykd.fused_linear_kd_loss
    _, grad_hidden, grad_weight, grad_bias = op(
        *(tensors[k] for k in ("student_hidden", "student_weight", "student_bias",
                               "teacher_hidden", "teacher_weight", "teacher_bias")),
        None, 2.0, 0.0, 1.0, 0.0, -100, 5, False, True, False)
    assert grad_hidden.shape == (0,) and grad_bias.shape == (0,)
    torch.testing.assert_close(grad_weight * 0.75, full_grads["student_weight"])


def test_the_teacher_takes_no_gradient():
    tensors = {k: None if v is None else v.requires_grad_() for k, v in
               inputs(8, torch.float32, bias=True).items()}
    pykd.FusedLinearKDLoss(2.0)(**tensors).backward()
    assert tensors["student_weight"].grad is not None
    assert all(tensors[k].grad is None for k in ("teacher_hidden", "teacher_weight",
                                                  "teacher_bias"))


def test_autograd_keeps_only_input_sized_gradients():
    tensors = {k: v.requires_grad_(k in STUDENT) for k, v in
               inputs(64, torch.float32, bias=True).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = pykd.FusedLinearKDLoss(2.0, chunk_size=16)(**tensors)
    assert sorted(tuple(x.shape) for x in saved) == sorted(
        tuple(tensors[k].shape) for k in STUDENT)
    loss.backward()


def test_gradcheck():
    tensors = {k: v.requires_grad_(k in STUDENT) for k, v in
               inputs(7, torch.float64, bias=True).items()}
    labels = labels_for((7,))
    for beta in BETAS:
        module = pykd.FusedLinearKDLoss(1.5, 0.6, 0.4, beta=beta, chunk_size=3)
        with pykd.ops.functional_backward():
            assert torch.autograd.gradcheck(
                lambda h, w, b: module(h, w, tensors["teacher_hidden"], tensors["teacher_weight"],
                                       labels, b, tensors["teacher_bias"]),
                [tensors[k] for k in STUDENT], fast_mode=True)


@pytest.mark.parametrize("case", ["all", "no_bias_no_labels", "weight_only"])
def test_opcheck(case):
    tensors = inputs(9, torch.float32, bias=case != "no_bias_no_labels")
    labels = None if case == "no_bias_no_labels" else labels_for((9,))
    grads = (False, True, False) if case == "weight_only" else (True, True, case == "all")
    args = [tensors["student_hidden"].requires_grad_(grads[0]),
            tensors["student_weight"].requires_grad_(grads[1]),
            tensors["student_bias"] if tensors["student_bias"] is None
            else tensors["student_bias"].requires_grad_(grads[2]),
            tensors["teacher_hidden"], tensors["teacher_weight"], tensors["teacher_bias"],
            labels, 2.0, 0.5, 0.5, 0.5 if labels is not None else 0.0, -100, 4, *grads]
    with pykd.ops.functional_backward():
        torch.library.opcheck(torch.ops.pykd.fused_linear_kd_loss, args)


class Distiller(nn.Module):
    """A student and a teacher head over a shared trunk, distilled with FusedLinearKDLoss."""

    def __init__(self, **settings):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(8, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)
        self.teacher_trunk = nn.Linear(8, TEACHER_HIDDEN)
        self.teacher_head = nn.Linear(TEACHER_HIDDEN, VOCAB)
        # A frozen teacher (DDP without find_unused_parameters would wait for its gradients).
        self.teacher_trunk.requires_grad_(False)
        self.teacher_head.requires_grad_(False)
        self.loss = pykd.FusedLinearKDLoss(**settings)

    def forward(self, x, labels):
        hidden = torch.tanh(self.trunk(x))
        with torch.no_grad():
            teacher_hidden = torch.tanh(self.teacher_trunk(x))
        return self.loss(hidden, self.head.weight, teacher_hidden, self.teacher_head.weight,
                         labels, self.head.bias, self.teacher_head.bias)


def distiller_step(model, x, labels):
    model.zero_grad()
    loss = model(x, labels)
    (loss * 3).backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()  # torch.compile's prefix
                           for n, p in model.named_parameters()
                           if p.grad is not None}


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = Distiller(temperature=2.0, soft_weight=0.5, hard_weight=0.5, beta=0.5, chunk_size=6)
    x, labels = tensor((2, 11, 8), torch.float32, seed=9), labels_for((2, 11))
    expected_loss, expected_grads = distiller_step(model, x, labels)
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = distiller_step(compiled, x, labels)
    torch.testing.assert_close(loss, expected_loss)
    assert grads.keys() == expected_grads.keys() == {"trunk.weight", "trunk.bias", "head.weight",
                                                     "head.bias"}
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name])


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_autocast(compiled):
    """Under autocast the inputs are cast to bfloat16 as a matmul's would be; float32 parameters
    get float32 gradients."""
    torch._dynamo.reset()
    model = Distiller(temperature=2.0, hard_weight=0.5, chunk_size=5)
    x, labels = tensor((3, 7, 8), torch.float32, seed=10), labels_for((3, 7))
    run = torch.compile(model, fullgraph=True) if compiled else model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = distiller_step(run, x, labels)
    assert loss.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads.values())
    # The same with every matmul input cast by hand, in float64 from there on.
    model.zero_grad()
    bf = {n: p.detach().bfloat16().double().requires_grad_() for n, p in model.named_parameters()}
    hidden = torch.tanh(F.linear(x.bfloat16(), bf["trunk.weight"].bfloat16(),
                                 bf["trunk.bias"].bfloat16()).float()).bfloat16().double()
    teacher_hidden = torch.tanh(F.linear(
        x.bfloat16(), bf["teacher_trunk.weight"].bfloat16(), bf["teacher_trunk.bias"].bfloat16()
    ).float()).bfloat16().double()
    head_bias = bf["head.bias"]
    hidden.requires_grad_()
    expected = unfused(dict(temperature=2.0, soft_weight=1.0, hard_weight=0.5))(
        hidden, bf["head.weight"], teacher_hidden, bf["teacher_head.weight"].detach(), labels,
        head_bias, bf["teacher_head.bias"].detach())
    (expected * 3).backward()
    assert_close(loss, expected, torch.bfloat16, scale=expected.abs().item())
    for name in ("head.weight", "head.bias"):
        assert_close(grads[name], bf[name].grad, torch.bfloat16,
                     scale=bf[name].grad.abs().max().item())


def test_ddp_averages_the_weight_gradient_of_two_processes(tmp_path):
    """Two gloo processes, each with half the batch: DDP's mean of their head gradients equals the
    gradient of the whole batch in one process."""
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        from torch.nn.parallel import DistributedDataParallel
        from test_fused_linear import Distiller, tensor, labels_for, distiller_step

        def run(rank, x, labels):
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
            dist.init_process_group("gloo", rank=rank, world_size=2)
            model = DistributedDataParallel(Distiller(temperature=2.0, chunk_size=3))
            _, grads = distiller_step(model, x[rank], labels[rank])
            torch.save(grads["module.head.weight"], f"{sys.argv[2]}/rank{rank}.pt")
            dist.destroy_process_group()

        if __name__ == "__main__":
            torch.set_num_threads(1)
            x, labels = tensor((2, 5, 8), torch.float32, seed=11), labels_for((2, 5)).abs()  # no mask
            _, whole = distiller_step(Distiller(temperature=2.0, chunk_size=3), x, labels)
            mp.spawn(run, args=(x, labels), nprocs=2)
            for rank in range(2):
                torch.testing.assert_close(torch.load(f"{sys.argv[2]}/rank{rank}.pt"),
                                           whole["head.weight"])
            print("ok")
    """))
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_python([script, port, tmp_path], timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_bad_inputs():
    t = inputs(6, torch.float32, bias=True)
    module = pykd.FusedLinearKDLoss()

    def call(**changes):
        return module(**dict(t, **changes))
    cases = [
        (dict(student_weight=torch.zeros(VOCAB, HIDDEN + 1)), ValueError,
         r"student_weight must be \[V, H\] with the H of student_hidden \(16\)"),
        (dict(teacher_weight=torch.zeros(VOCAB + 1, TEACHER_HIDDEN),
              teacher_bias=torch.zeros(VOCAB + 1)), ValueError, "the same vocabulary V"),
        (dict(teacher_hidden=torch.zeros(5, TEACHER_HIDDEN)), ValueError,
         "teacher_hidden must have the leading shape of student_hidden"),
        (dict(student_bias=torch.zeros(VOCAB - 1)), ValueError, r"student_bias must be \[V\]"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError,
         "labels must have the leading shape"),
        (dict(labels=torch.zeros(6)), TypeError, "labels must be an integer tensor"),
        (dict(student_hidden=torch.zeros(HIDDEN)), ValueError, r"must be \[N, H\] or \[B, L, H\]"),
        (dict(student_weight=t["student_weight"].double()), TypeError,
         "student_weight must have the dtype of student_hidden"),
        (dict(teacher_weight=torch.zeros(VOCAB, TEACHER_HIDDEN, 2)), ValueError,
         r"teacher_weight must be \[V, H\]"),
        (dict(student_weight=[[0.0]]), TypeError, "student_weight must be a torch.Tensor"),
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=message):
            call(**changes)
    with pytest.raises(ValueError, match="labels are required when hard_weight is not 0"):
        pykd.FusedLinearKDLoss(hard_weight=0.5)(**t)
    for chunk_size in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
            pykd.FusedLinearKDLoss(chunk_size=chunk_size)
    with pytest.raises(ValueError, match="beta must be a number in"):
        pykd.FusedLinearKDLoss(beta=1.5)
    with pytest.raises(ValueError, match="FusedLinearKDLoss: temperature must be"):
        pykd.FusedLinearKDLoss(temperature=0)
