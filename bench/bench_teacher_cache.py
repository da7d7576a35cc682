"""What a teacher cache costs, writing and reading (issue 13's goals: writing never slower than
the teacher's inference, reading < 5% of a distillation epoch):

    python bench/bench_teacher_cache.py [--rows 8192] [--classes 32000] [--top-k 64]

1. Vocabulary scale, synthetic: pykd.teacher_cache.write_cache of `rows` teacher rows of
   `classes` logits (one batch of 256 random rows given again and again, so that the time is the
   cache's own: top-k, log-sum-exp and writing, fsync included), and TeacherCache.lookup of
   shuffled batches of 1024 rows, against sparse_kd_loss forward+backward on such a batch (the
   least a distillation step does with what it read).
2. digits end to end: `pykd cache-teacher` then `pykd distill --teacher-cache` (in this process),
   timing every lookup the training loop makes against the whole run.
"""
import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import pykd
from pykd import cli, teacher_cache

BATCH = 256


def vocabulary_scale(rows, classes, top_k, folder):
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(BATCH, classes, generator=gen) * 3

    def batches():
        for start in range(0, rows, BATCH):
            yield batch[:min(BATCH, rows - start)]

    path = folder / "synthetic.safetensors"
    header = {"classes": [str(c) for c in range(classes)], "teacher": {"model": "synthetic"},
              "data": {"spec": "synthetic", "examples": rows}}
    cache, timings = teacher_cache.write_cache(path, batches(), rows=rows, num_classes=classes,
                                               top_k=top_k, temperature=2.0, header=header)
    write_s = timings["write_s"]
    print(f"write: {rows} rows x {classes} classes, top {top_k}: {write_s:.2f} s = "
          f"{rows / write_s:.0f} rows/s ({rows * classes * 4 / write_s / 1e9:.2f} GB/s of float32 "
          f"logits in), {path.stat().st_size / 2**20:.1f} MiB")

    order = torch.randperm(rows, generator=gen)
    step_rows = 1024
    read, loss_times = [], []
    student = torch.randn(step_rows, classes, generator=gen).requires_grad_()
    for start in range(0, rows - step_rows + 1, step_rows):
        before = time.perf_counter()
        values, indices, lse = cache.lookup(order[start:start + step_rows])
        read.append(time.perf_counter() - before)
        before = time.perf_counter()
        student.grad = None
        pykd.sparse_kd_loss(student, values, indices, 2.0, teacher_lse=lse).backward()
        loss_times.append(time.perf_counter() - before)
    r, s = statistics.median(read), statistics.median(loss_times)
    print(f"read: {len(read)} shuffled batches of {step_rows} rows: median {r * 1e3:.2f} ms "
          f"({step_rows / r:.0f} rows/s) vs sparse_kd_loss fwd+bwd on the batch {s * 1e3:.1f} ms: "
          f"reading is {100 * r / (r + s):.1f}% of (read + loss)")


def digits(folder, epochs):
    runs = folder / "runs"

    def run(argv):
        with contextlib.redirect_stdout(sys.stderr):
            code = cli.main([str(a) for a in argv])
        if code not in (None, 0):
            raise SystemExit(f"pykd {argv[0]} failed ({code})")

    run(["train", "--model", "keras-teacher", "--epochs", 2, "--out", runs, "--no-progress"])
    cache = folder / "top5.safetensors"
    run(["cache-teacher", "--teacher", runs / "keras-teacher.pt", "--top-k", 5, "--out", cache,
         "--no-progress"])
    spent = []
    lookup = teacher_cache.TeacherCache.lookup

    def timed_lookup(self, rows):
        before = time.perf_counter()
        try:
            return lookup(self, rows)
        finally:
            spent.append(time.perf_counter() - before)

    teacher_cache.TeacherCache.lookup = timed_lookup
    try:
        before = time.perf_counter()
        run(["distill", "--teacher-cache", cache, "--student", "keras-student", "--epochs",
             epochs, "--out", runs, "--no-progress"])
        whole = time.perf_counter() - before
    finally:
        teacher_cache.TeacherCache.lookup = lookup
    print(f"digits: distill --teacher-cache, {epochs} epochs: {whole:.1f} s in all (evaluation "
          f"and start-up included), {len(spent)} lookups took {sum(spent) * 1e3:.1f} ms = "
          f"{100 * sum(spent) / whole:.2f}% of the run")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        vocabulary_scale(args.rows, args.classes, args.top_k, Path(tmp))
        digits(Path(tmp), args.epochs)
