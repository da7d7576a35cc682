"""Seed 003's multi-student framework: the student a selector should trust for each image, the
routed system (each image answered by the student the selector chooses), and its report.

The selector learns, from the training images, to name for each image the student that gives
its true class the highest probability; at test time every image goes to the student it names.
"""
import math
import statistics

import torch

from . import report
from .data import Splits

__all__ = ["best_student", "selector_splits", "metrics", "route", "summarise"]


def best_student(logits, y):
    """For each example, the index of the student (`logits`: one [N, C] per student) that gives
    its true class the highest probability (ties: the first)."""
    probs = torch.stack([l.softmax(-1) for l in logits])  # [K, N, C]
    return probs[:, torch.arange(len(y)), y].argmax(0)


def selector_splits(splits, logits, students):
    """The selector's data: the images of `splits`, each labelled with its best student.
    `logits`: per student, {"train", "val", "test"} -> its [N, C] logits on that split."""
    targets = {split: best_student([l[split] for l in logits], splits.split(split)[1])
               for split in ("train", "val", "test")}
    return Splits(splits.train_x, targets["train"], splits.val_x, targets["val"], splits.test_x,
                  targets["test"], classes=list(students), mean=list(splits.mean),
                  std=list(splits.std))


def metrics(predicted, y, num_classes):
    """Accuracy and macro precision/recall/F1 of predicted labels."""
    confusion = torch.bincount(y * num_classes + predicted, minlength=num_classes ** 2)
    return report.metrics_from_confusion(confusion.view(num_classes, num_classes))


def route(chosen, logits, y, num_classes):
    """The routed system: example i answered by student chosen[i] (`logits`: one [N, C] per
    student). Returns its "test" metrics; "oracle_accuracy", the share of examples some student
    gets right (what a perfect selector would reach); "picks_correct", the share of those for
    which the chosen student is right; "share", the fraction of examples sent to each student."""
    predictions = torch.stack([l.argmax(-1) for l in logits])  # [K, N]
    rows = torch.arange(len(y))
    correct = predictions == y
    some = correct.any(0)
    return {
        "test": metrics(predictions[chosen, rows], y, num_classes),
        "oracle_accuracy": float(some.double().mean()),
        "picks_correct": float(correct[chosen, rows][some].double().mean()) if some.any()
        else math.nan,
        "share": (torch.bincount(chosen, minlength=len(logits)).double() / len(y)).tolist(),
    }


def _cost(parts):
    return {key: sum(p[key] for p in parts) for key in ("parameters", "size_bytes", "macs")}


def _fewer(value, teacher):
    return f"{100 * (1 - value / teacher):.1f}%"


def summarise(students, teacher_test, teacher_cost, per_seed):
    """The report of :func:`pykd.cli.cmd_multistudent`'s runs, as seed 003's tables: accuracy
    (teacher, each student, the routed system), the selector, and compression against the
    teacher. `per_seed`: the dicts it collects. Returns {"tables", "bars", "summary"}."""
    mean_std = report.mean_std
    costs, selector_cost = per_seed[-1]["student_costs"], per_seed[-1]["selector_cost"]
    routed_macs = statistics.mean(s["routed"]["macs"] for s in per_seed)
    system_cost = {**_cost(costs + [selector_cost]), "macs": routed_macs}
    routed = [s["routed"]["test"] for s in per_seed]
    accuracy = report.comparison_table(
        [("teacher", [teacher_test], teacher_cost)]
        + [(f"{name} (distilled)", [s["students"][k] for s in per_seed], costs[k])
           for k, name in enumerate(students)]
        + [("selector + students (routed)", routed, system_cost)])

    best = [max(m["accuracy"] for m in s["students"]) for s in per_seed]
    gain = [r["accuracy"] - b for r, b in zip(routed, best)]
    oracle = [s["routed"]["oracle_accuracy"] for s in per_seed]
    picks = [s["routed"]["picks_correct"] for s in per_seed]
    rows = [["selector accuracy at naming the best student (test)",
             mean_std([s["selector"]["accuracy"] for s in per_seed])],
            ["the chosen student is right, of the images some student gets right",
             mean_std(picks)]]
    rows += [[f"images routed to {name}", mean_std([s["routed"]["share"][k] for s in per_seed])]
             for k, name in enumerate(students)]
    rows += [["oracle: some student is right (a perfect selector's accuracy)", mean_std(oracle)],
             ["routed system - best student (test accuracy)", mean_std(gain, signed=True)
              + f" (routed better on {sum(g > 0 for g in gain)} of {len(gain)} seeds)"]]
    selector = report.markdown_table(["selector", "value"], rows)

    def compression_row(label, cost):
        return [label, f"{cost['parameters']:,}",
                _fewer(cost["parameters"], teacher_cost["parameters"]),
                f"{cost['size_bytes'] / 1024:.0f}",
                _fewer(cost["size_bytes"], teacher_cost["size_bytes"]),
                f"{cost['macs'] / 1e6:.2f}", _fewer(cost["macs"], teacher_cost["macs"])]

    compression = report.markdown_table(
        ["compression with respect to the teacher", "parameters", "fewer than teacher",
         "size (KiB)", "smaller than teacher", "MACs (M) / image", "fewer than teacher"],
        [compression_row(name, cost) for name, cost in zip(students, costs)]
        + [compression_row("selector", selector_cost)]
        + [compression_row(f"{name} + selector", _cost([cost, selector_cost]))
           for name, cost in zip(students, costs)]
        + [compression_row("all students + selector (the routed system; MACs: selector + "
                           "the chosen student, on average)", system_cost)])
    bars = ([("teacher", teacher_test["accuracy"], 0.0)]
            + [(name, *_spread([s["students"][k]["accuracy"] for s in per_seed]))
               for k, name in enumerate(students)]
            + [("routed", *_spread([r["accuracy"] for r in routed])),
               ("oracle", *_spread(oracle))])
    return {"tables": [accuracy, selector, compression], "bars": bars,
            "summary": {"routed_minus_best_student": gain, "oracle_accuracy": oracle,
                        "picks_correct": picks, "routed_macs": routed_macs}}


def _spread(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
