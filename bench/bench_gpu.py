"""GPU benchmark of the KD loss: forward + backward, the student requiring grad (SPEC section 3).

Side by side in one process, at SPEC's GPU shapes in float32 and bfloat16: pykd, the eager
formulas (pykd.reference.tutorial_kd_loss and kl_div_kd_loss), torch.compile of each, and
Liger-Kernel's LigerKLDIVLoss when it is installed. Times are medians of CUDA-event timings after
warm-up; pykd's effective bandwidth 3*N*C*element_size / time is reported beside the copy bandwidth
measured in the same run; peak memory is what a step allocates beyond its inputs.

    python bench/bench_gpu.py            # writes bench/results/gpu.json and gpu.md

In the JSON, eager_ms / compile_ms are the faster of the two formulas (gpu.md names each).
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SHAPES = [(262144, 10), (65536, 1000), (16384, 32000), (8192, 128256)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TEMPERATURE = 2.0
CHECK_ROWS = 512  # rows checked against the float64 reference before timing


def require_gpu():
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                 "run it on a machine with a GPU and a CUDA build of torch and pykd.")
    import pykd  # noqa: F401  (registers the ops)

    if not torch._C._dispatch_has_kernel_for_dispatch_key("pykd::kd_loss", "CUDA"):
        sys.exit("bench_gpu.py: pykd was built without its CUDA kernels; rebuild it with a CUDA "
                 "build of torch and CUDA_HOME set (see README).")


def liger_loss():
    """LigerKLDIVLoss on log-probabilities, scaled as the other losses, or None if absent."""
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return None
    kl_div = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(student_logits, teacher_logits, temperature):
        classes = student_logits.shape[-1]
        log_ps = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
        log_pt = F.log_softmax(teacher_logits.reshape(-1, classes) / temperature, dim=-1)
        return kl_div(log_ps, log_pt) * temperature**2

    return loss


def time_ms(fn, warmup, reps):
    """Median milliseconds of fn() by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbps(warmup, reps):
    """Bandwidth of a 1 GiB device-to-device copy, bytes read plus written."""
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup, reps)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def fwd_bwd_step(loss_fn, student, teacher):
    def step():
        student.grad = None
        loss_fn(student, teacher, TEMPERATURE).backward()

    return step


def peak_extra_bytes(step):
    """Bytes a step allocates at its peak beyond what is allocated before it (the inputs)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def check_pykd(student, teacher, dtype):
    import pykd
    from pykd import reference

    s = student[:CHECK_ROWS].detach().requires_grad_()
    t = teacher[:CHECK_ROWS].detach()
    loss = pykd.kd_loss(s, t, TEMPERATURE)
    (grad,) = torch.autograd.grad(loss, [s])
    s64 = s.detach().double().requires_grad_()
    expected = reference.kd_loss(s64, t.double(), TEMPERATURE)
    (expected_grad,) = torch.autograd.grad(expected, [s64])
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), expected, rtol=rtol, atol=1e-6)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), expected_grad, rtol=rtol, atol=rtol * scale)


def measure(loss_fn, student, teacher, warmup, reps):
    """(median ms, peak extra bytes) of forward + backward, or (None, None) when out of memory."""
    step = fwd_bwd_step(loss_fn, student, teacher)
    try:
        ms = time_ms(step, warmup, reps)
        student.grad = None
        return ms, peak_extra_bytes(step)
    except torch.OutOfMemoryError:
        return None, None
    finally:
        student.grad = None
        torch.cuda.empty_cache()


def fastest(results, names):
    timed = [(results[n][0], n) for n in names if results[n][0] is not None]
    return min(timed)[1] if timed else names[0]


def bench_row(rows, classes, dtype_name, liger, warmup, reps):
    import pykd
    from pykd import reference

    dtype = DTYPES[dtype_name]
    gen = torch.Generator(device="cuda").manual_seed(0)
    student = (torch.randn(rows, classes, device="cuda", generator=gen) * 3).to(dtype)
    teacher = (torch.randn(rows, classes, device="cuda", generator=gen) * 3).to(dtype)
    student.requires_grad_()
    check_pykd(student, teacher, dtype)

    torch._dynamo.reset()
    losses = {
        "pykd": pykd.kd_loss,
        "eager tutorial": reference.tutorial_kd_loss,
        "eager kl_div": reference.kl_div_kd_loss,
        "compile tutorial": torch.compile(reference.tutorial_kd_loss),
        "compile kl_div": torch.compile(reference.kl_div_kd_loss),
    }
    if liger is not None:
        losses["liger"] = liger
    results = {}
    for name, loss_fn in losses.items():
        # Compilation happens in the first warm-up steps; give compiled code a few more.
        steps = warmup * 3 if name.startswith("compile") else warmup
        results[name] = measure(loss_fn, student, teacher, steps, reps)
        print(f"  {name:>16}: {results[name][0]} ms", flush=True)

    eager = fastest(results, ["eager tutorial", "eager kl_div"])
    compiled = fastest(results, ["compile tutorial", "compile kl_div"])
    pykd_ms, pykd_peak = results["pykd"]
    row = {
        "N": rows,
        "C": classes,
        "dtype": dtype_name,
        "pykd_ms": pykd_ms,
        "eager_ms": results[eager][0],
        "compile_ms": results[compiled][0],
        "liger_ms": results["liger"][0] if liger is not None else None,
        "pykd_gbps": 3 * rows * classes * student.element_size() / (pykd_ms * 1e-3) / 1e9,
        "pykd_peak_extra_bytes": pykd_peak,
        "eager_peak_extra_bytes": results[eager][1],
    }
    return row, {name: ms for name, (ms, _) in results.items()}


def fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def mib(value):
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def write_markdown(path, report, details, command):
    lines = [
        f"# KD loss forward + backward on {report['device']}",
        "",
        f"torch {report['torch']}; copy bandwidth {report['copy_gbps']:.0f} GB/s (1 GiB copy, "
        "read + write). Times are medians of CUDA-event timings in ms; pykd GB/s is "
        "3*N*C*element_size / time; peak is memory allocated beyond the inputs.",
        "",
        "| N | C | dtype | pykd ms | pykd GB/s | % of copy | eager tutorial | eager kl_div "
        "| compile tutorial | compile kl_div | liger | pykd peak MiB | eager peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, times in zip(report["rows"], details):
        lines.append(
            f"| {row['N']} | {row['C']} | {row['dtype']} | {fmt(row['pykd_ms'])} "
            f"| {row['pykd_gbps']:.0f} | {100 * row['pykd_gbps'] / report['copy_gbps']:.0f}% "
            f"| {fmt(times['eager tutorial'])} | {fmt(times['eager kl_div'])} "
            f"| {fmt(times['compile tutorial'])} | {fmt(times['compile kl_div'])} "
            f"| {fmt(times.get('liger'))} | {mib(row['pykd_peak_extra_bytes'])} "
            f"| {mib(row['eager_peak_extra_bytes'])} |"
        )
    lines += ["", "Command:", "", f"    {command}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    require_gpu()

    liger = liger_loss()
    if liger is None:
        print("Liger-Kernel is not installed: liger_ms is null")
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_gbps": copy_gbps(args.warmup, args.reps),
        "rows": [],
    }
    print(f"{report['device']}, torch {report['torch']}: copy {report['copy_gbps']:.0f} GB/s")
    details = []
    for dtype_name in DTYPES:
        for rows, classes in SHAPES:
            print(f"N={rows} C={classes} {dtype_name}", flush=True)
            row, times = bench_row(rows, classes, dtype_name, liger, args.warmup, args.reps)
            report["rows"].append(row)
            details.append(times)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    command = "python bench/bench_gpu.py " + " ".join(sys.argv[1:])
    write_markdown(os.path.join(args.out, "gpu.md"), report, details, command.strip())
    print(f"wrote {args.out}/gpu.json and gpu.md")


if __name__ == "__main__":
    main()
