"""The `pykd` command line (also `python -m pykd`); run `pykd COMMAND --help` for each command.

A command is a function `cmd_NAME(args)` plus `NAME_arguments(parser)`, listed in COMMANDS.
Errors in arguments or data end with one line on stderr and exit status 2.
"""
import argparse
import os
import statistics
import sys
import time

DEFAULT_OUT = "runs"


class UsageError(ValueError):
    """A problem with the command's arguments, reported as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# Argument types and groups


def _number(kind, low=None, low_open=False, high=None):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if low is not None and (value < low or (low_open and value == low)):
            relation = ">" if low_open else ">="
            raise argparse.ArgumentTypeError(f"must be {relation} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _number(int, 1)
positive_float = _number(float, 0, low_open=True)
weight = _number(float, 0)
fraction = _number(float, 0, low_open=True, high=1)


def float_list(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()] or [0]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None


def layer_pair(text):
    student, sep, teacher = text.partition(":")
    if not sep or not student or not teacher:
        raise argparse.ArgumentTypeError(f"expected STUDENT_LAYER:TEACHER_LAYER, got {text!r}")
    return student, teacher


def data_arguments(p, default="digits"):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default, metavar="SPEC",
                   help="digits (scikit-learn's, the default), cifar10:PATH (python batches) or "
                   "folder:PATH (a subfolder of images per class)"
                   + ("" if default else "; default: the teacher's or checkpoint's data set"))
    g.add_argument("--data-seed", type=int, default=0,
                   help="seed of the train/val/test split (default 0)")
    g.add_argument("--train-fraction", type=fraction, default=1.0, metavar="F",
                   help="train on this stratified fraction of the training split (default 1)")


def run_arguments(p, epochs=10):
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=epochs, help=f"(default {epochs})")
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help="global batch, split across torchrun ranks (default 64)")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (1e-3)")
    g.add_argument("--weight-decay", type=weight, default=0.0)
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation and order (0)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out if there is one")
    g.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"where checkpoints (*.pt) and metrics (*.json) go (default {DEFAULT_OUT})")


def loss_arguments(p, sweep=False):
    g = p.add_argument_group("distillation loss")
    if not sweep:
        g.add_argument("--temperature", type=positive_float, default=4.0, help="T (default 4)")
        g.add_argument("--soft-weight", type=weight, default=0.5,
                       help="weight of T^2 * KL (default 0.5)")
        g.add_argument("--hard-weight", type=weight, default=0.5,
                       help="weight of the cross-entropy with the labels (default 0.5)")
    g.add_argument("--logit-weight", type=weight, default=0.0,
                   help="weight of the squared logit difference (default 0)")
    g.add_argument("--hint-weight", type=weight, default=0.0,
                   help="weight of the FitNets feature-hint loss (default 0)")
    g.add_argument("--hint-layer", type=layer_pair, action="append", dest="hint_layers",
                   metavar="STUDENT:TEACHER",
                   help="a pair of layer names for hints, repeatable (default features:features)")
    g.add_argument("--nuclear-weight", type=weight, default=0.0,
                   help="weight of the nuclear norm of the student's first layer (default 0)")


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _config(args, **overrides):
    from .train import TrainConfig

    values = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "seed": args.seed, "bf16": args.bf16,
        "progress": not args.no_progress,
    }
    for name in ("temperature", "soft_weight", "hard_weight", "logit_weight", "hint_weight",
                 "nuclear_weight"):
        if hasattr(args, name):
            values[name] = getattr(args, name)
    if getattr(args, "hint_layers", None):
        values["hint_layers"] = args.hint_layers
    values.update(overrides)
    return TrainConfig(**values)


def _load_data(spec, args, mean=None, std=None):
    from .data import load_dataset

    return load_dataset(spec, data_seed=args.data_seed, train_fraction=args.train_fraction,
                        mean=mean, std=std)


def _data_meta(spec, args, splits):
    from .train import data_meta

    return data_meta(spec, args.data_seed, args.train_fraction, splits)


def _teacher_data(args, teacher_path):
    """The splits for distilling from `teacher_path`: the teacher's data set unless --dataset is
    given, always normalised with the teacher's statistics so it sees the inputs it was
    trained on."""
    from .train import load_checkpoint

    data = load_checkpoint(teacher_path)["data"]
    spec = args.dataset or data["spec"]
    splits = _load_data(spec, args, data["mean"], data["std"])
    return spec, splits


def _check_model(name):
    from . import models

    try:
        models.get_factory(name)
    except ValueError as e:
        raise UsageError(f"--model/--student: {e}") from None


def _print_result(label, metrics):
    test = metrics["test"]
    print(f"{label}: test accuracy {test['accuracy']:.4f}, macro F1 {test['f1']:.4f} "
          f"({metrics['history'][-1]['epoch'] if metrics['history'] else 0} epochs) "
          f"-> {metrics.get('checkpoint', '')}", flush=True)


def _is_main():
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------
# Commands


def train_arguments(p):
    p.add_argument("--model", required=True, metavar="NAME",
                   help="keras-teacher, keras-student, tutorial-teacher, tutorial-student or "
                   "package.module:function")
    p.add_argument("--name", help="checkpoint name in --out (default: the model's name)")
    data_arguments(p)
    run_arguments(p)
    g = p.add_argument_group("regularisation")
    g.add_argument("--nuclear-weight", type=weight, default=0.0,
                   help="weight of the nuclear norm of the first layer (default 0)")


def cmd_train(args):
    """Train a model on the labels alone (a teacher, or a student from scratch)."""
    from .train import run

    _check_model(args.model)
    splits = _load_data(args.dataset, args)
    metrics = run(args.model, splits, _data_meta(args.dataset, args, splits), _config(args),
                  args.out, args.name or args.model, resume=args.resume, device=args.device)
    if _is_main():
        _print_result(args.name or args.model, metrics)


def distill_arguments(p):
    p.add_argument("--teacher", required=True, metavar="CHECKPOINT", help="the teacher's .pt")
    p.add_argument("--student", required=True, metavar="NAME", help="the student model's name")
    p.add_argument("--name", help="checkpoint name in --out (default: STUDENT-distilled)")
    data_arguments(p, default=None)
    run_arguments(p)
    loss_arguments(p)


def cmd_distill(args):
    """Distil a trained teacher into a student."""
    from .train import run

    _check_model(args.student)
    spec, splits = _teacher_data(args, args.teacher)
    name = args.name or f"{args.student}-distilled"
    metrics = run(args.student, splits, _data_meta(spec, args, splits), _config(args), args.out,
                  name, teacher_path=args.teacher, resume=args.resume, device=args.device)
    if _is_main():
        _print_result(name, metrics)


def eval_arguments(p):
    p.add_argument("--checkpoint", required=True, metavar="CHECKPOINT", help="a .pt file")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    data_arguments(p, default=None)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where the metrics JSON goes (default: beside the checkpoint)")


def cmd_eval(args):
    """Evaluate a checkpoint: accuracy, macro precision/recall/F1, size, MACs, latency."""
    from . import report
    from .train import context, evaluate, load_model

    model, state = load_model(args.checkpoint)
    data = state["data"]
    spec = args.dataset or data["spec"]
    if args.dataset is None:  # the checkpoint's own splits
        args.data_seed, args.train_fraction = data["data_seed"], data["train_fraction"]
    splits = _load_data(spec, args, data["mean"], data["std"])
    classes = state["model_args"]["num_classes"]
    if classes != splits.num_classes:
        raise UsageError(f"--checkpoint {args.checkpoint} predicts {classes} classes but "
                         f"--dataset {spec} has {splits.num_classes}")
    ctx = context(args.device)
    model.to(ctx.device)
    x, y = splits.split(args.split)
    metrics = evaluate(model, x, y, splits.num_classes, ctx, bf16=args.bf16)
    if not ctx.is_main:
        return
    result = {"checkpoint": os.path.abspath(args.checkpoint), "model": state["model"],
              "dataset": spec, "split": args.split, "metrics": metrics,
              "cost": report.model_cost(model.eval(), x[:64].to(ctx.device))}
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    path = os.path.join(out, f"{stem}.eval.json")
    report.write_json(path, result)
    cost = result["cost"]
    print(f"{state['model']} on {spec} ({args.split}, {metrics['examples']} images): "
          f"accuracy {metrics['accuracy']:.4f}, precision {metrics['precision']:.4f}, "
          f"recall {metrics['recall']:.4f}, F1 {metrics['f1']:.4f}; "
          f"{cost['parameters']:,} parameters, {cost['size_bytes']:,} bytes, "
          f"{cost['macs'] / 1e6:.1f} M MACs, {cost['inference_ms']:.2f} ms/image -> {path}")


def _teacher_for(args, splits, data):
    """--teacher if given, else a teacher trained now (or reused with --resume) in --out."""
    from .train import run

    if args.teacher:
        return args.teacher
    _check_model(args.teacher_model)
    config = _config(args, epochs=args.teacher_epochs)
    metrics = run(args.teacher_model, splits, data, config, args.out, "teacher",
                  resume=args.resume, device=args.device)
    if _is_main():
        _print_result("teacher", metrics)
    return os.path.join(args.out, "teacher.pt")


def sweep_arguments(p):
    p.add_argument("--teacher", metavar="CHECKPOINT",
                   help="the teacher's .pt (default: train --teacher-model first)")
    p.add_argument("--teacher-model", default="keras-teacher", metavar="NAME")
    p.add_argument("--teacher-epochs", type=positive_int, default=5)
    p.add_argument("--student", default="keras-student", metavar="NAME")
    p.add_argument("--temperatures", type=float_list, default=[1.0, 2.0, 4.0, 8.0],
                   metavar="T,T,...", help="(default 1,2,4,8)")
    p.add_argument("--soft-weights", type=float_list, default=[0.25, 0.5, 0.75, 1.0],
                   metavar="W,W,...",
                   help="soft weights; each run's hard weight is 1 - W (default 0.25,0.5,0.75,1)")
    data_arguments(p, default=None)
    run_arguments(p, epochs=5)
    loss_arguments(p, sweep=True)


def cmd_sweep(args):
    """Distil over a temperature x soft-weight grid; writes sweep.json and sweep.png."""
    from . import report
    from .train import run

    _check_model(args.student)
    for t in args.temperatures:
        if not t > 0:
            raise UsageError(f"--temperatures: every temperature must be > 0, got {t:g}")
    for w in args.soft_weights:
        if not 0 <= w <= 1:
            raise UsageError(f"--soft-weights: every weight must be in [0, 1], got {w:g}")
    if args.teacher:
        spec, splits = _teacher_data(args, args.teacher)
    else:
        spec = args.dataset or "digits"
        splits = _load_data(spec, args)
    data = _data_meta(spec, args, splits)
    teacher = _teacher_for(args, splits, data)
    alone = run(args.student, splits, data, _config(args), args.out, "student-alone",
                resume=args.resume, device=args.device)
    grid = []
    for t in args.temperatures:
        row = []
        for w in args.soft_weights:
            config = _config(args, temperature=t, soft_weight=w, hard_weight=1 - w)
            metrics = run(args.student, splits, data, config, args.out, f"sweep-T{t:g}-w{w:g}",
                          teacher_path=teacher, resume=args.resume, device=args.device)
            row.append(metrics["test"])
            if _is_main():
                print(f"T={t:g} soft_weight={w:g}: test accuracy "
                      f"{metrics['test']['accuracy']:.4f}, F1 {metrics['test']['f1']:.4f}",
                      flush=True)
        grid.append(row)
    if not _is_main():
        return
    accuracy = [[m["accuracy"] for m in row] for row in grid]
    baseline = alone["test"]["accuracy"]
    report.plot_sweep(args.temperatures, args.soft_weights, accuracy,
                      os.path.join(args.out, "sweep.png"), baseline=baseline)
    report.write_json(os.path.join(args.out, "sweep.json"), {
        "teacher": os.path.abspath(teacher), "student": args.student, "dataset": spec,
        "temperatures": args.temperatures, "soft_weights": args.soft_weights,
        "test": grid, "student_alone": alone["test"],
    })
    print(f"student alone: test accuracy {baseline:.4f}; "
          f"wrote {os.path.join(args.out, 'sweep.png')} and sweep.json")


# The demo's defaults: a teacher trained on every label, and students that see the labels of
# only a tenth of the training images (the setting where distillation is said to help most).
# Chosen so that the whole demo takes a few minutes on 2 CPU cores; docs/distillation.md has the
# measured results.
DEMO = {"teacher_epochs": 3, "epochs": 20, "train_fraction": 0.1, "batch_size": 32,
        "temperature": 4.0, "soft_weight": 0.5, "hard_weight": 0.5}


def demo_arguments(p):
    p.add_argument("--teacher-model", default="keras-teacher", metavar="NAME")
    p.add_argument("--student-model", default="keras-student", metavar="NAME")
    p.add_argument("--teacher-epochs", type=positive_int, default=DEMO["teacher_epochs"])
    p.add_argument("--teacher-fraction", type=fraction, default=1.0, metavar="F",
                   help="fraction of the training split the teacher learns from (default 1)")
    p.add_argument("--seeds", type=int_list, default=[0], metavar="S,S,...",
                   help="one student alone and one distilled student per seed (the teacher uses "
                   "the first); the table gives mean ± std over them (default 0)")
    data_arguments(p)
    p.set_defaults(train_fraction=DEMO["train_fraction"])
    run_arguments(p, epochs=DEMO["epochs"])
    p.set_defaults(batch_size=DEMO["batch_size"])
    loss_arguments(p)
    p.set_defaults(temperature=DEMO["temperature"], soft_weight=DEMO["soft_weight"],
                   hard_weight=DEMO["hard_weight"])


def cmd_demo(args):
    """The seed experiment: teacher, student alone, distilled student; table and plots."""
    from . import report
    from .data import load_dataset
    from .train import run

    _check_model(args.teacher_model)
    _check_model(args.student_model)
    started = time.perf_counter()
    teacher_splits = load_dataset(args.dataset, data_seed=args.data_seed,
                                  train_fraction=args.teacher_fraction)
    teacher_data = _data_meta(args.dataset, args, teacher_splits)
    teacher_data["train_fraction"] = args.teacher_fraction
    # The students' labelled subset, normalised as the teacher's inputs were.
    splits = _load_data(args.dataset, args, teacher_splits.mean, teacher_splits.std)
    data = _data_meta(args.dataset, args, splits)

    args.seed = args.seeds[0]
    teacher = run(args.teacher_model, teacher_splits, teacher_data,
                  _config(args, epochs=args.teacher_epochs), args.out, "teacher",
                  resume=args.resume, device=args.device)
    teacher_path = os.path.join(args.out, "teacher.pt")
    if _is_main():
        _print_result("teacher", teacher)
    runs = {"teacher": [teacher], "student alone": [], "distilled student": []}
    for seed in args.seeds:
        args.seed = seed
        alone = run(args.student_model, splits, data, _config(args), args.out,
                    f"student-alone-seed{seed}", resume=args.resume, device=args.device)
        distilled = run(args.student_model, splits, data, _config(args), args.out,
                        f"student-distilled-seed{seed}", teacher_path=teacher_path,
                        resume=args.resume, device=args.device)
        runs["student alone"].append(alone)
        runs["distilled student"].append(distilled)
        if _is_main():
            _print_result(f"seed {seed} student alone", alone)
            _print_result(f"seed {seed} distilled student", distilled)
    if not _is_main():
        return
    table = report.comparison_table(
        [(label, [m["test"] for m in ms], ms[-1]["cost"]) for label, ms in runs.items()])
    seconds = time.perf_counter() - started
    command = "pykd " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else "pykd demo"
    summary = (f"{args.dataset}: teacher {args.teacher_model} on {len(teacher_splits.train_y)} "
               f"labelled training images ({args.teacher_epochs} epochs), students "
               f"{args.student_model} on {len(splits.train_y)} ({args.epochs} epochs); "
               f"{len(splits.test_y)} test images; students' mean ± std over seeds "
               f"{','.join(map(str, args.seeds))}; {seconds:.0f} s")
    report.plot_curves({"teacher": teacher["history"],
                        **{f"{label} (seed {args.seeds[-1]})": ms[-1]["history"]
                           for label, ms in runs.items() if label != "teacher"}},
                       os.path.join(args.out, "curves.png"))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"`{command}`\n\n{summary}\n\n{table}\n")
    gains = [d["test"]["accuracy"] - a["test"]["accuracy"]
             for d, a in zip(runs["distilled student"], runs["student alone"])]
    report.write_json(os.path.join(args.out, "demo.json"), {
        "command": command, "seconds": seconds, "seeds": args.seeds,
        "test": {label: [m["test"] for m in ms] for label, ms in runs.items()},
        "cost": {label: ms[-1]["cost"] for label, ms in runs.items()},
        "distillation_gain": gains,
    })
    print(f"\n{summary}\n\n{table}\n")
    mean_gain = statistics.mean(gains)
    print(f"distilled - alone test accuracy: {mean_gain:+.4f} on average over {len(gains)} "
          f"seed(s); wrote {args.out}/results.md, curves.png, demo.json")


COMMANDS = [
    ("demo", cmd_demo, demo_arguments),
    ("train", cmd_train, train_arguments),
    ("distill", cmd_distill, distill_arguments),
    ("eval", cmd_eval, eval_arguments),
    ("sweep", cmd_sweep, sweep_arguments),
]


def build_parser():
    parser = Parser(prog="pykd", description="Knowledge distillation with fused PyTorch ops.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, run, add_arguments in COMMANDS:
        summary = run.__doc__.strip().splitlines()[0]
        sub = commands.add_parser(name, help=summary, description=summary)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv=None):
    from .data import DataError
    from .train import CheckpointError, distributed_teardown

    args = build_parser().parse_args(argv)
    try:
        with distributed_teardown():
            args.run(args)
    except (UsageError, DataError, CheckpointError, ValueError, OSError) as e:
        print(f"pykd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pykd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
