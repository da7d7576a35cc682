"""Evaluation and reports: classification metrics, model cost, tables, plots and JSON files."""
import json
import math
import os
import statistics
import tempfile
import time

import torch
from torch import nn

__all__ = [
    "metrics_from_confusion", "model_cost", "count_macs", "inference_ms_per_image",
    "write_atomically", "write_json", "comparison_table", "plot_curves", "plot_sweep",
]


def metrics_from_confusion(confusion):
    """Accuracy and macro precision/recall/F1 from a [C, C] confusion matrix (rows: truth).

    A class never predicted has precision 0, a class absent from the data recall 0, as
    scikit-learn's ``zero_division=0``; the macro averages run over every class.
    """
    confusion = confusion.double()
    total = confusion.sum()
    tp = confusion.diagonal()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300),
                     torch.zeros_like(tp))
    return {
        "accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "examples": int(total),
    }


def count_macs(model, example):
    """Multiply-accumulates of one forward pass per example, counting Conv and Linear layers.

    Measured with forward hooks on a forward of `example` (a batch), so it follows the real
    shapes. Other layers (activations, pooling, normalisation) are not counted, as is usual.
    """
    total = 0

    def conv(module, inputs, output):
        nonlocal total
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        total += output.numel() * per_output

    def linear(module, inputs, output):
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return total // example.shape[0]


@torch.no_grad()
def inference_ms_per_image(model, images, repeats=30, warmup=5):
    """Median latency in milliseconds of a forward pass on one image (batch of 1)."""
    was_training = model.training
    model.eval()
    times = []
    for i in range(warmup + repeats):
        x = images[i % len(images)].unsqueeze(0)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return statistics.median(times) * 1e3


def model_cost(model, images):
    """Parameters, size in bytes (parameters and buffers), MACs and latency on `images`."""
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_bytes": sum(t.numel() * t.element_size()
                          for t in list(model.parameters()) + list(model.buffers())),
        "macs": count_macs(model, images[:2]),
        "inference_ms": inference_ms_per_image(model, images),
    }


def write_atomically(path, write, binary=False):
    """Calls write(file) on a temporary file in path's directory, fsyncs it and renames it over
    path (and fsyncs the directory): a crash at any point leaves either the old file or the new
    one, never a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


def write_json(path, obj):
    """Writes `obj` as JSON atomically (a reader never sees half a file)."""

    def write(f):
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

    write_atomically(path, write)


def _mean_std(values):
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def comparison_table(rows):
    """A markdown table of runs. `rows`: (label, [test metrics dict per seed], cost dict)."""
    lines = [
        "| model | accuracy | macro F1 | precision | recall | parameters | size (KiB) "
        "| MACs (M) | ms / image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, runs, cost in rows:
        cells = [_mean_std([r[key] for r in runs])
                 for key in ("accuracy", "f1", "precision", "recall")]
        lines.append(
            f"| {label} | " + " | ".join(cells)
            + f" | {cost['parameters']:,} | {cost['size_bytes'] / 1024:.0f} "
            f"| {cost['macs'] / 1e6:.1f} | {cost['inference_ms']:.2f} |"
        )
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(histories, path):
    """Training loss and validation accuracy per epoch; `histories`: {label: [epoch dicts]}."""
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in histories.items():
        epochs = [h["epoch"] for h in history]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label=label)
        acc_ax.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(temperatures, soft_weights, accuracy, path, baseline=None):
    """Heatmap of accuracy over temperature x soft weight, beside accuracy vs soft weight lines.

    `accuracy[i][j]` belongs to temperatures[i] and soft_weights[j]; `baseline` (the student
    trained alone) is drawn as a dashed line.
    """
    plt = _pyplot()
    fig, (heat_ax, line_ax) = plt.subplots(1, 2, figsize=(11, 4))
    image = heat_ax.imshow(accuracy, cmap="viridis", aspect="auto", origin="lower")
    heat_ax.set_xticks(range(len(soft_weights)), [f"{w:g}" for w in soft_weights])
    heat_ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    heat_ax.set(xlabel="soft weight (hard weight = 1 - soft weight)", ylabel="temperature",
                title="distilled student: test accuracy")
    for i, row in enumerate(accuracy):
        for j, value in enumerate(row):
            heat_ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=heat_ax)
    for t, row in zip(temperatures, accuracy):
        line_ax.plot(soft_weights, row, marker="o", label=f"T={t:g}")
    if baseline is not None:
        line_ax.axhline(baseline, color="k", linestyle="--", label="student alone")
    line_ax.set(xlabel="soft weight", ylabel="test accuracy", title="accuracy vs soft weight")
    line_ax.grid(alpha=0.3)
    line_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
