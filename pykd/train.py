"""Training, distillation, checkpoints and evaluation, on one process or under torchrun.

Without a teacher the loss is cross-entropy. With one it is

    soft_weight * T^2 * KL(teacher/T || student/T) + hard_weight * CE     (pykd.KDLoss)
  + logit_weight * mean((student_logits - teacher_logits)^2)             (logit matching, 003)
  + hint_weight * sum_k mean((regressor_k(student_k) - teacher_k)^2)      (FitNets hints, 002)

and with or without one, ``+ nuclear_weight * ||W||_*`` of the student's first layer (004).
The teacher runs in eval mode under ``no_grad``. Several teachers (a :class:`TeacherEnsemble`,
000's "distillation from multiple teachers") replace the KL by
``sum_k teacher_weights[k] * T^2 * KL(teacher_k/T || student/T)`` (pykd.multi_teacher_kd_loss,
the weights 1/K by default), with no logit or hint term.

A :class:`Cohort` of students trains by deep mutual learning (004, and 000's "mutual learning
with an ensemble of peers"): all at once, each on ``hard_weight * CE + soft_weight * T^2 * KL``
towards each other student's detached predictions, averaged over the others (:func:`peer_loss`).

Under torchrun (WORLD_SIZE > 1) the student is wrapped in DistributedDataParallel (gloo on CPU,
nccl on GPU); each rank reads its shard of the training set through a DistributedSampler and
``batch_size`` is the global batch, split across ranks. Metrics are reduced across ranks and only
rank 0 writes files.

:func:`fit` writes a resumable checkpoint after every epoch (atomically, with the optimizer and
RNG states), so a run resumed from epoch k ends with the same weights, bit for bit, as one that
never stopped. :func:`run` (what the command line uses) keeps that per-epoch state in
``NAME.partial.pt`` and writes the finished run's ``NAME.pt`` and ``NAME.json`` together, only
once training, evaluation and the cost measurement have all succeeded.

Error messages name each setting by its command-line option (``--soft-weight`` for
``TrainConfig.soft_weight``).
"""
import contextlib
import json
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import pykd  # kd_loss, hint_loss, HintRegressor and FeatureCapture

from . import models, report
from .loss import KDLoss

__all__ = [
    "TrainConfig", "CheckpointError", "Interrupted", "EpochLog", "Cohort", "TeacherEnsemble",
    "peer_loss", "fit",
    "evaluate", "predict_logits", "save_checkpoint", "load_checkpoint", "load_model",
    "check_classes", "check_out", "run_files", "resolve_device", "run",
]

CHECKPOINT_FORMAT = "pykd-checkpoint/2"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not the one asked for."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training. `checkpoint` holds the last finished epoch, `epoch`, of `epochs`
    (None and 0 when nothing was saved)."""

    def __init__(self, checkpoint, epoch, epochs):
        super().__init__(checkpoint, epoch, epochs)
        self.checkpoint, self.epoch, self.epochs = checkpoint, epoch, epochs


def option(name):
    """The command-line option of a TrainConfig field."""
    return "--hint-layer" if name == "hint_layers" else "--" + name.replace("_", "-")


# The loss terms that need a teacher; a run without one neither uses nor records them.
DISTILLATION_FIELDS = ("temperature", "soft_weight", "hard_weight", "logit_weight", "hint_weight",
                       "hint_layers", "teacher_weights")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False
    progress: bool = True  # tqdm bars, shown only on rank 0 and when stderr is a terminal
    # Distillation terms: they need a teacher (nuclear_weight does not).
    temperature: float = 4.0
    soft_weight: float = 0.5
    hard_weight: float = 0.5
    logit_weight: float = 0.0
    hint_weight: float = 0.0
    # (student layer, teacher layer) names as in named_modules(), used when hint_weight > 0; the
    # default pairs the models' `features` trunks, which every registered model has.
    hint_layers: list = field(default_factory=lambda: [("features", "features")])
    # One weight per teacher of a TeacherEnsemble; None: 1/K each.
    teacher_weights: list = None
    nuclear_weight: float = 0.0

    def check(self, distilling=False):
        """Raises ValueError, naming the setting, for a value that cannot train anything."""
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option(name)} must be an integer >= 1, got {value!r}")
        for name in ("lr", "temperature", "weight_decay", "soft_weight", "hard_weight",
                     "logit_weight", "hint_weight", "nuclear_weight"):
            value = getattr(self, name)
            positive = name in ("lr", "temperature")
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0 or (positive and value == 0)):
                relation = "> 0" if positive else ">= 0"
                raise ValueError(f"{option(name)} must be a finite number {relation}, "
                                 f"got {value!r}")
        if distilling and not (self.soft_weight or self.hard_weight or self.logit_weight
                               or self.hint_weight):
            raise ValueError("--soft-weight, --hard-weight, --logit-weight and --hint-weight are "
                             "all 0: the student would learn nothing")
        if distilling and self.hint_weight:
            pairs = [tuple(p) for p in self.hint_layers]
            if not pairs or any(len(p) != 2 for p in pairs):
                raise ValueError(f"--hint-layer: expected (student, teacher) name pairs, "
                                 f"got {self.hint_layers!r}")
            for side, names in (("student", [s for s, _ in pairs]),
                                ("teacher", [t for _, t in pairs])):
                repeated = sorted({n for n in names if names.count(n) > 1})
                if repeated:
                    raise ValueError(f"--hint-layer: the {side} layer {repeated[0]!r} is named "
                                     "twice; name each layer once")
        if self.teacher_weights is not None:
            weights = self.teacher_weights
            if not isinstance(weights, (list, tuple)) or not weights or any(
                    isinstance(w, bool) or not isinstance(w, (int, float))
                    or not math.isfinite(w) or w < 0 for w in weights) or not sum(weights):
                raise ValueError("--teacher-weights must be finite numbers >= 0, not all 0, got "
                                 f"{weights!r}")

    def record(self, distilling):
        """The settings as stored with a run: without the distillation terms when there is no
        teacher, without the hint layers when there is no hint loss."""
        values = asdict(self)
        del values["progress"]
        values["hint_layers"] = [list(p) for p in self.hint_layers]
        if not distilling:
            for name in DISTILLATION_FIELDS:
                del values[name]
        else:
            if not self.hint_weight:
                del values["hint_layers"]
            if self.teacher_weights is None:  # one teacher, or K at 1/K (and older checkpoints)
                del values["teacher_weights"]
        return values


# ---------------------------------------------------------------------------------------------
# Devices and the distributed context


def resolve_device(device=None):
    """The torch.device for "cpu", "cuda" or "cuda:N" (None: cuda when available); ValueError
    naming --device for any other device or one this machine lacks."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    try:
        parsed = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {text}: expected cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return torch.device("cpu")
    if parsed.type != "cuda":
        raise ValueError(f"--device {text}: pykd trains on cpu or cuda (cuda:N), not {parsed.type}")
    if torch.version.cuda is None:
        raise ValueError(f"--device {text}: this torch ({torch.__version__}) is a CPU-only build; "
                         "install a CUDA build of torch or use --device cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {text}: no CUDA GPU is visible")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return parsed


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
    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.type == "cuda"
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo")
        return Context(dist.get_rank(), world,
                       torch.device("cuda", local_rank) if cuda else torch.device("cpu"))
    return Context(0, 1, device)


def _all_reduce(ctx, tensor):
    if ctx.world > 1:
        dist.all_reduce(tensor)
    return tensor


# ---------------------------------------------------------------------------------------------
# Checkpoints

# What every checkpoint holds, with its type; nested dicts list their own fields.
CHECKPOINT_FIELDS = {
    "format": str, "run_id": str, "complete": bool, "model": str, "epoch": int,
    "model_args": {"num_classes": int, "in_channels": int, "image_size": int},
    # spec, data_seed and train_fraction are None when fit() was not told how the data was made
    "data": {"spec": (str, type(None)), "data_seed": (int, type(None)),
             "train_fraction": (int, float, type(None)), "classes": list, "mean": list,
             "std": list},
    "teacher": (dict, list, type(None)), "config": dict, "history": list, "state_dict": dict,
    "regressors": dict, "optimizer": dict, "rng": dict,
}


def _check_fields(path, state, fields, prefix=""):
    for name, kind in fields.items():
        where = repr(prefix + name)
        if name not in state:
            raise CheckpointError(f"{path} is not a complete pykd checkpoint: it has no {where}")
        value = state[name]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise CheckpointError(f"{path}: {where} is a {type(value).__name__}, not a dict")
            _check_fields(path, value, kind, f"{prefix}{name}.")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{path}: {where} is a {type(value).__name__}, not what a "
                                  "pykd checkpoint holds there")


def save_checkpoint(path, state):
    """torch.save, atomically: a crash at any point leaves either the previous checkpoint or the
    new one, never a torn file."""
    report.write_atomically(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path):
    """A pykd checkpoint's dict, with every field checked; CheckpointError in one line for
    anything else (missing, a directory, empty, not a checkpoint, another format, incomplete)."""
    path = str(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a pykd checkpoint (not a file that torch.save "
                              f"wrote: {type(e).__name__} in torch.load)") from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), str) or not (
            state["format"].startswith("pykd-checkpoint/")):
        raise CheckpointError(f"{path} is not a pykd checkpoint")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a {state['format']} checkpoint; this pykd reads "
                              f"{CHECKPOINT_FORMAT}: train it again")
    _check_fields(path, state, CHECKPOINT_FIELDS)
    return state


def _load_weights(module, state_dict, what):
    """load_state_dict with a one-line error when the module no longer fits the weights."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    resized = [k for k in expected if k in state_dict
               and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or resized:
        problems = [f"{label} {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                    for label, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("other shapes for", resized)) if keys]
        raise CheckpointError(f"{what} do not fit the model as it is defined now "
                              f"({'; '.join(problems)}): its definition changed since the "
                              "checkpoint was saved")
    module.load_state_dict(state_dict)


def load_model(path, expect=None):
    """The model stored in a checkpoint, rebuilt by name; `expect` checks that name."""
    state = load_checkpoint(path)
    if state.get("members"):
        raise CheckpointError(f"{path} holds {len(state['members'])} students trained together "
                              "(mutual learning), not one model: use one of its students' "
                              "checkpoints (NAME-STUDENT.pt beside it)")
    if expect is not None and state["model"] != expect:
        raise CheckpointError(f"checkpoint {path} holds model {state['model']!r}, not {expect!r}")
    model = models.build_model(state["model"], **state["model_args"])
    _load_weights(model, state["state_dict"], f"the weights in {path} (model {state['model']})")
    return model, state


def check_classes(what, trained, spec, classes):
    """CheckpointError unless `trained` (a checkpoint's class names) are the data set's, in the
    same order: a model's outputs mean nothing on classes numbered differently."""
    trained, classes = list(trained), list(classes)
    if trained == classes:
        return
    if len(trained) != len(classes):
        raise CheckpointError(f"{what} was trained on {len(trained)} classes but --dataset "
                              f"{spec} has {len(classes)}")
    i = next(i for i, (a, b) in enumerate(zip(trained, classes)) if a != b)
    raise CheckpointError(f"{what} was trained on other classes than --dataset {spec} has: "
                          f"class {i} is {trained[i]!r} there but {classes[i]!r} here")


def _rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _settings(meta, config):
    """What a resumed run must share with the run it continues, by command-line option."""
    data = meta.get("data") or {}
    teacher = meta.get("teacher")
    return {
        "model": meta.get("model"),
        "--dataset": data.get("spec"),
        "--data-seed": data.get("data_seed"),
        "--train-fraction": data.get("train_fraction"),
        "class names": data.get("classes"),
        "data set contents (its normalisation statistics)": [data.get("mean"), data.get("std")],
        "model arguments": meta.get("model_args"),
        "--teacher": teacher and "; ".join(
            f"{t['path']} (run {t['run_id']}, {t['epoch']} epochs)"
            for t in (teacher if isinstance(teacher, list) else [teacher])),
        "--teacher-cache": isinstance(teacher, dict) and teacher.get("cache") and (
            f"{teacher['cache']['path']} (cache {teacher['cache']['id']})") or None,
        # runs whose outputs made the labels (the students a selector learns to choose from)
        "--students": meta.get("students"),
        **{option(k): v for k, v in config.items() if k != "epochs"},
    }


def _check_resume(path, state, meta, config, distilling):
    """CheckpointError naming the first setting that differs from the checkpoint's."""
    old = _settings(state, state["config"])
    new = _settings(meta or {}, config.record(distilling))
    for key in dict.fromkeys([*old, *new]):
        was, now = old.get(key), new.get(key)
        if was != now:
            if was is None:
                change = f"without {key}, not with {key} {_show(now)}"
            elif now is None:
                change = f"with {key} {_show(was)}, which this run does not give"
            else:
                change = f"with {key} {_show(was)}, not {_show(now)}"
            raise CheckpointError(
                f"cannot resume {path}: it was started {change}; resume with the same settings "
                "(only --epochs may grow) or pass --overwrite to start again")
    if state["epoch"] > config.epochs:
        raise CheckpointError(f"cannot resume {path} with --epochs {config.epochs}: it has "
                              f"already trained {state['epoch']} epochs (pass --epochs "
                              f"{state['epoch']} or more, or --overwrite to start again)")


def _show(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list) and all(isinstance(v, list) and len(v) == 2 for v in value):
        return " ".join(f"{a}:{b}" for a, b in value)  # hint layers
    return str(value)


# ---------------------------------------------------------------------------------------------
# The student with its hint regressors


def first_layer_weight(model):
    """The weight of the model's first convolution or linear layer (in definition order)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return module.weight
    raise ValueError("--nuclear-weight: the student has no Conv or Linear layer to penalise")


def _check_layers(side, model, names):
    """ValueError naming --hint-layer unless every name is a submodule of `model`."""
    known = [n for n, _ in model.named_modules() if n]
    for name in names:
        if name not in known:
            listed = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
            raise ValueError(f"--hint-layer: the {side} ({type(model).__name__}) has no layer "
                             f"{name!r}; its layers are {listed}")


def _captured(side, capture, name):
    features = capture.features
    if name not in features:
        raise ValueError(f"--hint-layer: the {side}'s layer {name!r} did not run in a forward "
                         "pass")
    value = features[name]
    if not isinstance(value, torch.Tensor) or value.dim() not in (2, 4):
        kind = f"a {value.dim()}-d tensor" if isinstance(value, torch.Tensor) else \
            type(value).__name__
        raise ValueError(f"--hint-layer: the {side}'s layer {name!r} gives {kind}; hints need "
                         "[B, C] or [B, C, H, W] features")
    return value


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
        _check_layers("student", model, self.hint_layers)
        self.capture = pykd.FeatureCapture(model, self.hint_layers)
        was_training = model.training
        with torch.no_grad():
            model.eval()(example)  # eval: a shape probe must not move BatchNorm statistics
        model.train(was_training)
        for name, shape in zip(self.hint_layers, teacher_shapes):
            student_shape = _captured("student", self.capture, name).shape
            if len(student_shape) != len(shape):
                raise ValueError(
                    f"--hint-layer: the student's {name} gives {tuple(student_shape)} but the "
                    f"teacher's layer gives {tuple(shape)}; pair layers of the same kind")
            kind = "conv" if len(shape) == 4 else "linear"
            self.regressors.append(pykd.HintRegressor(student_shape[1], shape[1], kind=kind))
            self.teacher_sizes.append(tuple(shape[2:]) if kind == "conv" else None)

    def forward(self, x):
        logits = self.model(x)
        hints = [regressor(self.capture.features[name], size=size)
                 for name, regressor, size
                 in zip(self.hint_layers, self.regressors, self.teacher_sizes)]
        return logits, hints


class Cohort(nn.Module):
    """Students trained together by mutual learning, as one module (one optimizer, one
    DistributedDataParallel): its forward gives their logits stacked, [K, B, C]."""

    def __init__(self, members):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a cohort needs at least 2 students, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x):
        return torch.stack([member(x) for member in self.members])


def towards_peers(kd, student, peers, labels):
    """The pykd.KDLoss `kd` of `student` [B, C] towards each of `peers` [K-1, B, C], averaged:
    hard_weight * CE + soft_weight * the mean over peers of T^2 * KL(p_peer || p_student). The one
    place a fused multi-teacher loss (weights 1/(K-1)) can take over."""
    return sum(kd(student, peer, labels) for peer in peers) / len(peers)


def peer_loss(kd, logits, labels):
    """Deep mutual learning's losses of students whose logits are stacked [K, B, C]: each
    student's :func:`towards_peers` the other students' detached logits. Returns the [K] losses;
    one backward of their sum updates each student by its own loss, the peers being detached."""
    detached = logits.detach()
    return torch.stack([towards_peers(kd, logits[k], torch.cat([detached[:k], detached[k + 1:]]),
                                      labels) for k in range(len(logits))])


class TeacherEnsemble(nn.Module):
    """Several teachers of the same classes as one module: its forward gives their logits
    stacked, [K, B, C]. The inputs come normalised with (mean, std) per channel; teacher k sees
    them renormalised with its own training statistics ``stats[k]`` (mean, std), the inputs it
    was trained on."""

    def __init__(self, teachers, mean, std, stats):
        super().__init__()
        if len(teachers) < 2 or len(stats) != len(teachers):
            raise ValueError(f"an ensemble needs at least 2 teachers with their statistics, got "
                             f"{len(teachers)} and {len(stats)}")
        self.teachers = nn.ModuleList(teachers)
        mean, std = torch.tensor(mean), torch.tensor(std)
        # teacher k's input (x - mean_k) / std_k = inputs * std / std_k + (mean - mean_k) / std_k
        self.register_buffer("scales", torch.stack(
            [std / torch.tensor(s) for _, s in stats]).view(len(stats), 1, -1, 1, 1))
        self.register_buffer("shifts", torch.stack(
            [(mean - torch.tensor(m)) / torch.tensor(s) for m, s in stats]
        ).view(len(stats), 1, -1, 1, 1))

    def forward(self, x):
        return torch.stack([teacher(x * scale + shift) for teacher, scale, shift
                            in zip(self.teachers, self.scales, self.shifts)])


# ---------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def predict_logits(model, x, device, batch_size=256, bf16=False):
    """`model`'s logits (float32, on the CPU) for every example of x, in eval mode."""
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(x), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs.append(model(x[start:start + batch_size].to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0)


@torch.no_grad()
def evaluate(model, x, y, num_classes, ctx=None, batch_size=256, bf16=False):
    """Accuracy and macro precision/recall/F1 of `model` on (x, y). Under torchrun each rank
    takes every world-th example and the confusion matrices are summed, so every example counts
    exactly once. A :class:`Cohort` gives a list, one entry per student."""
    if isinstance(model, Cohort):
        return [evaluate(m, x, y, num_classes, ctx, batch_size, bf16) for m in model.members]
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


def format_epoch(record, epochs):
    """The line printed for a finished epoch (a cohort's values student by student, a/b/...)."""
    def show(key):
        value = record[key]
        return "/".join(f"{v:.4f}" for v in value) if isinstance(value, list) else f"{value:.4f}"

    losses = f"cross-entropy {show('train_cross_entropy')}"
    if "train_kd" in record:
        losses += f", KD {show('train_kd')}"
    return (f"epoch {record['epoch']}/{epochs}: loss {show('train_loss')} ({losses}), "
            f"train accuracy {show('train_accuracy')}, "
            f"val accuracy {show('val_accuracy')}, {record['seconds']:.1f} s")


class EpochLog:
    """Reports a run as it goes (on rank 0): a line per epoch and notes on `stream` (stderr),
    each epoch's record appended to the JSON-lines file `jsonl`, and TensorBoard scalars in
    `tensorboard_dir` when given (torch.utils.tensorboard, which needs the tensorboard
    package)."""

    def __init__(self, name, jsonl=None, tensorboard_dir=None, stream=None):
        self.name, self.jsonl, self.stream = name, jsonl, stream or sys.stderr
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: "
                                 "pip install tensorboard") from None
            self.writer = SummaryWriter(tensorboard_dir)

    def message(self, text):
        print(f"{self.name}: {text}", file=self.stream, flush=True)

    def epoch(self, record, epochs, run_id):
        self.message(format_epoch(record, epochs))
        if self.jsonl is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.jsonl)), exist_ok=True)
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"run_id": run_id, **record}) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key == "epoch":
                    continue
                if isinstance(value, list):  # a cohort's: one curve per student
                    for k, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/{k}", v, record["epoch"])
                else:
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _meta(model, splits, meta):
    """`meta` with what the splits tell filled in, so that every checkpoint has its fields."""
    x = splits.train_x
    defaults = {
        "model": type(model).__name__,
        "model_args": {"num_classes": splits.num_classes, "in_channels": x.shape[1],
                       "image_size": x.shape[-1]},
        "data": data_meta(None, None, None, splits),
        "teacher": None,
    }
    return {**defaults, **(meta or {})}


def fit(model, splits, config, *, teacher=None, checkpoint=None, meta=None, resume_from=None,
        on_epoch_end=None, device=None, log=None, teacher_cache=None):
    """Trains `model` (any nn.Module giving [B, C] logits) on `splits` (pykd.data.Splits).

    With `teacher` (a model, or a :class:`TeacherEnsemble`), distils it into `model` with the
    losses of `config`; with `teacher_cache` (a pykd.TeacherCache of the training split, checked
    against it) distils its stored top-k logits instead (the KD and hard-label terms only: no
    logit or hint term). A :class:`Cohort`
    trains its students by mutual learning (:func:`peer_loss`, with config's temperature and
    weights); its history, "val" and "test" then hold a list per value, one entry per student.
    With `checkpoint` (a path), saves the resumable state after every epoch; `meta` is stored
    with it (model name, data description, teacher). `resume_from` (a checkpoint path) continues that run from its
    last epoch, after checking that it was started with the same settings (only
    `config.epochs` may grow). `log` (an :class:`EpochLog`) hears of every epoch and of the
    resume; `on_epoch_end(record)` is called after each epoch's checkpoint. Ctrl-C raises
    :class:`Interrupted`, which says where the last finished epoch is.

    Returns {"history", "val", "test", "state"}: "state" is the checkpoint dict of the end.
    """
    if teacher is not None and teacher_cache is not None:
        raise ValueError("distil from a teacher or from a teacher cache, not both")
    if teacher_cache is not None and (config.logit_weight or config.hint_weight):
        raise ValueError("--logit-weight and --hint-weight need the teacher's full logits and "
                         "features, which a teacher cache does not hold: distil from --teacher")
    distilling = teacher is not None or teacher_cache is not None
    peers = isinstance(model, Cohort)
    if peers and (distilling or config.logit_weight or config.hint_weight
                  or config.nuclear_weight):
        raise ValueError("mutual learning (a Cohort) trains on the KD loss towards the peers and "
                         "cross-entropy only: no teacher, logit, hint or nuclear-norm term")
    ensemble = isinstance(teacher, TeacherEnsemble)
    if ensemble and (config.logit_weight or config.hint_weight):
        raise ValueError("several teachers are distilled by the KD and cross-entropy terms only: "
                         "--logit-weight and --hint-weight need a single --teacher")
    weights = config.teacher_weights
    if weights is not None and (not ensemble or len(weights) != len(teacher.teachers)):
        raise ValueError(f"--teacher-weights: {len(weights)} weight(s) for "
                         f"{len(teacher.teachers) if ensemble else 1} teacher(s); give one weight "
                         "per --teacher, and only with several")
    with_kd = distilling or peers  # the run uses (and records) the KD loss's settings
    config.check(with_kd)
    ctx = context(device)
    if config.batch_size % ctx.world:
        raise ValueError(f"--batch-size {config.batch_size} is the global batch: it must be a "
                         f"multiple of the {ctx.world} processes")
    meta = _meta(model, splits, meta)
    if teacher_cache is not None:
        from .teacher_cache import distillation_loss as teacher_cache_loss  # needs numpy

        teacher_cache.check(splits, config.temperature, meta["data"])
    hint_layers = [tuple(p) for p in config.hint_layers] if distilling and config.hint_weight \
        else []
    model.to(ctx.device)

    teacher_capture = None
    teacher_shapes = []
    example = splits.train_x[:2].to(ctx.device)
    if teacher is not None:
        teacher.to(ctx.device).eval().requires_grad_(False)
        if hint_layers:
            _check_layers("student", model, [s for s, _ in hint_layers])
            _check_layers("teacher", teacher, [t for _, t in hint_layers])
            teacher_capture = pykd.FeatureCapture(teacher, [t for _, t in hint_layers])
            with torch.no_grad():
                teacher(example)
            teacher_shapes = [tuple(_captured("teacher", teacher_capture, t).shape)
                              for _, t in hint_layers]
    student = Student(model, hint_layers, teacher_shapes, example).to(ctx.device)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr,
                                 weight_decay=config.weight_decay)
    # Every argument explicit: a change of KDLoss's defaults must not change what runs train.
    kd = KDLoss(temperature=config.temperature, soft_weight=config.soft_weight,
                hard_weight=config.hard_weight, ignore_index=-100, beta=0.0,
                reduction="batchmean")

    history, start_epoch = [], 0
    run_id = meta.get("run_id") or uuid.uuid4().hex
    saved = (None, 0)  # the checkpoint that holds the last finished epoch
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _check_resume(resume_from, state, meta, config, with_kd)
        _load_weights(model, state["state_dict"], f"the weights in {resume_from}")
        _load_weights(student.regressors, state["regressors"],
                      f"the hint regressors in {resume_from}")
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start_epoch, history, run_id = state["epoch"], state["history"], state["run_id"]
        saved = (resume_from, start_epoch)
        if log is not None:
            log.message(f"resuming from epoch {start_epoch} of {config.epochs} ({resume_from})")

    trainable = student
    if ctx.world > 1:
        trainable = nn.parallel.DistributedDataParallel(
            student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    # Each batch brings its images' indices in the split: the rows of a teacher cache.
    dataset = TensorDataset(splits.train_x, splits.train_y, torch.arange(len(splits.train_y)))
    # The sampler's order depends only on (seed, epoch): the same after a resume, and sharded.
    sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                 seed=config.seed)
    loader = DataLoader(dataset, batch_size=config.batch_size // ctx.world, sampler=sampler)
    show = config.progress and ctx.is_main and sys.stderr.isatty()
    members = len(model.members) if peers else 1

    def _one(values):  # a student's value, or a cohort's list of them
        return values if peers else values[0]

    first_weight = first_layer_weight(model) if config.nuclear_weight else None

    def snapshot(epoch, complete=False):
        return {
            "format": CHECKPOINT_FORMAT, **meta, "run_id": run_id, "complete": complete,
            "state_dict": model.state_dict(), "regressors": student.regressors.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "rng": _rng_state(),
            "config": config.record(with_kd), "history": history,
        }

    try:
        for epoch in range(start_epoch, config.epochs):
            sampler.set_epoch(epoch)
            student.train()
            started = time.perf_counter()
            # per student (one, or a cohort's K): loss, cross-entropy, KD term, correct; count
            sums = torch.zeros(4 * members + 1, dtype=torch.float64, device=ctx.device)
            batches = _progress(loader, show, f"{meta['model']} epoch {epoch + 1}/{config.epochs}")
            for inputs, labels, rows in batches:
                inputs, labels = inputs.to(ctx.device), labels.to(ctx.device)
                kd_term = torch.zeros(members, device=ctx.device)
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                    logits, hints = trainable(inputs)
                    losses = None  # each student's, for a cohort
                    if peers:
                        losses = peer_loss(kd, logits, labels)
                        loss = losses.sum()
                        with torch.no_grad():  # for the record only
                            kd_term = peer_loss(
                                lambda s, t, _: pykd.kd_loss(s.float(), t.float(),
                                                             config.temperature),
                                logits.detach(), labels)
                    elif teacher_cache is not None:
                        loss, kd_term = teacher_cache_loss(teacher_cache, logits, labels, rows,
                                                           config)
                    elif ensemble:
                        with torch.no_grad():
                            teacher_logits = teacher(inputs)
                        loss = (config.hard_weight * F.cross_entropy(logits, labels)
                                if config.hard_weight else 0)
                        if config.soft_weight:
                            loss = loss + config.soft_weight * pykd.multi_teacher_kd_loss(
                                logits, teacher_logits, weights, config.temperature)
                        with torch.no_grad():  # for the record only
                            kd_term = pykd.multi_teacher_kd_loss(
                                logits.detach().float(), teacher_logits.float(), weights,
                                config.temperature)
                    elif distilling:
                        with torch.no_grad():
                            teacher_logits = teacher(inputs)
                            teacher_features = [teacher_capture.features[t] for _, t in hint_layers]
                        loss = kd(logits, teacher_logits, labels)
                        with torch.no_grad():  # for the record only
                            kd_term = pykd.kd_loss(logits.detach().float(),
                                                   teacher_logits.float(), config.temperature)
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
                with torch.no_grad():
                    each = (logits if peers else logits.unsqueeze(0)).detach().float()
                    cross_entropy = torch.stack([F.cross_entropy(s, labels) for s in each])
                    correct = (each.argmax(-1) == labels).sum(-1)
                    per_student = (losses if peers else loss.view(1)).detach()
                sums += torch.cat([per_student.double() * n, cross_entropy.double() * n,
                                   kd_term.double().view(-1) * n, correct.double(),
                                   torch.tensor([n], dtype=torch.float64, device=ctx.device)])
                if show:
                    batches.set_postfix(loss=f"{loss.item():.4f}")
            totals = _all_reduce(ctx, sums).tolist()
            count = totals[-1]
            loss_sum, ce_sum, kd_sum, correct = (
                [t / count for t in totals[i * members:(i + 1) * members]] for i in range(4))
            if not all(map(math.isfinite, loss_sum)):
                raise ValueError(
                    f"the training loss became {_one(loss_sum)} in epoch {epoch + 1}: the run "
                    f"diverged (a smaller --lr may help); "
                    + (f"{saved[0]} holds epoch {saved[1]}" if saved[0] else "nothing was saved"))
            val = evaluate(model, splits.val_x, splits.val_y, splits.num_classes, ctx,
                           bf16=config.bf16)
            vals = val if peers else [val]
            record = {
                "epoch": epoch + 1,
                "train_loss": _one(loss_sum),
                "train_cross_entropy": _one(ce_sum),
                **({"train_kd": _one(kd_sum)} if with_kd else {}),
                "train_accuracy": _one(correct),
                "train_examples": int(count),  # over all ranks (the sampler pads to a multiple)
                "val_accuracy": _one([v["accuracy"] for v in vals]),
                "val_f1": _one([v["f1"] for v in vals]),
                "seconds": time.perf_counter() - started,
            }
            history.append(record)
            if checkpoint and ctx.is_main:
                save_checkpoint(checkpoint, snapshot(epoch + 1))
                saved = (checkpoint, epoch + 1)
            if log is not None:
                log.epoch(record, config.epochs, run_id)
            if on_epoch_end is not None:
                on_epoch_end(record)
    except KeyboardInterrupt:
        raise Interrupted(*saved, config.epochs) from None
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
        "state": snapshot(len(history) and history[-1]["epoch"], complete=True),
    }


def data_meta(spec, data_seed, train_fraction, splits):
    """What a checkpoint records about its data, enough to rebuild the same splits and inputs."""
    return {"spec": spec, "data_seed": data_seed, "train_fraction": train_fraction,
            "classes": list(splits.classes), "mean": list(splits.mean), "std": list(splits.std)}


# ---------------------------------------------------------------------------------------------
# Runs: the files of a named run in an output directory


def run_files(out_dir, name):
    """The files of run `name` in `out_dir`: the finished run's checkpoint and metrics, the
    resumable state of an unfinished one, and the per-epoch log."""
    base = os.path.join(str(out_dir), name)
    return {"checkpoint": f"{base}.pt", "metrics": f"{base}.json",
            "partial": f"{base}.partial.pt", "epochs": f"{base}.epochs.jsonl"}


def check_out(out_dir, name, resume=False, overwrite=False):
    """Refuses (CheckpointError) to start run `name` where an earlier one left files, unless
    `resume` (continue it) or `overwrite` (replace it, once the new run has finished) says what
    to do with them. Returns the checkpoint to resume from, or None."""
    files = run_files(out_dir, name)
    if resume and overwrite:
        raise CheckpointError("--resume and --overwrite contradict each other: pass one")
    if overwrite:
        return None
    partial, finished, metrics = (files[k] if os.path.exists(files[k]) else None
                                  for k in ("partial", "checkpoint", "metrics"))
    if resume:
        if partial or finished:
            return partial or finished
        if metrics:
            raise CheckpointError(f"{metrics} holds the results of an earlier run, but its "
                                  f"checkpoint {files['checkpoint']} is gone, so it cannot be "
                                  "resumed: pass --overwrite to replace it")
        return None
    if partial or finished or metrics:
        what = (f"{partial} holds a stopped run" if partial
                else f"{finished} holds a finished run" if finished
                else f"{metrics} holds the results of an earlier run")
        raise CheckpointError(f"{what}: pass --resume to continue it or --overwrite to replace "
                              "it (or choose another --out or --name)")
    return None


def load_teacher(path, spec, classes):
    """The model of a finished run, checked against the data set's classes; how a student's
    checkpoint records it; and the run's data record (its normalisation statistics)."""
    teacher, state = load_model(path)
    if not state["complete"]:
        raise CheckpointError(f"--teacher {path} is a stopped run ({state['epoch']} of "
                              f"{state['config'].get('epochs')} epochs): finish it with "
                              "--resume first")
    check_classes(f"--teacher {path}", state["data"]["classes"], spec, classes)
    record = {"path": os.path.abspath(path), "run_id": state["run_id"], "epoch": state["epoch"],
              "model": state["model"]}
    return teacher, record, state["data"]


def member_files(out_dir, name, members):
    """The files of each student of cohort run `name`: `name-STUDENT.pt` and `.json`."""
    return [run_files(out_dir, f"{name}-{member}") for member in members]


def _member_run(name, metrics, state, k, cost):
    """Student k of a finished cohort run as the checkpoint and metrics of a run of its own
    (its weights, its history, its results; no optimizer state: the cohort's run resumes)."""
    member = state["members"][k]
    prefix = f"members.{k}."

    def own(value):
        return value[k] if isinstance(value, list) else value

    history = [{key: own(v) for key, v in record.items()} for record in state["history"]]
    cohort = {"name": name, "members": state["members"], "checkpoint": metrics["checkpoint"]}
    member_state = {
        **{key: v for key, v in state.items() if key not in ("members", "results")},
        "model": member, "history": history, "optimizer": {}, "regressors": {}, "cohort": cohort,
        "state_dict": {key[len(prefix):]: v for key, v in state["state_dict"].items()
                       if key.startswith(prefix)},
    }
    member_metrics = {**{key: v for key, v in metrics.items()
                         if key not in ("members", "member_runs", "cost")},
                      "name": f"{name}-{member}", "model": member, "history": history,
                      "val": metrics["val"][k], "test": metrics["test"][k], "cost": cost,
                      "cohort": cohort}
    member_state["results"] = {key: member_metrics[key] for key in ("val", "test", "cost")}
    return member_state, member_metrics


def run(model_name, splits, data, config, out_dir, name, *, teacher_path=None, resume=False,
        overwrite=False, device=None, tensorboard=False, on_epoch_end=None, meta=None,
        teacher_cache=None):
    """Builds `model_name` (seeded), trains or distils it, and writes `out_dir/name.pt` and
    `out_dir/name.json` (history, val/test metrics, cost) together once everything has
    succeeded. Returns the metrics dict.

    A list of model names trains them together by mutual learning (a :class:`Cohort`, each
    student initialised as a run of its own with the same seed would be); besides the cohort's
    files, each student's checkpoint and metrics go to `name-STUDENT.pt` and `.json`, all written
    together, and the returned metrics hold theirs under "member_runs". `meta` adds fields to the
    run's record that a resume must find unchanged ("students": the runs whose outputs made a
    selector's labels).
    Under torchrun every rank returns once rank 0 has written the files.

    `data` is :func:`data_meta` of `splits`; `teacher_path` a checkpoint to distil from, or a
    list of several (a :class:`TeacherEnsemble`, each teacher fed the inputs renormalised with
    its own training statistics; the run records the list), or `teacher_cache` a
    pykd.TeacherCache of a teacher's outputs (the teacher model is then not loaded). An
    existing run of that name is continued only with `resume` and replaced only with
    `overwrite` (see :func:`check_out`). While it trains, the state after each epoch is kept
    in `name.partial.pt`, each epoch's record appended to `name.epochs.jsonl` and a line per
    epoch printed on stderr; `tensorboard` also logs to `out_dir/tensorboard/name`.
    """
    files = run_files(out_dir, name)
    source = check_out(out_dir, name, resume, overwrite)
    teacher_paths = [teacher_path] if isinstance(teacher_path, (str, os.PathLike)) \
        else list(teacher_path or [])
    for path in teacher_paths:
        if any(os.path.exists(f) and os.path.samefile(path, f)
               for f in (files["checkpoint"], files["partial"])):
            raise CheckpointError(f"run {name!r} in {out_dir} would write over its own "
                                  f"--teacher {path}: choose another --name or --out")
    ctx = context(device)
    teachers = [load_teacher(path, data["spec"], splits.classes) for path in teacher_paths]
    teacher, teacher_record = teachers[0][:2] if teachers else (None, None)
    if len(teachers) > 1:
        teacher = TeacherEnsemble([t for t, _, _ in teachers], data["mean"], data["std"],
                                  [(d["mean"], d["std"]) for _, _, d in teachers])
        teacher_record = [record for _, record, _ in teachers]
    if teacher_cache is not None:
        teacher_record = teacher_cache.record()
    model_args = {"num_classes": splits.num_classes, "in_channels": splits.train_x.shape[1],
                  "image_size": splits.train_x.shape[-1]}
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    built = []
    for member in names:
        torch.manual_seed(config.seed)
        built.append(models.build_model(member, **model_args))
    cohort = not isinstance(model_name, str)
    model = Cohort(built) if cohort else built[0]
    meta = {**(meta or {}), "model": "+".join(names), "model_args": model_args, "data": data,
            "teacher": teacher_record, **({"members": names} if cohort else {})}
    log = None
    if ctx.is_main:
        tensorboard_dir = os.path.join(str(out_dir), "tensorboard", name) if tensorboard else None
        log = EpochLog(name, files["epochs"], tensorboard_dir)
        if resume and source is None:
            log.message(f"nothing to resume in {out_dir}: starting a new run")
    try:
        result = fit(model, splits, config, teacher=teacher, checkpoint=files["partial"],
                     meta=meta, resume_from=source, on_epoch_end=on_epoch_end, device=device,
                     log=log, teacher_cache=teacher_cache)
    finally:
        if log is not None:
            log.close()
    state = result.pop("state")
    metrics = {"name": name, **meta, "run_id": state["run_id"], "config": state["config"],
               **result}
    if ctx.is_main:
        example = torch.zeros(2, model_args["in_channels"], model_args["image_size"],
                              model_args["image_size"], device=ctx.device)
        metrics["cost"] = report.model_cost(model, example)
        metrics["checkpoint"] = os.path.abspath(files["checkpoint"])
        state["results"] = {key: metrics[key] for key in ("val", "test", "cost")}
        writes = [(files["checkpoint"], _saver(state), True),
                  (files["metrics"], report.json_writer(metrics), False)]
        if cohort:
            metrics["member_runs"] = []
            for k, paths in enumerate(member_files(out_dir, name, names)):
                member_state, member_metrics = _member_run(
                    name, metrics, state, k, report.model_cost(model.members[k], example))
                member_metrics["checkpoint"] = os.path.abspath(paths["checkpoint"])
                metrics["member_runs"].append(member_metrics)
                writes += [(paths["checkpoint"], _saver(member_state), True),
                           (paths["metrics"], report.json_writer(member_metrics), False)]
        report.write_files(writes)
        if os.path.exists(files["partial"]):
            os.remove(files["partial"])
    if ctx.world > 1:
        dist.barrier()  # the files exist for every rank once run() returns
    return metrics


def _saver(state):
    return lambda f: torch.save(state, f)


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
