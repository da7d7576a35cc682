"""The loss step of a language-model head (forward + backward of the two head matmuls and the KD
loss) three ways, side by side: pykd.FusedLinearKDLoss, unfused pykd (matmuls + pykd.KDLoss) and
eager PyTorch (matmuls + F.kl_div on log_softmax + F.cross_entropy).

    THP_MEM_ALLOC_ENABLE=1 python bench/bench_fused_linear.py --rows 4096,1024 --dtypes fp32,bf16 \
        --rounds 3 --json bench/results/fused_linear_cpu.json

Every (rows, dtype, implementation) runs in a fresh child process, with the same environment, so
that each peak is its own: the child allocates its inputs, runs one warm-up step, one step whose
peak memory is measured, then `--repeats` timed steps. `--rounds` repeats that, the
implementations taking turns in each round (interleaved, so that a noisy spell of a shared
machine falls on all of them); the table gives the median of all timed steps with their range,
and the largest peak of the rounds. Peak memory is the peak resident set size (Linux
VmHWM, reset through /proc/self/clear_refs just before the measured step) minus the resident size
just before it: everything the step allocates and frees (logits, gradients, allocator slack), the
inputs excluded. The child runs with MALLOC_MMAP_THRESHOLD_=65536, so every buffer of 64 KiB or
more is its own mapping, returned to the system on free: the resident size then follows the live
bytes instead of glibc's cached heap. The setting is the same for all three.

The step: hidden [N, H] (requires grad), head weight [V, H] (requires grad), teacher hidden and
weight [N, H], [V, H] (no grad), labels with a quarter of the rows masked, T = 2,
0.5 * KD + 0.5 * CE (the eager form sums its per-row terms in float32). The losses of the three
are compared before anything is reported.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

IMPLEMENTATIONS = ("fused", "unfused_pykd", "eager")
TEMPERATURE, SOFT, HARD = 2.0, 0.5, 0.5


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident size


def _loss_fn(impl):
    import torch
    import torch.nn.functional as F

    import pykd

    if impl.startswith("fused"):  # "fused", or "fused:ROWS" for a given chunk_size
        chunk = int(impl.partition(":")[2]) if ":" in impl else None
        module = pykd.FusedLinearKDLoss(TEMPERATURE, SOFT, HARD, chunk_size=chunk)
        return lambda h, w, th, tw, labels: module(h, w, th, tw, labels)
    if impl == "unfused_pykd":
        module = pykd.KDLoss(TEMPERATURE, SOFT, HARD)

        def unfused(h, w, th, tw, labels):
            with torch.no_grad():
                teacher = th @ tw.t()
            return module(h @ w.t(), teacher, labels)
        return unfused

    def eager(h, w, th, tw, labels):
        # Per-row terms in the logits' dtype, their sums over rows in float32: in bfloat16,
        # F.cross_entropy's own mean over 4096 rows stops growing once its running sum is large
        # (it gave 3.19 instead of 8.19 here).
        student = h @ w.t()
        with torch.no_grad():
            teacher = th @ tw.t()
        valid = labels != -100
        count = valid.sum().clamp(min=1)
        kl = F.kl_div(F.log_softmax(student / TEMPERATURE, -1),
                      F.log_softmax(teacher / TEMPERATURE, -1), log_target=True,
                      reduction="none").sum(-1)
        soft = (kl.float() * valid).sum() / count * TEMPERATURE**2
        ce = F.cross_entropy(student, labels, ignore_index=-100, reduction="none")
        return SOFT * soft + HARD * ce.float().sum() / count
    return eager


def worker(impl, rows, hidden, vocab, dtype_name, repeats):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(dtype)
    h = randn(rows, hidden).requires_grad_()
    w = randn(vocab, hidden, scale=2 / hidden**0.5).requires_grad_()
    th, tw = randn(rows, hidden), randn(vocab, hidden, scale=2 / hidden**0.5)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::4] = -100
    fn = _loss_fn(impl)

    def step():
        h.grad = w.grad = None
        loss = fn(h, w, th, tw, labels)
        loss.backward()
        return loss.detach()

    loss = step()  # warm-up
    h.grad = w.grad = None
    gc.collect()
    before = _status_kib("VmRSS")
    _reset_peak()
    step()
    peak_kib = _status_kib("VmHWM") - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"impl": impl, "rows": rows, "hidden": hidden, "vocab": vocab, "dtype": dtype_name,
            "loss": loss.float().item(), "grad_norm": w.grad.float().norm().item(),
            "median_s": statistics.median(times), "times_s": times,
            "peak_mib": peak_kib / 1024, "threads": torch.get_num_threads()}


def _child(impl, rows, dtype, args, env):
    out = subprocess.run(
        [sys.executable, __file__, "--repeats", str(args.repeats), "--worker", impl, str(rows),
         str(args.hidden), str(args.vocab), dtype],
        env=env, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def _merge(runs):
    """One implementation's rounds: every timed step, the largest peak."""
    times = [t for run in runs for t in run["times_s"]]
    return dict(runs[0], times_s=times, median_s=statistics.median(times),
                peak_mib=max(run["peak_mib"] for run in runs),
                peaks_mib=[run["peak_mib"] for run in runs], rounds=len(runs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="4096,1024")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per child process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="child processes per implementation, taking turns")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                        help="of " + ", ".join(IMPLEMENTATIONS) + "; fused:ROWS for a chunk_size")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", nargs=5, metavar=("IMPL", "ROWS", "HIDDEN", "VOCAB", "DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, rows, hidden, vocab, dtype = args.worker
        print(json.dumps(worker(impl, int(rows), int(hidden), int(vocab), dtype, args.repeats)))
        return
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    impls = args.impls.split(",")
    results = []
    for rows in map(int, args.rows.split(",")):
        for dtype in args.dtypes.split(","):
            runs = {impl: [] for impl in impls}
            for _ in range(args.rounds):
                for impl in impls:
                    runs[impl].append(_child(impl, rows, dtype, args, env))
            group = [_merge(runs[impl]) for impl in impls]
            losses = [r["loss"] for r in group]
            tolerance = 1e-3 if dtype == "fp32" else 3e-2
            if max(losses) - min(losses) > tolerance * max(abs(x) for x in losses):
                raise SystemExit(f"losses disagree at N={rows} {dtype}: {losses}")
            results += group
    print(f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')} "
          f"threads={results[0]['threads']} H={args.hidden} V={args.vocab} "
          f"rounds={args.rounds} repeats={args.repeats}\n")
    print("| N | dtype | implementation | ms (median) | ms (min-max) | peak MiB | time / fused | "
          "peak / fused |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        fused = next((f for f in results if f["impl"].startswith("fused")
                      and f["rows"] == r["rows"] and f["dtype"] == r["dtype"]), r)
        print(f"| {r['rows']} | {r['dtype']} | {r['impl']} | {r['median_s'] * 1e3:.0f} | "
              f"{min(r['times_s']) * 1e3:.0f}-{max(r['times_s']) * 1e3:.0f} | "
              f"{r['peak_mib']:.0f} | {r['median_s'] / fused['median_s']:.2f}x | "
              f"{r['peak_mib'] / fused['peak_mib']:.2f}x |")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
