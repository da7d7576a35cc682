"""pykd.kd_loss against pure PyTorch, side by side in one process (`pykd bench`).

Forward + backward with the student requiring grad, medians after warm-up (CUDA events on a GPU).
Effective bandwidth is SPEC section 3's floor, 3 * N * C * element_size bytes, over pykd's time,
shown beside the measured bandwidth of a plain copy of one logits tensor in the same run. A shape
may carry a masked fraction (`4x512x32000@0.25`): that share of the rows gets the label
ignore_index, and every form computes the masked loss (the batch mean over the valid rows). On the
CPU run it with THP_MEM_ALLOC_ENABLE=1 (huge pages for every torch allocation, SPEC section 3);
the table's header says whether it was set.
"""
import argparse
import os
import statistics
import time

import torch

from . import reference, report
from .loss import kd_loss

# (shape, masked fraction): SPEC section 3's shapes, the seeds' own batches first.
CPU_SHAPES = [((64, 10), 0.0), ((256, 100), 0.0), ((65536, 10), 0.0), ((8192, 1000), 0.0),
              ((1024, 32000), 0.0), ((256, 128256), 0.0), ((4, 512, 32000), 0.25)]
GPU_SHAPES = [((262144, 10), 0.0), ((65536, 1000), 0.0), ((16384, 32000), 0.0),
              ((8192, 128256), 0.0), ((8, 2048, 128256), 0.25)]
TEMPERATURE = 4.0
IGNORE_INDEX = -100


def implementations():
    """name -> loss function(student, teacher, temperature, labels); compiled ones compile
    lazily. labels is None, or marks masked rows with IGNORE_INDEX. Take fresh ones for each shape
    and dtype (after torch._dynamo.reset()): past torch._dynamo's recompile limit (8 shapes or
    dtypes of one function) a compiled function silently runs eager."""
    torch._dynamo.reset()
    def pykd_loss(student, teacher, temperature, labels):
        return kd_loss(student, teacher, temperature, labels=labels, ignore_index=IGNORE_INDEX)

    return {
        "pykd": pykd_loss,
        "eager_tutorial": reference.tutorial_kd_loss,
        "eager_kl_div": reference.kl_div_kd_loss,
        "compile_tutorial": torch.compile(reference.tutorial_kd_loss),
        "compile_kl_div": torch.compile(reference.kl_div_kd_loss),
    }


def shape_name(shape, masked):
    name = "x".join(map(str, shape))
    return f"{name}@{masked:g}" if masked else name


def masking_labels(shape, masked, device):
    """None without masking; else labels (the logits' leading shape) of which the first
    round(masked * rows) rows in a fixed random order are IGNORE_INDEX."""
    if not masked:
        return None
    rows = shape[:-1]
    labels = torch.zeros(rows, dtype=torch.long).reshape(-1)
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(1))
    labels[order[: round(masked * labels.numel())]] = IGNORE_INDEX
    return labels.reshape(rows).to(device)


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


def forward_backward(loss_fn, student, teacher, labels=None):
    def step():
        student.grad = None
        loss_fn(student, teacher, TEMPERATURE, labels).backward()

    return step


def saved_bytes(loss_fn, student, teacher, labels=None):
    """Bytes of the distinct tensors autograd keeps from the loss's forward for its backward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(student, teacher, TEMPERATURE, labels)
    del loss
    return sum(storages.values())


def measure(shape, masked, dtype, device, losses, repeats=5):
    """One row of the table: ms and saved bytes per implementation, pykd's GB/s, the copy's."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    teacher = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    labels = masking_labels(shape, masked, device)
    expected = reference.kd_loss(student.detach(), teacher, TEMPERATURE, labels=labels,
                                 ignore_index=IGNORE_INDEX).double()
    for name, fn in losses.items():
        got = fn(student.detach(), teacher, TEMPERATURE, labels).double()
        # The PyTorch forms accumulate in the logits' dtype: in bfloat16 their loss may be a few
        # of its rounding steps off (the eager tutorial formula: 3 at (1024, 32000)).
        rtol = 2e-2 if name == "pykd" else max(2e-2, 8 * torch.finfo(dtype).eps)
        if not torch.allclose(got, expected, rtol=rtol, atol=1e-4):
            raise RuntimeError(f"{name} disagrees with the reference at {shape} {dtype}: "
                               f"{got.item():.6g} against {expected.item():.6g}")
    row = {"shape": shape_name(shape, masked), "dtype": str(dtype).replace("torch.", "")}
    for name, fn in losses.items():
        step = forward_backward(fn, student, teacher, labels)
        row[f"{name}_ms"] = median_ms(step, device, repeats=repeats)
        row[f"{name}_saved_bytes"] = saved_bytes(fn, student, teacher, labels)
    floor_bytes = 3 * student.numel() * student.element_size()
    row["pykd_gbps"] = floor_bytes / row["pykd_ms"] / 1e6
    row["copy_gbps"] = copy_gbps(student.numel(), dtype, device)
    row["gradient_bytes"] = student.numel() * student.element_size()
    return row


def format_table(rows):
    names = [key[:-3] for key in rows[0] if key.endswith("_ms")]
    header = ["shape", "dtype"] + [f"{n} ms" for n in names]
    header += ["best PyTorch / pykd", "pykd GB/s", "copy GB/s",
               "saved by pykd / one gradient", "least saved by PyTorch / one gradient"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        others = [n for n in names if n != "pykd"]
        cells = [row["shape"], row["dtype"]]
        cells += [f"{row[f'{n}_ms']:.3f}" if row[f"{n}_ms"] < 1 else f"{row[f'{n}_ms']:.2f}"
                  for n in names]
        best = min(row[f"{n}_ms"] for n in others) if others else None
        cells.append(f"{best / row['pykd_ms']:.2f}x" if others else "-")
        cells += [f"{row['pykd_gbps']:.1f}", f"{row['copy_gbps']:.1f}"]
        cells.append(f"{row['pykd_saved_bytes'] / row['gradient_bytes']:.2f}")
        least = min((row[f"{n}_saved_bytes"] for n in others), default=None)
        cells.append(f"{least / row['gradient_bytes']:.2f}" if others else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_shapes(text):
    """'1024x32000,4x512x32000@0.25' -> [((1024, 32000), 0.0), ((4, 512, 32000), 0.25)]."""
    shapes = []
    try:
        for item in text.split(","):
            dims, _, masked = item.partition("@")
            shapes.append((tuple(int(x) for x in dims.split("x")), float(masked or 0)))
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) < 2 or min(shape) < 1 or not 0 <= masked < 1
                         for shape, masked in shapes):
        raise argparse.ArgumentTypeError(
            f"shapes must look like 1024x32000,4x512x32000@0.25 (a masked fraction in [0, 1) "
            f"after @): {text!r}")
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
    parser.add_argument("--shapes", type=parse_shapes,
                        help="NxC or BxLxV, each with an optional masked fraction @f "
                             "(default: SPEC's shapes)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--only", help="implementations to time beside pykd (default: all)")
    parser.add_argument("--repeats", type=_positive_int, default=5,
                        help="timed runs per median (default: %(default)s)")
    parser.add_argument("--json", help="also write the rows to this JSON file (a new file, "
                                       "unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the --json file if it exists")


def run(args):
    from .train import resolve_device

    device = resolve_device(args.device)
    if args.json and os.path.exists(args.json) and not args.overwrite:
        raise ValueError(f"--json: {args.json} exists; pass --overwrite to replace it")
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
    names = list(dict.fromkeys(["pykd", *names]))  # pykd first, once
    rows = []
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
    for shape, masked in shapes:
        for dtype in dtypes:
            losses = implementations()
            losses = {name: losses[name] for name in names}
            rows.append(measure(shape, masked, dtype, device, losses, args.repeats))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"THP_MEM_ALLOC_ENABLE={'1' if thp else 'unset'}\n")
    print(format_table(rows))
    if args.json:
        report.write_json(args.json, {"torch": torch.__version__, "device": str(device),
                                      "thp": thp, "rows": rows})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pykd bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
