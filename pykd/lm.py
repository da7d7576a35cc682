"""Language-model distillation on bytes, end to end on the CPU in minutes: a teacher ByteLM is
trained on the source files of Python's standard library, then the same small student is trained
alone (cross-entropy) and distilled with pykd.FusedLinearKDLoss (from the teacher's hidden states
and output layer, never a [tokens, vocabulary] logits tensor), from the same initialisation and
batches; each is reported by its loss, perplexity and bits per byte on held-out files.

    python -m pykd.lm [--teacher-steps 400] [--student-steps 400] [--seeds 0,1,2]

The data: the top-level ``*.py`` files of the running Python's standard library, sorted by name;
every tenth file (the 1st, 11th, ...) is held out for the test split, every tenth from the 6th
for validation, the rest train. Each file is cut into windows of ``context`` + 1 bytes (inputs and
next-byte targets); a file's last window is padded, and its padding positions carry the label
ignore_index, which both the cross-entropy and the KD term skip (token masks). The first
``--train-bytes`` / ``--eval-bytes`` of the splits (in file order) are used. Results depend on
the Python version (its standard library), which the report names.
"""
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import cli, models
from .fused_linear import FusedLinearKDLoss

IGNORE = -100


def stdlib_files():
    """The top-level .py files of this Python's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def split_files(files):
    """{"train", "val", "test"}: lists of the files (see the module's docstring)."""
    splits = {"train": [], "val": [], "test": []}
    for i, path in enumerate(files):
        splits["test" if i % 10 == 0 else "val" if i % 10 == 5 else "train"].append(path)
    return splits


def windows(paths, context, max_bytes):
    """(inputs, labels): int64 [M, context] windows of the files' bytes, in file order, up to
    max_bytes bytes in all; labels are the next bytes, IGNORE where a file's last window is
    padded."""
    inputs, labels, used = [], [], 0
    for path in paths:
        data = path.read_bytes()[: max_bytes - used]
        used += len(data)
        if len(data) < 2:
            continue
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        count = math.ceil((len(tokens) - 1) / context)
        x = torch.zeros(count * context, dtype=torch.long)
        y = torch.full((count * context,), IGNORE, dtype=torch.long)
        x[: len(tokens) - 1] = tokens[:-1]
        y[: len(tokens) - 1] = tokens[1:]
        inputs.append(x.view(count, context))
        labels.append(y.view(count, context))
        if used >= max_bytes:
            break
    if not inputs:
        raise ValueError("no text: the standard library's files are empty or missing")
    return torch.cat(inputs), torch.cat(labels)


def batch_order(windows_count, batch, steps, seed):
    """The window indices of each step: shuffled passes over the windows, from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(windows_count, generator=gen)
                       for _ in range(math.ceil(steps * batch / windows_count))])
    return order[: steps * batch].view(steps, batch)


def train(model, data, order, lr, teacher=None, loss_fn=None):
    """Trains `model` (AdamW, cosine learning rate) on the steps of `order`: cross-entropy, or
    loss_fn(student hidden, head weight, teacher hidden, teacher head weight, labels, biases)
    with a teacher. Returns the seconds it took."""
    x_all, y_all = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, len(order))
    model.train()
    started = time.perf_counter()
    for rows in order:
        x, y = x_all[rows], y_all[rows]
        if teacher is None:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        else:
            with torch.no_grad():
                teacher_hidden = teacher.hidden(x)
            loss = loss_fn(model.hidden(x), model.head.weight, teacher_hidden,
                           teacher.head.weight, y, student_bias=model.head.bias,
                           teacher_bias=teacher.head.bias)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return time.perf_counter() - started


@torch.no_grad()
def evaluate(model, data, batch=64):
    """Mean next-byte cross-entropy (nats) over the valid positions of `data`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data[0]), batch):
        x, y = data[0][start:start + batch], data[1][start:start + batch]
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((y != IGNORE).sum())
    return total / count


def describe(loss):
    return f"{loss:.4f} nats, perplexity {math.exp(loss):.3f}, {loss / math.log(2):.3f} bits/byte"


def build_parser():
    """The pykd command line's parser and argument types (one-line errors, exit status 2)."""
    p = cli.Parser(prog="python -m pykd.lm", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-steps", type=cli.positive_int, default=400)
    p.add_argument("--student-steps", type=cli.positive_int, default=400)
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="windows per step")
    p.add_argument("--context", type=cli.positive_int, default=128, help="bytes per window")
    p.add_argument("--train-bytes", type=cli.positive_int, default=2_000_000)
    p.add_argument("--eval-bytes", type=cli.positive_int, default=100_000,
                   help="bytes of the validation and of the test split used")
    p.add_argument("--lr", type=cli.positive_float, default=2e-3)
    p.add_argument("--temperature", type=cli.positive_float, default=2.0)
    p.add_argument("--soft-weight", type=cli.weight, default=0.5)
    p.add_argument("--hard-weight", type=cli.weight, default=0.5)
    p.add_argument("--seeds", type=cli.seed_list, default=[0],
                   help="the students' seeds (initialisation and batches), comma-separated")
    return p


def run(args):
    if args.soft_weight == 0 and args.hard_weight == 0:
        raise ValueError("--soft-weight and --hard-weight are both 0: the student would learn "
                         "nothing")
    files = stdlib_files()
    splits = split_files(files)
    data = {name: windows(paths, args.context, args.train_bytes if name == "train"
                          else args.eval_bytes) for name, paths in splits.items()}
    tokens = {name: int((d[1] != IGNORE).sum()) for name, d in data.items()}
    log = sys.stderr
    print(f"data: Python {sys.version.split()[0]} standard library, {len(files)} files "
          f"({', '.join(f'{n} {len(p)} files / {tokens[n]} bytes' for n, p in splits.items())})",
          file=log, flush=True)

    torch.manual_seed(1000)
    teacher = models.byte_lm_teacher(args.context)
    seconds = train(teacher, data["train"],
                    batch_order(len(data["train"][0]), args.batch_size, args.teacher_steps, 1000),
                    args.lr)
    teacher.eval().requires_grad_(False)
    results = {"teacher": [(evaluate(teacher, data["val"]), evaluate(teacher, data["test"]))]}
    print(f"teacher ({args.teacher_steps} steps, {seconds:.0f} s): validation "
          f"{describe(results['teacher'][0][0])}", file=log, flush=True)

    loss_fn = FusedLinearKDLoss(temperature=args.temperature, soft_weight=args.soft_weight,
                                hard_weight=args.hard_weight, ignore_index=IGNORE)
    for seed in args.seeds:
        order = batch_order(len(data["train"][0]), args.batch_size, args.student_steps, seed)
        for name, teacher_or_none in (("student alone", None), ("student distilled", teacher)):
            torch.manual_seed(seed)
            student = models.byte_lm_student(args.context)
            seconds = train(student, data["train"], order, args.lr, teacher_or_none, loss_fn)
            scores = (evaluate(student, data["val"]), evaluate(student, data["test"]))
            results.setdefault(name, []).append(scores)
            print(f"{name}, seed {seed} ({args.student_steps} steps, {seconds:.0f} s): "
                  f"validation {describe(scores[0])}", file=log, flush=True)

    def cell(values):
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"

    print(f"Byte-level LM distillation, Python {sys.version.split()[0]} standard library; "
          f"students' seeds {','.join(map(str, args.seeds))}; T = {args.temperature:g}, "
          f"soft {args.soft_weight:g}, hard {args.hard_weight:g}\n")
    print("| model | parameters | validation loss (nats/byte) | validation perplexity | "
          "test loss | test bits/byte |")
    print("|---|---|---|---|---|---|")
    for name, scores in results.items():
        val, test = [s[0] for s in scores], [s[1] for s in scores]
        params = sum(p.numel() for p in (teacher if name == "teacher" else student).parameters())
        print(f"| {name} | {params:,} | {cell(val)} | {cell([math.exp(v) for v in val])} | "
              f"{cell(test)} | {cell([t / math.log(2) for t in test])} |")
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        print(f"python -m pykd.lm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
