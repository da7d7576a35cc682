"""pykd.kd_loss against pure PyTorch, side by side in one process (`pykd bench`).

Forward + backward with the student requiring grad, medians after warm-up (CUDA events on a GPU).
Effective bandwidth is SPEC section 3's floor, 3 * N * C * element_size bytes, over pykd's time,
shown beside the measured bandwidth of a plain copy of one logits tensor in the same run.
"""
import argparse
import json
import statistics
import time

import torch

from . import reference
from .loss import kd_loss

CPU_SHAPES = [(65536, 10), (8192, 1000), (1024, 32000), (256, 128256)]
GPU_SHAPES = [(262144, 10), (65536, 1000), (16384, 32000), (8192, 128256)]
TEMPERATURE = 4.0


def implementations():
    """name -> loss function(student, teacher, temperature); compiled ones compile lazily."""
    return {
        "pykd": kd_loss,
        "eager_tutorial": reference.tutorial_kd_loss,
        "eager_kl_div": reference.kl_div_kd_loss,
        "compile_tutorial": torch.compile(reference.tutorial_kd_loss),
        "compile_kl_div": torch.compile(reference.kl_div_kd_loss),
    }


def median_ms(fn, device, warmup=2, repeats=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def copy_gbps(numel, dtype, device, repeats=5):
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, repeats=repeats)
    return 2 * src.nbytes / ms / 1e6


def forward_backward(loss_fn, student, teacher):
    def step():
        student.grad = None
        loss_fn(student, teacher, TEMPERATURE).backward()

    return step


def measure(shape, dtype, device, losses, repeats=5):
    """One row of the table: ms per implementation, pykd's GB/s and the copy GB/s."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    teacher = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    expected = reference.kd_loss(student.detach(), teacher, TEMPERATURE).double()
    got = kd_loss(student.detach(), teacher, TEMPERATURE).double()
    if not torch.allclose(got, expected, rtol=2e-2, atol=1e-4):
        raise RuntimeError(f"pykd.kd_loss disagrees with the reference at {shape} {dtype}")
    row = {"N": shape[0], "C": shape[1], "dtype": str(dtype).replace("torch.", "")}
    for name, fn in losses.items():
        row[f"{name}_ms"] = median_ms(forward_backward(fn, student, teacher), device, repeats=repeats)
    floor_bytes = 3 * student.numel() * student.element_size()
    row["pykd_gbps"] = floor_bytes / row["pykd_ms"] / 1e6
    row["copy_gbps"] = copy_gbps(student.numel(), dtype, device)
    return row


def format_table(rows):
    names = [key[:-3] for key in rows[0] if key.endswith("_ms")]
    header = ["N", "C", "dtype"] + [f"{n} ms" for n in names]
    header += ["best PyTorch / pykd", "pykd GB/s", "copy GB/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        others = [row[f"{n}_ms"] for n in names if n != "pykd"]
        cells = [str(row["N"]), str(row["C"]), row["dtype"]]
        cells += [f"{row[f'{n}_ms']:.2f}" for n in names]
        cells.append(f"{min(others) / row['pykd_ms']:.2f}x" if others else "-")
        cells += [f"{row['pykd_gbps']:.1f}", f"{row['copy_gbps']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_shapes(text):
    try:
        shapes = [tuple(int(x) for x in item.split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise argparse.ArgumentTypeError(f"shapes must look like 1024x32000,256x128256: {text!r}")
    return shapes


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def add_arguments(parser):
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--shapes", type=parse_shapes, help="NxC,... (default: SPEC's shapes)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--only", help="implementations to time beside pykd (default: all)")
    parser.add_argument("--repeats", type=_positive_int, default=5,
                        help="timed runs per median (default: %(default)s)")
    parser.add_argument("--json", help="also write the rows to this JSON file")


def run(args):
    from .train import resolve_device

    device = resolve_device(args.device)
    shapes = args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    dtypes = [getattr(torch, name, None) for name in args.dtypes.split(",")]
    if not all(isinstance(dtype, torch.dtype) and dtype.is_floating_point for dtype in dtypes):
        raise ValueError(f"--dtypes must name floating-point torch dtypes, got {args.dtypes!r}")
    losses = implementations()
    names = args.only.split(",") if args.only else list(losses)
    unknown = set(names) - set(losses)
    if unknown:
        raise ValueError(f"--only: unknown implementations {sorted(unknown)}; "
                         f"choose from {sorted(losses)}")
    losses = {name: losses[name] for name in dict.fromkeys(["pykd", *names])}  # pykd first, once
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            rows.append(measure(shape, dtype, device, losses, args.repeats))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device), "rows": rows}, f,
                      indent=1)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pykd bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
