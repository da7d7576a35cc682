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
    "metrics_from_confusion", "model_cost", "count_macs", "latency_ms", "write_files",
    "write_atomically", "write_json", "write_text", "markdown_table", "mean_std",
    "comparison_table", "curves_figure", "sweep_figure", "bars_figure", "save_figure",
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
def latency_ms(model, example, repeats=100, warmup=10, threads=None):
    """Latency of one forward pass on `example` (one image, [1, C, H, W]), in milliseconds.

    Measured as robustly as one process can: a fixed number of threads (`threads`, default the
    current torch setting, restored afterwards), `warmup` untimed passes, then the median of
    `repeats` timed ones (CUDA synchronised around each). Returns {"ms", "threads", "repeats"}.
    """
    was_training = model.training
    model.eval()
    previous = torch.get_num_threads()
    threads = threads or previous
    torch.set_num_threads(threads)
    times = []
    try:
        for i in range(warmup + repeats):
            if example.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(example)
            if example.is_cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
        model.train(was_training)
    return {"ms": statistics.median(times) * 1e3, "threads": threads, "repeats": repeats}


def model_cost(model, example):
    """Parameters, size in bytes (parameters and buffers) and MACs per image, from a forward of
    `example` (a batch of inputs of the right shape; zeros will do). Latency is not part of it:
    it depends on the machine's load at that moment (see :func:`latency_ms`)."""
    was_training = model.training
    model.eval()
    try:
        macs = count_macs(model, example)
    finally:
        model.train(was_training)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_bytes": sum(t.numel() * t.element_size()
                          for t in list(model.parameters()) + list(model.buffers())),
        "macs": macs,
    }


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_files(files):
    """Writes several files so that none is seen half-written and all appear together.

    `files`: (path, write, binary) triples; write(f) fills a temporary file in the path's
    directory. Every temporary file is written and fsynced first; only then are they renamed over
    their paths, in order, and the directories fsynced. An error (or Ctrl-C) before the renames
    leaves every old file as it was and no temporary file behind.
    """
    for path, _, _ in files:  # the renames must not fail half-way for this reason
        if os.path.isdir(path):
            raise IsADirectoryError(f"cannot write {path}: it is a directory")
    staged = []
    try:
        for path, write, binary in files:
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
            staged.append((tmp, path))
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
            with os.fdopen(fd, "wb" if binary else "w") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for directory in {os.path.dirname(os.path.abspath(path)) for _, path in staged}:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # makes the renames themselves durable
        finally:
            os.close(dir_fd)


def write_atomically(path, write, binary=False):
    """Calls write(file) on a temporary file beside `path`, fsyncs it and renames it over `path`:
    a crash at any point leaves either the old file or the new one, never a torn file."""
    write_files([(path, write, binary)])


def json_writer(obj):
    """A `write` for :func:`write_files` that writes `obj` as indented JSON."""

    def write(f):
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

    return write


def write_json(path, obj):
    """Writes `obj` as JSON atomically (a reader never sees half a file)."""
    write_atomically(path, json_writer(obj))


def write_text(path, text):
    write_atomically(path, lambda f: f.write(text))


def mean_std(values, signed=False):
    """"mean ± std" of the values (to 4 decimals; the value alone when there is one); `signed`
    writes the mean's sign (for differences)."""
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.4f}"
    return f"{statistics.mean(values):{sign}.4f} ± {statistics.stdev(values):.4f}"


def markdown_table(header, rows):
    """A markdown table from a header and rows of cells (strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_table(rows):
    """A markdown table of runs. `rows`: (label, [test metrics dict per seed], cost dict);
    metrics over several seeds are shown as mean ± standard deviation."""
    return markdown_table(
        ["model", "accuracy", "macro F1", "precision", "recall", "parameters", "size (KiB)",
         "MACs (M)"],
        [[label] + [mean_std([r[key] for r in runs])
                    for key in ("accuracy", "f1", "precision", "recall")]
         + [f"{cost['parameters']:,}", f"{cost['size_bytes'] / 1024:.0f}",
            f"{cost['macs'] / 1e6:.1f}"]
         for label, runs, cost in rows])


def save_figure(figure, path):
    """Saves a matplotlib figure as PNG, atomically."""
    write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=100), binary=True)


def _figure(panels, width):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(width * panels, 4), layout="tight")
    return figure, figure.subplots(1, panels, squeeze=False)[0]


# The per-epoch curves: (history key, y label, title). Losses of different objectives get their
# own axes: every run's cross-entropy with the labels, and the distilled runs' KD term.
CURVES = [
    ("train_cross_entropy", "cross-entropy", "training cross-entropy with the labels"),
    ("train_kd", "T² · KL(teacher or peer ‖ student)",
     "training KD term (distilled and mutual runs)"),
    ("val_accuracy", "accuracy", "validation accuracy"),
]


def curves_figure(runs):
    """Per-epoch curves of groups of runs: `runs` maps a label to a list of histories (one per
    seed). Each group is drawn as its mean over the seeds, with a band of ± one standard
    deviation when there are several; epochs are whole numbers on the x axis."""
    from matplotlib.ticker import MaxNLocator

    curves = [c for c in CURVES if any(c[0] in h[0] for hs in runs.values() for h in hs if h)]
    figure, axes = _figure(len(curves), 5)
    for ax, (key, ylabel, title) in zip(axes, curves):
        for k, (label, histories) in enumerate(runs.items()):
            by_epoch = {}
            for history in histories:
                for record in history:
                    if key in record:
                        by_epoch.setdefault(record["epoch"], []).append(record[key])
            if not by_epoch:
                continue
            epochs = sorted(by_epoch)
            mean = [statistics.mean(by_epoch[e]) for e in epochs]
            n = len(histories)
            line, = ax.plot(epochs, mean, marker="o", color=f"C{k}",  # one colour per group
                            label=label if n == 1 else f"{label} (mean ± std of {n} seeds)")
            if n > 1:
                std = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0
                       for e in epochs]
                ax.fill_between(epochs, [m - s for m, s in zip(mean, std)],
                                [m + s for m, s in zip(mean, std)], color=line.get_color(),
                                alpha=0.2, linewidth=0)
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figure


def bars_figure(bars, ylabel, title):
    """A bar per (label, mean, std), with the std as an error bar and the mean written in it."""
    figure, (ax,) = _figure(1, max(5, 1.3 * len(bars)))
    labels, means, stds = zip(*bars)
    ax.bar(range(len(bars)), means, yerr=stds, capsize=4, color=[f"C{k}" for k in range(len(bars))])
    for k, value in enumerate(means):
        ax.text(k, value, f"{value:.3f} ", ha="center", va="top", color="w", fontsize=8)
    ax.set_xticks(range(len(bars)), labels, rotation=20, ha="right")
    low = min(m - s for m, s in zip(means, stds))
    ax.set(ylabel=ylabel, title=title, ylim=(max(0.0, low - 0.05), 1.0))
    ax.grid(alpha=0.3, axis="y")
    return figure


def sweep_figure(temperatures, soft_weights, accuracy, chosen=None, baseline=None):
    """Heatmap of validation accuracy over temperature x soft weight, beside accuracy vs soft
    weight lines. `accuracy[i][j]` belongs to temperatures[i] and soft_weights[j]; `chosen`
    (i, j) is outlined; `baseline` (the student trained alone) is a dashed line."""
    from matplotlib.patches import Rectangle

    figure, (heat_ax, line_ax) = _figure(2, 5.5)
    image = heat_ax.imshow(accuracy, cmap="viridis", aspect="auto", origin="lower")
    heat_ax.set_xticks(range(len(soft_weights)), [f"{w:g}" for w in soft_weights])
    heat_ax.set_yticks(range(len(temperatures)), [f"{t:g}" for t in temperatures])
    heat_ax.set(xlabel="soft weight (hard weight = 1 - soft weight)", ylabel="temperature",
                title="distilled student: validation accuracy")
    for i, row in enumerate(accuracy):
        for j, value in enumerate(row):
            heat_ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="w", fontsize=8)
    if chosen is not None:
        i, j = chosen
        heat_ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="r",
                                    linewidth=2, label="chosen"))
        heat_ax.legend(loc="upper left", fontsize=8)
    figure.colorbar(image, ax=heat_ax)
    for t, row in zip(temperatures, accuracy):
        line_ax.plot(soft_weights, row, marker="o", label=f"T={t:g}")
    if baseline is not None:
        line_ax.axhline(baseline, color="k", linestyle="--", label="student alone")
    line_ax.set(xlabel="soft weight", ylabel="validation accuracy",
                title="validation accuracy vs soft weight")
    line_ax.grid(alpha=0.3)
    line_ax.legend(fontsize=8)
    return figure
