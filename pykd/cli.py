"""The `pykd` command line (also `python -m pykd`); run `pykd COMMAND --help` for each command.

A command is a function `cmd_NAME(args)` plus `NAME_arguments(parser)`, listed in COMMANDS.
Errors in arguments or data end with one line on stderr and exit status 2 (set PYKD_TRACEBACK=1
to see the traceback instead). Nothing is overwritten unless --overwrite (or --resume, for the
run it continues) says so; an option the command would not use is an error, not ignored.
"""
import argparse
import importlib.util
import math
import os
import re
import shlex
import statistics
import sys
import time

DEFAULT_OUT = "runs"


class UsageError(ValueError):
    """A problem with the command's arguments, reported as one line."""


class _Given:
    """Mixin for argparse actions: notes in `namespace._given` each option the user gave."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.__dict__.setdefault("_given", set()).add(self.dest)


class Parser(argparse.ArgumentParser):
    """Errors in one line; no abbreviated options (``--seed`` never means ``--seeds``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        for name, action in ((None, argparse._StoreAction), ("store", argparse._StoreAction),
                             ("store_true", argparse._StoreTrueAction),
                             ("append", argparse._AppendAction)):
            self.register("action", name, type(action.__name__, (_Given, action), {}))

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _given(args, *names):
    """The options among `names` (destinations) that the command line gave."""
    return [n for n in names if n in getattr(args, "_given", ())]


def _flag(name):
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------------------------
# Argument types and groups


def _number(kind, low=None, low_open=False, high=None):
    """A parser of finite numbers (int or float) in [low, high] (low excluded if low_open)."""
    if low is not None and high is not None:
        relation = f"in {'(' if low_open else '['}{low}, {high}]"
    elif low is not None:
        relation = f"{'>' if low_open else '>='} {low}"
    else:
        relation = ""
    what = "an integer" if kind is int else "a finite number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or (
                low is not None and (value < low or (low_open and value == low))) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what} {relation}, got {text}".rstrip())
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 1)
seed_type = _number(int, 0, high=2 ** 32 - 1)
positive_float = _number(float, 0, low_open=True)
weight = _number(float, 0)
unit_weight = _number(float, 0, high=1)
fraction = _number(float, 0, low_open=True, high=1)


def _list(parse_one, what, unique=True):
    """A parser of comma-separated values, each parsed by `parse_one` (none repeated if
    `unique`)."""

    def parse(text):
        items = [t.strip() for t in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        values = []
        for item in items:
            try:
                values.append(parse_one(item))
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{item}: {e}") from None
        if unique and len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
        return values

    return parse


seed_list = _list(seed_type, "seeds")
model_list = _list(str, "model names")
temperature_list = _list(positive_float, "temperatures")
weight_list = _list(unit_weight, "weights")
teacher_weight_list = _list(weight, "weights", unique=False)


def layer_pair(text):
    student, sep, teacher = text.partition(":")
    if not sep or not student or not teacher:
        raise argparse.ArgumentTypeError(f"expected STUDENT_LAYER:TEACHER_LAYER, got {text!r}")
    return student, teacher


def data_arguments(p, inherit=None):
    """--dataset, --data-seed, --train-fraction; `inherit` names whose values they default to
    ("the teacher's"), or None for digits and seed 0."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None if inherit else "digits", metavar="SPEC",
                   help="digits (scikit-learn's), cifar10:PATH (python batches) or folder:PATH "
                   "(a subfolder of images per class) (default: "
                   + (f"{inherit})" if inherit else "%(default)s)"))
    g.add_argument("--data-seed", type=seed_type, default=None if inherit else 0, metavar="S",
                   help="seed of the train/val/test split (default: "
                   + (f"{inherit})" if inherit else "%(default)s)"))
    g.add_argument("--train-fraction", type=fraction, default=1.0, metavar="F",
                   help="train on this stratified fraction of the training split "
                   "(default: %(default)s)")


def device_arguments(p):
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast (meant for GPUs: on the CPU it is slower)")
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def run_arguments(p, epochs=10, batch_size=64, seed=0):
    """The training and output options; `seed` None: --seed S is short for --seeds S."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=epochs, metavar="N",
                   help="(default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N",
                   help="global batch, split across torchrun ranks (default: %(default)s)")
    g.add_argument("--lr", type=positive_float, default=1e-3, metavar="LR",
                   help="Adam learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=weight, default=0.0, metavar="WD",
                   help="(default: %(default)s)")
    g.add_argument("--seed", type=seed_type, default=seed, metavar="S",
                   help="the same as --seeds SEED" if seed is None
                   else "seed of initialisation and order (default: %(default)s)")
    device_arguments(g)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="where checkpoints (*.pt), metrics (*.json) and per-epoch logs "
                   "(*.epochs.jsonl) go (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are shown only on a terminal; the line per "
                   "epoch on stderr stays)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also log each epoch to DIR/tensorboard/ (needs tensorboard)")
    exclusive = g.add_mutually_exclusive_group()
    exclusive.add_argument("--resume", action="store_true",
                           help="continue the runs already in --out (with the same settings; "
                           "--epochs may grow)")
    exclusive.add_argument("--overwrite", action="store_true",
                           help="replace the runs already in --out (once the new ones finish)")


def loss_arguments(p, sweep=False, extras=True):
    """The loss options; `sweep` leaves out the swept ones, `extras` False keeps only the KD
    loss's (temperature, soft and hard weights)."""
    g = p.add_argument_group("distillation loss")
    if not sweep:
        g.add_argument("--temperature", type=positive_float, default=4.0, metavar="T",
                       help="T (default: %(default)s)")
        g.add_argument("--soft-weight", type=weight, default=0.5, metavar="W",
                       help="weight of T^2 * KL (default: %(default)s)")
        g.add_argument("--hard-weight", type=weight, default=0.5, metavar="W",
                       help="weight of the cross-entropy with the labels (default: %(default)s)")
    if not extras:
        return
    g.add_argument("--logit-weight", type=weight, default=0.0, metavar="W",
                   help="weight of the squared logit difference (default: %(default)s)")
    g.add_argument("--hint-weight", type=weight, default=0.0, metavar="W",
                   help="weight of the FitNets feature-hint loss (default: %(default)s)")
    g.add_argument("--hint-layer", type=layer_pair, action="append", dest="hint_layers",
                   metavar="STUDENT:TEACHER",
                   help="a pair of layer names for hints, repeatable; needs --hint-weight "
                   "(default: features:features)")
    g.add_argument("--nuclear-weight", type=weight, default=0.0, metavar="W",
                   help="weight of the nuclear norm of the student's first layer "
                   "(default: %(default)s)")


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _device(args):
    """The device of --device, checked now; a warning for --bf16 on the CPU."""
    from .train import resolve_device

    device = resolve_device(args.device)
    if args.bf16 and device.type == "cpu":
        print(f"pykd {args.command}: warning: --bf16 on the CPU is emulated and usually several "
              "times slower than float32; it is meant for GPUs", file=sys.stderr, flush=True)
    return device


def _config(args, distilling, **overrides):
    """The TrainConfig of the options, checked; an option that would do nothing is an error."""
    from .train import TrainConfig

    if _given(args, "hint_layers") and not args.hint_weight:
        raise UsageError("--hint-layer needs --hint-weight above 0: without it no hint loss is "
                         "computed")
    if _given(args, "temperature") and not args.soft_weight:
        raise UsageError("--temperature only scales the soft (KD) term, which --soft-weight 0 "
                         "turns off")
    values = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "seed": args.seed, "bf16": args.bf16,
        "progress": not args.no_progress, "nuclear_weight": getattr(args, "nuclear_weight", 0.0),
    }
    if distilling:
        for name in ("temperature", "soft_weight", "hard_weight", "logit_weight", "hint_weight"):
            if hasattr(args, name):
                values[name] = getattr(args, name)
        if getattr(args, "hint_layers", None):
            values["hint_layers"] = args.hint_layers
    values.update(overrides)
    config = TrainConfig(**values)
    config.check(distilling)
    return config


def _run_options(args):
    return {"resume": args.resume, "overwrite": args.overwrite, "device": args.device,
            "tensorboard": args.tensorboard}


def _claim(args, names, files=()):
    """Before any work: every run in `names` and every file in `files` may be written to --out
    (see train.check_out); refuses otherwise."""
    from .train import check_out

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file, not a directory")
    for name in names:
        check_out(args.out, name, args.resume, args.overwrite)
    for path in files:
        path = os.path.join(args.out, path)
        if os.path.exists(path) and not (args.resume or args.overwrite):
            raise UsageError(f"{path} holds an earlier result: pass --resume to continue those "
                             "runs or --overwrite to replace them (or choose another --out)")


def _load_data(spec, data_seed, train_fraction, mean=None, std=None):
    from .data import load_dataset
    from .train import data_meta

    splits = load_dataset(spec, data_seed=data_seed, train_fraction=train_fraction, mean=mean,
                          std=std)
    return splits, data_meta(spec, data_seed, train_fraction, splits)


def _teacher_data(args, teacher):
    """The splits for distilling from the checkpoint `teacher`: its data set and split seed
    unless --dataset or --data-seed say otherwise, always normalised with the teacher's
    statistics so that it sees the inputs it was trained on."""
    from .train import load_checkpoint

    data = load_checkpoint(teacher)["data"]
    spec = args.dataset or data["spec"]
    data_seed = data["data_seed"] if args.data_seed is None else args.data_seed
    if spec is None or data_seed is None:
        raise UsageError(f"--teacher {teacher} does not record its data set: pass "
                         "--dataset and --data-seed")
    return _load_data(spec, data_seed, args.train_fraction, data["mean"], data["std"])


def _check_model(name, option):
    from . import models

    try:
        models.get_factory(name)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def seeds_argument(p, what):
    p.add_argument("--seeds", type=seed_list, default=[0], metavar="S,S,...",
                   help=f"{what} per seed; the tables give mean ± std over them (default: 0)")


def _seeds(args):
    """--seeds, or [--seed] (run_arguments(seed=None) makes --seed short for --seeds)."""
    if args.seed is None:
        return args.seeds
    if _given(args, "seeds"):
        raise UsageError(f"--seed and --seeds both given: {args.command} trains once per seed in "
                         "--seeds; pass only --seeds")
    return [args.seed]


def _students(args):
    """--students, each a model that can be built; at least two."""
    for name in args.students:
        _check_model(name, "--students")
    if len(args.students) < 2:
        raise UsageError(f"--students {','.join(args.students)}: name at least 2 students")
    return args.students


def _run_name(args, default):
    """--name, or the default made a plain file name (a factory's ``module:function`` has a
    colon, which no file name should carry)."""
    if args.name is None:
        return re.sub(r"[^\w.+-]", "-", default)
    if not re.fullmatch(r"\w[\w.+-]*", args.name):
        raise UsageError(f"--name {args.name!r}: expected a plain file name (letters, digits "
                         "and . _ + -, not starting with . or -)")
    return args.name


def _print_result(label, metrics):
    test = metrics["test"]
    print(f"{label}: test accuracy {test['accuracy']:.4f}, macro F1 {test['f1']:.4f} "
          f"({metrics['history'][-1]['epoch'] if metrics['history'] else 0} epochs) "
          f"-> {metrics['checkpoint']}", flush=True)


def _command_line(args):
    """The command as typed (for a report's header), or its name alone when run otherwise."""
    if sys.argv[1:2] == [args.command]:
        return "pykd " + shlex.join(sys.argv[1:])
    return f"pykd {args.command}"


def _is_main():
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------
# Commands


def train_arguments(p):
    p.add_argument("--model", required=True, metavar="NAME",
                   help="keras-teacher, keras-student, tutorial-teacher, tutorial-student or "
                   "module:function (importable from the current directory)")
    p.add_argument("--name", help="run name in --out (default: the model's name)")
    data_arguments(p)
    run_arguments(p)
    g = p.add_argument_group("regularisation")
    g.add_argument("--nuclear-weight", type=weight, default=0.0, metavar="W",
                   help="weight of the nuclear norm of the first layer (default: %(default)s)")


def cmd_train(args):
    """Train a model on the labels alone (a teacher, or a student from scratch)."""
    from .train import run

    _device(args)
    _check_model(args.model, "--model")
    name = _run_name(args, args.model)
    config = _config(args, distilling=False)
    _claim(args, [name])
    splits, data = _load_data(args.dataset, args.data_seed, args.train_fraction)
    metrics = run(args.model, splits, data, config, args.out, name, **_run_options(args))
    if _is_main():
        _print_result(name, metrics)


def distill_arguments(p):
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", action="append", dest="teachers", metavar="CHECKPOINT",
                        help="the teacher's .pt; repeat it to distil several teachers of the "
                        "same classes at once (the data set, split and the student's input "
                        "normalisation are the first one's; each teacher sees its own)")
    teacher_cache_argument(source)
    p.add_argument("--teacher-weights", type=teacher_weight_list, metavar="W,W,...",
                   help="with several --teacher: the weight of each teacher's T^2 * KL term, in "
                   "their order (default: 1/K each)")
    p.add_argument("--student", required=True, metavar="NAME",
                   help="the student model (a name as for train --model)")
    p.add_argument("--name", help="run name in --out (default: STUDENT-distilled)")
    data_arguments(p, inherit="the teacher's")
    run_arguments(p)
    loss_arguments(p)


def cmd_distill(args):
    """Distil one trained teacher, or several at once, into a student."""
    from .train import run

    if args.teacher_cache is not None:
        if args.teacher_weights is not None:
            raise UsageError("--teacher-weights weighs several --teacher; a --teacher-cache is "
                             "one teacher")
        return distill_from_cache(args)
    _device(args)
    _check_model(args.student, "--student")
    name = _run_name(args, f"{args.student}-distilled")
    teachers = args.teachers
    if len(set(map(os.path.realpath, teachers))) != len(teachers):
        raise UsageError("--teacher: the same checkpoint is given twice; to weight a teacher "
                         "more, use --teacher-weights")
    if args.teacher_weights is not None and len(teachers) == 1:
        raise UsageError("--teacher-weights weighs several teachers, but one --teacher is given "
                         "(its weight is --soft-weight)")
    if args.teacher_weights is not None and len(args.teacher_weights) != len(teachers):
        raise UsageError(f"--teacher-weights: {len(args.teacher_weights)} weights for "
                         f"{len(teachers)} teachers; give one weight per --teacher")
    if args.teacher_weights is not None and not sum(args.teacher_weights):
        raise UsageError("--teacher-weights: all weights are 0: the KD term would be 0")
    if len(teachers) > 1:
        for option in ("logit_weight", "hint_weight"):
            if getattr(args, option):
                raise UsageError(f"{_flag(option)} needs a single --teacher: several teachers "
                                 "are distilled by the KD and cross-entropy terms only")
    config = _config(args, distilling=True, teacher_weights=args.teacher_weights)
    _claim(args, [name])
    splits, data = _teacher_data(args, teachers[0])
    metrics = run(args.student, splits, data, config, args.out, name,
                  teacher_path=teachers if len(teachers) > 1 else teachers[0],
                  **_run_options(args))
    if _is_main():
        _print_result(name, metrics)


def teacher_cache_argument(group):
    group.add_argument("--teacher-cache", metavar="FILE",
                       help="distil from a cache that pykd cache-teacher wrote, without loading "
                       "the teacher (its T, data set, split seed and train fraction are the "
                       "defaults of --temperature, --dataset, --data-seed and --train-fraction; "
                       "only the KD and hard-label terms)")


def distill_from_cache(args):
    """distill --teacher-cache: the student learns from the cached top-k teacher logits with
    pykd.sparse_kd_loss in its exact mode (the cache's log-sum-exps), rows looked up by each
    training image's index in the split."""
    from .teacher_cache import TeacherCache
    from .train import option, run

    _device(args)
    _check_model(args.student, "--student")
    unused = _given(args, "logit_weight", "hint_weight", "hint_layers")
    if unused:
        raise UsageError(f"{option(unused[0])} needs the teacher's full logits and features, "
                         "which --teacher-cache does not hold: distil from --teacher for it")
    cache = TeacherCache(args.teacher_cache)
    if not _given(args, "temperature"):
        args.temperature = cache.temperature  # a --temperature given is checked against it
    name = _run_name(args, f"{args.student}-distilled")
    config = _config(args, distilling=True)
    _claim(args, [name])
    cached = cache.data  # the split the cache was written for, unless the options say otherwise
    spec = args.dataset or cached["spec"]
    data_seed = cached["data_seed"] if args.data_seed is None else args.data_seed
    train_fraction = args.train_fraction if _given(args, "train_fraction") \
        else cached["train_fraction"]
    splits, data = _load_data(spec, data_seed, train_fraction, cached["mean"], cached["std"])
    metrics = run(args.student, splits, data, config, args.out, name, teacher_cache=cache,
                  **_run_options(args))
    if _is_main():
        _print_result(name, metrics)


def cache_teacher_arguments(p):
    p.add_argument("--teacher", required=True, metavar="CHECKPOINT", help="the teacher's .pt")
    p.add_argument("--top-k", required=True, type=positive_int, metavar="K",
                   help="logits kept per image (at most the number of classes)")
    p.add_argument("--temperature", type=positive_float, default=4.0, metavar="T",
                   help="T of the stored log-sum-exps; distill --teacher-cache trains at it "
                   "(default: %(default)s, distill's)")
    p.add_argument("--values-dtype", choices=("bfloat16", "float16"), default="bfloat16",
                   help="how the top-k logits are stored (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="the cache to write (one safetensors file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    data_arguments(p, inherit="the teacher's")
    g = p.add_argument_group("inference")
    g.add_argument("--batch-size", type=positive_int, default=256, metavar="N",
                   help="images per teacher forward pass (default: %(default)s)")
    device_arguments(g)
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar (shown only on a terminal)")


def cmd_cache_teacher(args):
    """Store a teacher's top-k logits on a training split, for distill --teacher-cache."""
    from .teacher_cache import cache_teacher

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("cache-teacher runs in one process: start it without torchrun (distill "
                         "--teacher-cache then runs under torchrun, each rank reading the cache)")
    device = _device(args)
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a directory: name the cache file to write")
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} exists: pass --overwrite to replace it (or choose another "
                         "--out)")
    splits, data = _teacher_data(args, args.teacher)
    if args.top_k > splits.num_classes:
        raise UsageError(f"--top-k {args.top_k} is more than the {splits.num_classes} classes "
                         f"of --dataset {data['spec']}")
    cache, timings = cache_teacher(
        args.out, args.teacher, splits, data, top_k=args.top_k, temperature=args.temperature,
        values_dtype=args.values_dtype, batch_size=args.batch_size, device=device,
        bf16=args.bf16, progress=not args.no_progress and sys.stderr.isatty())
    seconds = timings["teacher_s"] + timings["write_s"]
    print(f"wrote {args.out}: the top {cache.top_k} of {cache.num_classes} logits "
          f"({cache.values_dtype}) and the log-sum-exp at T = {cache.temperature:g} of "
          f"{len(cache)} training images of {data['spec']} (data seed {data['data_seed']}, train "
          f"fraction {data['train_fraction']:g}) from {args.teacher}; "
          f"{os.path.getsize(args.out) / 2 ** 20:.2f} MiB in {seconds:.3f} s "
          f"({len(cache) / seconds:.0f} images/s: teacher {timings['teacher_s']:.3f} s, top-k and "
          f"writing {timings['write_s']:.3f} s)", flush=True)


def eval_arguments(p):
    p.add_argument("--checkpoint", required=True, metavar="CHECKPOINT", help="a .pt file")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="(default: %(default)s)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", metavar="SPEC", help="digits, cifar10:PATH or folder:PATH, "
                   "with the checkpoint's classes (default: the checkpoint's)")
    g.add_argument("--data-seed", type=seed_type, metavar="S",
                   help="seed of the split (default: the checkpoint's)")
    g.add_argument("--train-fraction", type=fraction, metavar="F",
                   help="for --split train: the fraction of the training split (default: the "
                   "checkpoint's)")
    device_arguments(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where CHECKPOINT_STEM.eval-SPLIT.json goes (default: beside the "
                   "checkpoint)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an evaluation of another checkpoint or data set in that file")


def cmd_eval(args):
    """Evaluate a checkpoint: accuracy, macro precision/recall/F1, size, MACs, latency."""
    import torch

    from . import report
    from .train import check_classes, context, evaluate, load_model

    _device(args)
    if _given(args, "train_fraction") and args.split != "train":
        raise UsageError(f"--train-fraction only selects training images; it does nothing for "
                         f"--split {args.split}")
    model, state = load_model(args.checkpoint)
    data = state["data"]
    spec = args.dataset or data["spec"]
    data_seed = data["data_seed"] if args.data_seed is None else args.data_seed
    # The training fraction selects training images only: it matters for --split train alone.
    train_fraction = 1.0 if args.split != "train" else data["train_fraction"] \
        if args.train_fraction is None else args.train_fraction
    if spec is None or data_seed is None or train_fraction is None:
        raise UsageError(f"--checkpoint {args.checkpoint} does not record its data set: pass "
                         "--dataset, --data-seed and --train-fraction")
    evaluated = {"checkpoint": os.path.abspath(args.checkpoint), "run_id": state["run_id"],
                 "epoch": state["epoch"], "dataset": spec, "data_seed": data_seed,
                 "train_fraction": train_fraction if args.split == "train" else None,
                 "split": args.split, "bf16": args.bf16}
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    path = os.path.join(args.out or os.path.dirname(os.path.abspath(args.checkpoint)),
                        f"{stem}.eval-{args.split}.json")
    _claim_evaluation(path, evaluated, args.overwrite)
    splits, _ = _load_data(spec, data_seed, train_fraction, data["mean"], data["std"])
    check_classes(f"--checkpoint {args.checkpoint}", data["classes"], spec, splits.classes)
    ctx = context(args.device)
    model.to(ctx.device)
    x, y = splits.split(args.split)
    metrics = evaluate(model, x, y, splits.num_classes, ctx, bf16=args.bf16)
    if not ctx.is_main:
        return
    example = torch.zeros(1, *x.shape[1:], device=ctx.device)
    cost = report.model_cost(model, example)
    latency = report.latency_ms(model, example)
    result = {"evaluated": evaluated, "model": state["model"], "metrics": metrics,
              "cost": {**cost, "inference_ms": latency["ms"], "latency": latency}}
    report.write_json(path, result)
    print(f"{state['model']} on {spec} ({args.split}, {metrics['examples']} images): "
          f"accuracy {metrics['accuracy']:.4f}, precision {metrics['precision']:.4f}, "
          f"recall {metrics['recall']:.4f}, F1 {metrics['f1']:.4f}; "
          f"{cost['parameters']:,} parameters, {cost['size_bytes']:,} bytes, "
          f"{cost['macs'] / 1e6:.1f} M MACs, {latency['ms']:.2f} ms/image (batch 1, median of "
          f"{latency['repeats']}, {latency['threads']} threads) -> {path}")


def _claim_evaluation(path, evaluated, overwrite):
    """An evaluation file is rewritten only by the same evaluation, unless --overwrite."""
    import json

    if overwrite or not os.path.exists(path):
        return
    try:
        with open(path) as f:
            earlier = json.load(f).get("evaluated")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier != evaluated:
        raise UsageError(f"{path} holds another evaluation (of another checkpoint, epoch or data "
                         "set): pass --overwrite to replace it or --out to write elsewhere")


def _teacher_arguments(p, epochs):
    p.add_argument("--teacher-model", default="keras-teacher", metavar="NAME",
                   help="the teacher trained first (default: %(default)s)")
    p.add_argument("--teacher-epochs", type=positive_int, default=epochs, metavar="N",
                   help="(default: %(default)s)")


def sweep_arguments(p):
    p.add_argument("--teacher", metavar="CHECKPOINT",
                   help="a trained teacher's .pt (default: train --teacher-model first, as "
                   "'teacher' in --out)")
    _teacher_arguments(p, epochs=5)
    p.add_argument("--student", default="keras-student", metavar="NAME",
                   help="(default: %(default)s)")
    p.add_argument("--temperatures", type=temperature_list, default=[1.0, 2.0, 4.0, 8.0],
                   metavar="T,T,...", help="(default: 1,2,4,8)")
    p.add_argument("--soft-weights", type=weight_list, default=[0.25, 0.5, 0.75, 1.0],
                   metavar="W,W,...", help="soft weights in [0, 1]; each run's hard weight is "
                   "1 - W (default: 0.25,0.5,0.75,1)")
    data_arguments(p, inherit="the teacher's, or digits and 0")
    run_arguments(p, epochs=5)
    loss_arguments(p, sweep=True)


def _sweep_name(t, w):
    return f"sweep-T{t:g}-w{w:g}"


def cmd_sweep(args):
    """Distil over a temperature x soft-weight grid; chooses on validation accuracy."""
    from . import report
    from .train import run

    _device(args)
    given = _given(args, "teacher_model", "teacher_epochs")
    if args.teacher and given:
        raise UsageError(f"--teacher and {_flag(given[0])} both given: {_flag(given[0])} is for "
                         "the teacher the sweep trains when there is no --teacher; pass one")
    _check_model(args.student, "--student")
    if not args.teacher:
        _check_model(args.teacher_model, "--teacher-model")
        teacher_config = _config(args, distilling=False, epochs=args.teacher_epochs)
    for t in args.temperatures:
        for w in args.soft_weights:
            _config(args, distilling=True, temperature=t, soft_weight=w, hard_weight=1 - w)
    names = ["student-alone"] + [_sweep_name(t, w) for t in args.temperatures
                                 for w in args.soft_weights]
    _claim(args, names + ([] if args.teacher else ["teacher"]),
           files=("sweep.json", "sweep.md", "sweep.png"))
    if args.teacher:
        splits, data = _teacher_data(args, args.teacher)
        teacher = args.teacher
    else:
        splits, data = _load_data(args.dataset or "digits",
                                  0 if args.data_seed is None else args.data_seed,
                                  args.train_fraction)
        metrics = run(args.teacher_model, splits, data, teacher_config, args.out, "teacher",
                      **_run_options(args))
        if _is_main():
            _print_result("teacher", metrics)
        teacher = metrics["checkpoint"] if _is_main() else os.path.join(args.out, "teacher.pt")
    alone = run(args.student, splits, data, _config(args, distilling=False), args.out,
                "student-alone", **_run_options(args))
    grid = []
    for t in args.temperatures:
        row = []
        for w in args.soft_weights:
            config = _config(args, distilling=True, temperature=t, soft_weight=w,
                             hard_weight=1 - w)
            metrics = run(args.student, splits, data, config, args.out, _sweep_name(t, w),
                          teacher_path=teacher, **_run_options(args))
            row.append({"val": metrics["val"], "test": metrics["test"]})
            if _is_main():
                print(f"T={t:g} soft_weight={w:g}: val accuracy {metrics['val']['accuracy']:.4f}"
                      f", test accuracy {metrics['test']['accuracy']:.4f}", flush=True)
        grid.append(row)
    if not _is_main():
        return
    # The choice is made on the validation split (ties: higher validation F1, then grid order);
    # the test split only reports the chosen setting.
    cells = [(i, j) for i in range(len(grid)) for j in range(len(grid[i]))]
    ci, cj = max(cells, key=lambda c: (grid[c[0]][c[1]]["val"]["accuracy"],
                                       grid[c[0]][c[1]]["val"]["f1"], -cells.index(c)))
    t, w, best = args.temperatures[ci], args.soft_weights[cj], grid[ci][cj]
    rows = [["student alone", "-", "-", f"{alone['val']['accuracy']:.4f}",
             f"{alone['test']['accuracy']:.4f}", f"{alone['test']['f1']:.4f}", ""]]
    for i, tt in enumerate(args.temperatures):
        for j, ww in enumerate(args.soft_weights):
            m = grid[i][j]
            rows.append(["distilled", f"{tt:g}", f"{ww:g}", f"{m['val']['accuracy']:.4f}",
                         f"{m['test']['accuracy']:.4f}", f"{m['test']['f1']:.4f}",
                         "chosen" if (i, j) == (ci, cj) else ""])
    table = report.markdown_table(["student", "temperature", "soft weight", "val accuracy",
                                   "test accuracy", "test macro F1", "chosen on val"], rows)
    summary = (f"chosen on validation: T={t:g}, soft weight {w:g} (val accuracy "
               f"{best['val']['accuracy']:.4f}); its test accuracy {best['test']['accuracy']:.4f}"
               f", student alone {alone['test']['accuracy']:.4f}")
    figure = report.sweep_figure(args.temperatures, args.soft_weights,
                                 [[m["val"]["accuracy"] for m in row] for row in grid],
                                 chosen=(ci, cj), baseline=alone["val"]["accuracy"])
    report.save_figure(figure, os.path.join(args.out, "sweep.png"))
    report.write_text(os.path.join(args.out, "sweep.md"), f"{table}\n\n{summary}\n")
    report.write_json(os.path.join(args.out, "sweep.json"), {
        "teacher": os.path.abspath(teacher), "student": args.student, "dataset": data["spec"],
        "temperatures": args.temperatures, "soft_weights": args.soft_weights,
        "val": [[m["val"] for m in row] for row in grid],
        "test": [[m["test"] for m in row] for row in grid],
        "chosen": {"temperature": t, "soft_weight": w, "hard_weight": 1 - w, **best},
        "student_alone": {"val": alone["val"], "test": alone["test"]},
    })
    print(f"\n{table}\n\n{summary}\nwrote {args.out}/sweep.md, sweep.png and sweep.json")


# The demo's defaults: a teacher trained on every label, and students that see the labels of
# only a tenth of the training images (the setting where distillation is said to help most).
# Chosen so that the whole demo takes a few minutes on 2 CPU cores; the README has the results.
DEMO = {"teacher_epochs": 3, "epochs": 20, "train_fraction": 0.1, "batch_size": 32,
        "temperature": 4.0, "soft_weight": 0.5, "hard_weight": 0.5}


def _write_seed_comparison(args, runs, summary, seconds, seeds, files, notes="",
                           json_fields=()):
    """The report of runs compared over seeds (`runs`: label -> one metrics dict per seed): the
    curves (mean ± std), the markdown table and the JSON, in `files` (png, md, json) of --out.
    Returns the table."""
    from . import report

    png, md, json_name = files
    command = _command_line(args)
    table = report.comparison_table(
        [(label, [m["test"] for m in ms], ms[-1]["cost"]) for label, ms in runs.items()])
    figure = report.curves_figure({label: [m["history"] for m in ms]
                                   for label, ms in runs.items()})
    report.save_figure(figure, os.path.join(args.out, png))
    text = f"`{command}`\n\n{summary}\n\n{table}\n" + (f"\n{notes}\n" if notes else "")
    report.write_text(os.path.join(args.out, md), text)
    report.write_json(os.path.join(args.out, json_name), {
        "command": command, "seconds": seconds, "seeds": seeds,
        "test": {label: [m["test"] for m in ms] for label, ms in runs.items()},
        "cost": {label: ms[-1]["cost"] for label, ms in runs.items()},
        **dict(json_fields),
    })
    return table


def demo_arguments(p):
    _teacher_arguments(p, epochs=DEMO["teacher_epochs"])
    p.add_argument("--student-model", default="keras-student", metavar="NAME",
                   help="(default: %(default)s)")
    p.add_argument("--teacher-fraction", type=fraction, default=1.0, metavar="F",
                   help="fraction of the training split the teacher learns from "
                   "(default: %(default)s)")
    seeds_argument(p, "one student alone and one distilled student (the teacher uses the first)")
    data_arguments(p)
    p.set_defaults(train_fraction=DEMO["train_fraction"])
    run_arguments(p, epochs=DEMO["epochs"], batch_size=DEMO["batch_size"], seed=None)
    loss_arguments(p)
    p.set_defaults(temperature=DEMO["temperature"], soft_weight=DEMO["soft_weight"],
                   hard_weight=DEMO["hard_weight"])


def cmd_demo(args):
    """The seed experiment: teacher, student alone, distilled student; table and plots."""
    from .train import run

    _device(args)
    seeds = _seeds(args)
    _check_model(args.teacher_model, "--teacher-model")
    _check_model(args.student_model, "--student-model")
    teacher_config = _config(args, distilling=False, epochs=args.teacher_epochs, seed=seeds[0])
    for s in seeds:
        _config(args, distilling=True, seed=s)
    names = ["teacher"] + [f"student-{kind}-seed{s}" for s in seeds
                           for kind in ("alone", "distilled")]
    _claim(args, names, files=("results.md", "demo.json", "curves.png"))
    started = time.perf_counter()
    teacher_splits, teacher_data = _load_data(args.dataset, args.data_seed,
                                              args.teacher_fraction)
    # The students' labelled subset, normalised as the teacher's inputs were.
    splits, data = _load_data(args.dataset, args.data_seed, args.train_fraction,
                              teacher_splits.mean, teacher_splits.std)
    options = _run_options(args)
    teacher = run(args.teacher_model, teacher_splits, teacher_data, teacher_config, args.out,
                  "teacher", **options)
    if _is_main():
        _print_result("teacher", teacher)
    teacher_path = os.path.join(args.out, "teacher.pt")
    runs = {"teacher": [teacher], "student alone": [], "distilled student": []}
    for s in seeds:
        alone = run(args.student_model, splits, data, _config(args, distilling=False, seed=s),
                    args.out, f"student-alone-seed{s}", **options)
        distilled = run(args.student_model, splits, data, _config(args, distilling=True, seed=s),
                        args.out, f"student-distilled-seed{s}", teacher_path=teacher_path,
                        **options)
        runs["student alone"].append(alone)
        runs["distilled student"].append(distilled)
        if _is_main():
            _print_result(f"seed {s} student alone", alone)
            _print_result(f"seed {s} distilled student", distilled)
    if not _is_main():
        return
    seconds = time.perf_counter() - started
    summary = (f"{args.dataset}: teacher {args.teacher_model} on {len(teacher_splits.train_y)} "
               f"labelled training images ({args.teacher_epochs} epochs), students "
               f"{args.student_model} on {len(splits.train_y)} ({args.epochs} epochs); "
               f"{len(splits.test_y)} test images; students' mean ± std over seeds "
               f"{','.join(map(str, seeds))}; {seconds:.0f} s")
    gains = [d["test"]["accuracy"] - a["test"]["accuracy"]
             for d, a in zip(runs["distilled student"], runs["student alone"])]
    table = _write_seed_comparison(args, runs, summary, seconds, seeds,
                                   ("curves.png", "results.md", "demo.json"),
                                   json_fields={"distillation_gain": gains})
    print(f"\n{summary}\n\n{table}\n")
    print(f"distilled - alone test accuracy: {statistics.mean(gains):+.4f} on average over "
          f"{len(gains)} seed(s); wrote {args.out}/results.md, curves.png, demo.json")


def mutual_arguments(p):
    p.add_argument("--students", required=True, type=model_list, metavar="NAME,NAME,...",
                   help="the students that learn together (at least 2; names as for train "
                   "--model)")
    seeds_argument(p, "each student alone and the students together")
    data_arguments(p)
    run_arguments(p, seed=None)
    loss_arguments(p, extras=False)
    # Deep mutual learning's loss: cross-entropy plus KL towards the peers, at T = 1.
    p.set_defaults(temperature=1.0, soft_weight=1.0, hard_weight=1.0)


def cmd_mutual(args):
    """Deep mutual learning: students trained together, against each trained alone."""
    from . import report
    from .train import member_files, run

    _device(args)
    seeds, students = _seeds(args), _students(args)
    for seed in seeds:
        _config(args, distilling=True, seed=seed)
    names = [f"{s}-alone-seed{seed}" for seed in seeds for s in students]
    names += [f"mutual-seed{seed}" for seed in seeds]
    members = [os.path.basename(paths[kind]) for seed in seeds
               for paths in member_files(args.out, f"mutual-seed{seed}", students)
               for kind in ("checkpoint", "metrics")]
    _claim(args, names, files=members + ["mutual.md", "mutual.json", "mutual.png"])
    started = time.perf_counter()
    splits, data = _load_data(args.dataset, args.data_seed, args.train_fraction)
    options = _run_options(args)
    alone = {s: [] for s in students}
    together = {s: [] for s in students}
    for seed in seeds:
        for student in students:
            metrics = run(student, splits, data, _config(args, distilling=False, seed=seed),
                          args.out, f"{student}-alone-seed{seed}", **options)
            alone[student].append(metrics)
            if _is_main():
                _print_result(f"seed {seed} {student} alone", metrics)
        cohort = run(students, splits, data, _config(args, distilling=True, seed=seed), args.out,
                     f"mutual-seed{seed}", **options)
        if _is_main():
            for student, metrics in zip(students, cohort["member_runs"]):
                together[student].append(metrics)
                _print_result(f"seed {seed} {student} mutual", metrics)
    if not _is_main():
        return
    runs = {}
    for student in students:
        runs[f"{student} alone"] = alone[student]
        runs[f"{student} mutual"] = together[student]
    gains = {s: [m["test"]["accuracy"] - a["test"]["accuracy"]
                 for m, a in zip(together[s], alone[s])] for s in students}
    seconds = time.perf_counter() - started
    summary = (f"{data['spec']}: students {', '.join(students)} on {len(splits.train_y)} "
               f"labelled training images, {args.epochs} epochs, alone and together (T = "
               f"{args.temperature:g}, soft weight {args.soft_weight:g}, hard weight "
               f"{args.hard_weight:g}); {len(splits.test_y)} test images; mean ± std over seeds "
               f"{','.join(map(str, seeds))}; {seconds:.0f} s")
    gain_lines = "\n".join(
        f"- {s}: mutual - alone test accuracy {report.mean_std(g, signed=True)} "
        f"(better on {sum(x > 0 for x in g)} of {len(g)} seeds)" for s, g in gains.items())
    table = _write_seed_comparison(args, runs, summary, seconds, seeds,
                                   ("mutual.png", "mutual.md", "mutual.json"),
                                   notes=gain_lines,
                                   json_fields={"students": students, "mutual_gain": gains})
    print(f"\n{summary}\n\n{table}\n\n{gain_lines}\n"
          f"wrote {args.out}/mutual.md, mutual.png, mutual.json")


def multistudent_arguments(p):
    p.add_argument("--teacher", required=True, metavar="CHECKPOINT", help="the teacher's .pt")
    p.add_argument("--students", required=True, type=model_list, metavar="NAME,NAME,...",
                   help="the students distilled from it, among which the selector chooses (at "
                   "least 2; names as for train --model)")
    seeds_argument(p, "the distilled students and the selector")
    data_arguments(p, inherit="the teacher's")
    run_arguments(p, seed=None)
    loss_arguments(p)


def cmd_multistudent(args):
    """Seed 003's framework: distilled students and a selector that routes each image to one."""
    import torch

    from . import multistudent, report
    from .train import data_meta, load_model, load_teacher, predict_logits, run, run_files

    device = _device(args)
    seeds, students = _seeds(args), _students(args)
    for seed in seeds:
        _config(args, distilling=True, seed=seed)
    names = [f"{s}-distilled-seed{seed}" for seed in seeds for s in students]
    names += [f"selector-seed{seed}" for seed in seeds]
    _claim(args, names, files=("multistudent.md", "multistudent.json", "multistudent.png"))
    started = time.perf_counter()
    splits, data = _teacher_data(args, args.teacher)
    teacher, _, _ = load_teacher(args.teacher, data["spec"], splits.classes)
    options = _run_options(args)
    example = torch.zeros(2, *splits.train_x.shape[1:])
    per_seed = []
    for seed in seeds:
        config = _config(args, distilling=True, seed=seed)
        distilled = [run(s, splits, data, config, args.out, f"{s}-distilled-seed{seed}",
                         teacher_path=args.teacher, **options) for s in students]
        # Every rank reads the students back (run() returns once they are written).
        logits, records = [], []
        for student in students:
            path = run_files(args.out, f"{student}-distilled-seed{seed}")["checkpoint"]
            model, state = load_model(path)
            model.to(device)
            logits.append({split: predict_logits(model, splits.split(split)[0], device)
                           for split in ("train", "val", "test")})
            records.append(f"{os.path.abspath(path)} (run {state['run_id']}, {state['epoch']} "
                           "epochs)")
        selector_splits = multistudent.selector_splits(splits, logits, students)
        selector_data = data_meta(data["spec"], data["data_seed"], data["train_fraction"],
                                  selector_splits)
        selector = run("selector-cnn", selector_splits, selector_data,
                       _config(args, distilling=False, seed=seed, nuclear_weight=0.0), args.out,
                       f"selector-seed{seed}", meta={"students": records}, **options)
        if not _is_main():
            continue
        for student, metrics in zip(students, distilled):
            _print_result(f"seed {seed} {student} distilled", metrics)
        selector_model, _ = load_model(selector["checkpoint"])
        chosen = predict_logits(selector_model.to(device), splits.test_x, device).argmax(-1)
        routed = multistudent.route(chosen, [l["test"] for l in logits], splits.test_y,
                                    splits.num_classes)
        costs = [m["cost"] for m in distilled]
        routed["macs"] = selector["cost"]["macs"] + sum(
            costs[k]["macs"] * share for k, share in enumerate(routed["share"]))
        per_seed.append({"seed": seed, "students": [m["test"] for m in distilled],
                         "student_costs": costs, "selector": selector["test"],
                         "selector_cost": selector["cost"], "routed": routed})
        print(f"seed {seed} routed system: test accuracy {routed['test']['accuracy']:.4f} "
              f"(oracle {routed['oracle_accuracy']:.4f}; the selector chose a correct student "
              f"for {routed['picks_correct']:.4f} of the images some student gets right)",
              flush=True)
    if not _is_main():
        return
    teacher.to(device)
    teacher_test = multistudent.metrics(predict_logits(teacher, splits.test_x, device).argmax(-1),
                                        splits.test_y, splits.num_classes)
    teacher_cost = report.model_cost(teacher, example.to(device))
    result = multistudent.summarise(students, teacher_test, teacher_cost, per_seed)
    seconds = time.perf_counter() - started
    command = _command_line(args)
    summary = (f"{data['spec']}: teacher {args.teacher}; students {', '.join(students)} "
               f"distilled on {len(splits.train_y)} labelled training images ({args.epochs} "
               f"epochs), the selector (selector-cnn) trained on the same images; "
               f"{len(splits.test_y)} test images; mean ± std over seeds "
               f"{','.join(map(str, seeds))}; {seconds:.0f} s")
    report.save_figure(report.bars_figure(result["bars"], "test accuracy",
                                          "multi-student system on the test split"),
                       os.path.join(args.out, "multistudent.png"))
    text = f"`{command}`\n\n{summary}\n\n" + "\n\n".join(result["tables"]) + "\n"
    report.write_text(os.path.join(args.out, "multistudent.md"), text)
    report.write_json(os.path.join(args.out, "multistudent.json"), {
        "command": command, "seconds": seconds, "seeds": seeds, "students": students,
        "teacher": {"path": os.path.abspath(args.teacher), "test": teacher_test,
                    "cost": teacher_cost},
        "per_seed": per_seed, "summary": result["summary"],
    })
    print(f"\n{summary}\n\n" + "\n\n".join(result["tables"]) +
          f"\nwrote {args.out}/multistudent.md, multistudent.png, multistudent.json")


def bench_arguments(p):
    from . import benchmark

    benchmark.add_arguments(p)


def cmd_bench(args):
    """Time pykd.kd_loss against eager and compiled PyTorch, side by side (forward+backward)."""
    from . import benchmark

    benchmark.run(args)


COMMANDS = [
    ("demo", cmd_demo, demo_arguments),
    ("train", cmd_train, train_arguments),
    ("distill", cmd_distill, distill_arguments),
    ("cache-teacher", cmd_cache_teacher, cache_teacher_arguments),
    ("eval", cmd_eval, eval_arguments),
    ("sweep", cmd_sweep, sweep_arguments),
    ("mutual", cmd_mutual, mutual_arguments),
    ("multistudent", cmd_multistudent, multistudent_arguments),
    ("bench", cmd_bench, bench_arguments),
]

# What each command imports beyond torch: the `train` extra (pyproject.toml).
EXTRAS = {"numpy": "numpy", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}
NEEDS = {"demo": ("numpy", "sklearn", "matplotlib"), "sweep": ("numpy", "sklearn", "matplotlib"),
         "train": ("numpy", "sklearn"), "distill": ("numpy", "sklearn"),
         "cache-teacher": ("numpy", "sklearn"),
         "eval": ("numpy", "sklearn"), "mutual": ("numpy", "sklearn", "matplotlib"),
         "multistudent": ("numpy", "sklearn", "matplotlib")}


def _require_extras(command):
    missing = []
    for module in NEEDS.get(command, ()):
        try:
            found = importlib.util.find_spec(module) is not None  # finds without importing
        except ImportError:
            found = False
        if not found:
            missing.append(EXTRAS[module])
    if missing:
        raise UsageError(f"needs {' and '.join(missing)}, not installed here: "
                         "pip install 'pykd[train]'")


def _version():
    from . import __version__

    return __version__


def build_parser():
    parser = Parser(prog="pykd", description="Knowledge distillation with fused PyTorch ops.")
    parser.add_argument("--version", action="version", version=f"pykd {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, run, add_arguments in COMMANDS:
        summary = run.__doc__.strip().splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=summary)
        add_arguments(sub)
        sub.set_defaults(run=run, parser=sub)
    return parser


def _command_first(parser, argv):
    """An option before the command is an error that shows where it goes."""
    if not argv or not argv[0].startswith("-") or argv[0] in ("-h", "--help", "--version"):
        return
    names = [name for name, _, _ in COMMANDS]
    at = next((i for i, a in enumerate(argv) if a in names), None)
    if at is None:
        parser.error(f"{argv[0]} before the command: options go after it, as in pykd COMMAND "
                     f"{argv[0]} ... (commands: {', '.join(names)})")
    parser.error(f"{shlex.join(argv[:at])} before the command: options go after it, as in "
                 f"pykd {shlex.join([argv[at], *argv[:at], *argv[at + 1:]])}")


def _one_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    _command_first(parser, argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's parser, which names the command
        args.parser.error(f"unrecognized arguments: {shlex.join(unknown)}")
    from .train import Interrupted, distributed_teardown

    try:
        _require_extras(args.command)
        with distributed_teardown():
            args.run(args)
    except Interrupted as e:
        where = (f"{e.checkpoint} holds {e.epoch} of {e.epochs} epochs" if e.checkpoint
                 else "this run had saved no epoch yet")
        print(f"pykd {args.command}: interrupted; {where}: run the same command with --resume "
              "to continue", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"pykd {args.command}: interrupted; run the same command with --resume to continue "
              "from what was saved", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # UsageError, DataError and CheckpointError among them
        if os.environ.get("PYKD_TRACEBACK"):
            raise
        print(f"pykd {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0
