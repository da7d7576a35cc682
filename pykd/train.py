"""Training, distillation, checkpoints and evaluation, on one process or under torchrun.

Without a teacher the loss is cross-entropy. With one it is

    soft_weight * T^2 * KL(teacher/T || student/T) + hard_weight * CE     (pykd.KDLoss)
  + logit_weight * mean((student_logits - teacher_logits)^2)             (logit matching, 003)
  + hint_weight * sum_k mean((regressor_k(student_k) - teacher_k)^2)      (FitNets hints, 002)

and with or without one, ``+ nuclear_weight * ||W||_*`` of the student's first layer (004).
The teacher runs in eval mode under ``no_grad``.

Under torchrun (WORLD_SIZE > 1) the student is wrapped in DistributedDataParallel (gloo on CPU,
nccl on GPU); each rank reads its shard of the training set through a DistributedSampler and
``batch_size`` is the global batch, split across ranks. Metrics are reduced across ranks and only
rank 0 writes files.

Checkpoints are written atomically after every epoch with the optimizer and RNG states, so a run
resumed from epoch k ends with the same weights, bit for bit, as one that never stopped.
"""
import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pykd  # hint_loss, HintRegressor and FeatureCapture are looked up when hints are used

from . import models, report
from .loss import KDLoss

__all__ = [
    "TrainConfig", "CheckpointError", "fit", "evaluate", "save_checkpoint", "load_checkpoint",
    "load_model", "run",
]

CHECKPOINT_FORMAT = "pykd-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not the one asked for."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False
    progress: bool = True  # shown only on rank 0 and when stderr is a terminal
    # Distillation terms: they need a teacher (nuclear_weight does not).
    temperature: float = 4.0
    soft_weight: float = 0.5
    hard_weight: float = 0.5
    logit_weight: float = 0.0
    hint_weight: float = 0.0
    # (student layer, teacher layer) names as in named_modules(); the default pairs the models'
    # `features` trunks, which every registered model has.
    hint_layers: list = field(default_factory=lambda: [("features", "features")])
    nuclear_weight: float = 0.0

    def check(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("weight_decay", "soft_weight", "hard_weight", "logit_weight", "hint_weight",
                     "nuclear_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Distributed context


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def context(device=None):
    """The process's rank, world size and device; joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device in (None, "cuda")
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        return Context(dist.get_rank(), world,
                       torch.device("cuda", local_rank) if cuda else torch.device("cpu"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Context(0, 1, torch.device(device))


def _all_reduce(ctx, tensor):
    if ctx.world > 1:
        dist.all_reduce(tensor)
    return tensor


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, state):
    """torch.save, atomically: a crash at any point leaves either the previous checkpoint or the
    new one, never a torn file."""
    report.write_atomically(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a pykd checkpoint")
    return state


def load_model(path, expect=None):
    """The model stored in a checkpoint, rebuilt by name; `expect` checks that name."""
    state = load_checkpoint(path)
    if expect is not None and state["model"] != expect:
        raise CheckpointError(f"checkpoint {path} holds model {state['model']!r}, not {expect!r}")
    model = models.build_model(state["model"], **state["model_args"])
    model.load_state_dict(state["state_dict"])
    return model, state


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# The student with its hint regressors


def first_layer_weight(model):
    """The weight of the model's first convolution or linear layer (in definition order)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return module.weight
    raise ValueError("the student has no Conv or Linear layer for the nuclear-norm penalty")


class Student(nn.Module):
    """The student and its FitNets regressors as one module, so that one optimizer and one
    DistributedDataParallel cover both. Returns the logits and the regressed hint features."""

    def __init__(self, model, hint_layers=(), teacher_shapes=(), example=None):
        super().__init__()
        self.model = model
        self.hint_layers = [s for s, _ in hint_layers]
        self.regressors = nn.ModuleList()
        self.teacher_sizes = []
        self.capture = None
        if not hint_layers:
            return
        self.capture = pykd.FeatureCapture(model, self.hint_layers)
        was_training = model.training
        with torch.no_grad():
            model.eval()(example)  # eval: a shape probe must not move BatchNorm statistics
        model.train(was_training)
        for name, shape in zip(self.hint_layers, teacher_shapes):
            student_shape = self.capture.features[name].shape
            if len(student_shape) != len(shape) or len(shape) not in (2, 4):
                raise ValueError(
                    f"hint layers: student {name} gives {tuple(student_shape)} but the teacher's "
                    f"layer gives {tuple(shape)}; both must be [B, C] or [B, C, H, W]")
            kind = "conv" if len(shape) == 4 else "linear"
            self.regressors.append(pykd.HintRegressor(student_shape[1], shape[1], kind=kind))
            self.teacher_sizes.append(tuple(shape[2:]) if kind == "conv" else None)

    def forward(self, x):
        logits = self.model(x)
        hints = [regressor(self.capture.features[name], size=size)
                 for name, regressor, size
                 in zip(self.hint_layers, self.regressors, self.teacher_sizes)]
        return logits, hints


# ---------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def evaluate(model, x, y, num_classes, ctx=None, batch_size=256, bf16=False):
    """Accuracy and macro precision/recall/F1 of `model` on (x, y). Under torchrun each rank
    takes every world-th example and the confusion matrices are summed, so every example counts
    exactly once."""
    ctx = ctx or context()
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=ctx.device)
    x, y = x[ctx.rank::ctx.world], y[ctx.rank::ctx.world]
    for start in range(0, len(x), batch_size):
        inputs = x[start:start + batch_size].to(ctx.device)
        labels = y[start:start + batch_size].to(ctx.device)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
            predicted = model(inputs).argmax(-1)
        confusion += torch.bincount(labels * num_classes + predicted,
                                    minlength=num_classes ** 2).view(num_classes, num_classes)
    model.train(was_training)
    return report.metrics_from_confusion(_all_reduce(ctx, confusion).cpu())


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def fit(model, splits, config, *, teacher=None, checkpoint=None, meta=None, resume=False,
        on_epoch_end=None, device=None):
    """Trains `model` (any nn.Module giving [B, C] logits) on `splits` (pykd.data.Splits).

    With `teacher`, distils it into `model` with the losses of `config`. With `checkpoint` (a
    path), saves after every epoch; `meta` is stored with it (model name, data description).
    With `resume` and an existing checkpoint, continues from its last epoch. `on_epoch_end(record)`
    is called after each epoch's checkpoint. Returns {"history", "val", "test"}.
    """
    config.check()
    ctx = context(device)
    distilling = teacher is not None
    hints_on = distilling and config.hint_weight > 0
    hint_layers = [tuple(p) for p in config.hint_layers] if hints_on else []
    model.to(ctx.device)

    teacher_capture = None
    teacher_shapes = []
    example = splits.train_x[:2].to(ctx.device)
    if distilling:
        teacher.to(ctx.device).eval().requires_grad_(False)
        if hint_layers:
            if not hasattr(pykd, "hint_loss"):
                raise ValueError("hint_weight needs pykd.hint_loss, which this build lacks")
            teacher_capture = pykd.FeatureCapture(teacher, [t for _, t in hint_layers])
            with torch.no_grad():
                teacher(example)
            teacher_shapes = [tuple(teacher_capture.features[t].shape) for _, t in hint_layers]
    student = Student(model, hint_layers, teacher_shapes, example).to(ctx.device)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    kd = KDLoss(config.temperature, config.soft_weight, config.hard_weight)

    history, start_epoch = [], 0
    if resume and checkpoint and os.path.exists(checkpoint):
        state = load_checkpoint(checkpoint)
        if meta and state.get("model") != meta.get("model"):
            raise CheckpointError(f"cannot resume: {checkpoint} holds model {state.get('model')!r}"
                                  f", not {meta.get('model')!r}")
        model.load_state_dict(state["state_dict"])
        student.regressors.load_state_dict(state["regressors"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start_epoch, history = state["epoch"], state["history"]

    trainable = student
    if ctx.world > 1:
        trainable = nn.parallel.DistributedDataParallel(
            student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    dataset = TensorDataset(splits.train_x, splits.train_y)
    # The sampler's order depends only on (seed, epoch): the same after a resume, and sharded.
    sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                 seed=config.seed)
    loader = DataLoader(dataset, batch_size=max(1, config.batch_size // ctx.world),
                        sampler=sampler)
    show = config.progress and ctx.is_main and sys.stderr.isatty()
    first_weight = first_layer_weight(model) if config.nuclear_weight else None

    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            student.train()
            started = time.perf_counter()
            sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss, correct, count
            batches = _progress(loader, show, f"epoch {epoch + 1}/{config.epochs}")
            for inputs, labels in batches:
                inputs, labels = inputs.to(ctx.device), labels.to(ctx.device)
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    logits, hints = trainable(inputs)
                    if distilling:
                        with torch.no_grad():
                            teacher_logits = teacher(inputs)
                            teacher_features = [teacher_capture.features[t] for _, t in hint_layers]
                        loss = kd(logits, teacher_logits, labels)
                        if config.logit_weight:
                            loss = loss + config.logit_weight * F.mse_loss(
                                logits.float(), teacher_logits.float())
                        if hint_layers:
                            loss = loss + config.hint_weight * pykd.hint_loss(
                                hints, teacher_features)
                    else:
                        loss = F.cross_entropy(logits, labels)
                if first_weight is not None:
                    loss = loss + config.nuclear_weight * torch.linalg.matrix_norm(
                        first_weight.flatten(1).float(), ord="nuc")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n = len(labels)
                sums += torch.stack([loss.detach().double() * n,
                                     (logits.argmax(-1) == labels).sum().double(),
                                     torch.tensor(n, dtype=torch.float64, device=ctx.device)])
                if show:
                    batches.set_postfix(loss=f"{loss.item():.4f}")
            loss_sum, correct, count = _all_reduce(ctx, sums).tolist()
            val = evaluate(model, splits.val_x, splits.val_y, splits.num_classes, ctx,
                           bf16=config.bf16)
            record = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / count,
                "train_accuracy": correct / count,
                "train_examples": int(count),  # over all ranks (the sampler pads to a multiple)
                "val_accuracy": val["accuracy"],
                "val_f1": val["f1"],
                "seconds": time.perf_counter() - started,
            }
            history.append(record)
            if checkpoint and ctx.is_main:
                save_checkpoint(checkpoint, {
                    "format": CHECKPOINT_FORMAT,
                    **(meta or {}),
                    "state_dict": model.state_dict(),
                    "regressors": student.regressors.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "rng": _rng_state(),
                    "config": asdict(config),
                    "history": history,
                })
            if on_epoch_end is not None:
                on_epoch_end(record)
    finally:  # the hooks go even when a run stops early
        for capture in (student.capture, teacher_capture):
            if capture is not None:
                capture.remove()
    return {
        "history": history,
        "val": evaluate(model, splits.val_x, splits.val_y, splits.num_classes, ctx,
                        bf16=config.bf16),
        "test": evaluate(model, splits.test_x, splits.test_y, splits.num_classes, ctx,
                         bf16=config.bf16),
    }


def data_meta(spec, data_seed, train_fraction, splits):
    """What a checkpoint records about its data, enough to rebuild the same splits and inputs."""
    return {"spec": spec, "data_seed": data_seed, "train_fraction": train_fraction,
            "classes": splits.classes, "mean": splits.mean, "std": splits.std}


def run(model_name, splits, data, config, out_dir, name, *, teacher_path=None, resume=False,
        device=None, on_epoch_end=None):
    """Builds `model_name` (seeded), trains or distils it, and writes `out_dir/name.pt` and
    `out_dir/name.json` (history, val/test metrics, cost). Returns the metrics dict.

    `data` is :func:`data_meta` of `splits`; `teacher_path` a checkpoint to distil from.
    """
    teacher = None
    if teacher_path is not None:
        teacher, teacher_state = load_model(teacher_path)
        teacher_classes = teacher_state["model_args"]["num_classes"]
        if teacher_classes != splits.num_classes:
            raise CheckpointError(
                f"teacher {teacher_path} predicts {teacher_classes} classes but the data set "
                f"has {splits.num_classes}")
    torch.manual_seed(config.seed)
    model_args = {"num_classes": splits.num_classes, "in_channels": splits.train_x.shape[1],
                  "image_size": splits.train_x.shape[-1]}
    model = models.build_model(model_name, **model_args)
    meta = {"model": model_name, "model_args": model_args, "data": data,
            "teacher": os.path.abspath(teacher_path) if teacher_path else None}
    checkpoint = os.path.join(out_dir, f"{name}.pt")
    result = fit(model, splits, config, teacher=teacher, checkpoint=checkpoint, meta=meta,
                 resume=resume, on_epoch_end=on_epoch_end, device=device)
    ctx = context(device)
    metrics = {"name": name, **meta, "config": asdict(config), **result}
    if ctx.is_main:
        metrics["cost"] = report.model_cost(model.eval(), splits.test_x[:64].to(ctx.device))
        metrics["checkpoint"] = os.path.abspath(checkpoint)
        report.write_json(os.path.join(out_dir, f"{name}.json"), metrics)
    return metrics


@contextlib.contextmanager
def distributed_teardown():
    """Leaves the process group (if one was joined) on the way out; after a success, only once
    every rank has finished."""
    try:
        yield
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
