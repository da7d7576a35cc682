"""GPU benchmark of pykd's losses, forward + backward, the student requiring grad (issue 10).

Side by side in one process, fp32 and bf16, at SPEC section 3's GPU shapes (262144, 10),
(65536, 1000), (16384, 32000), (8192, 128256) and the token-level (8, 2048, 128256) with a quarter
of the rows masked (labels == -100):

- KD loss (forward KL, T = 2): pykd.kd_loss in one pass; eager PyTorch as the tutorial's formula
  and as F.kl_div(log_target=True) (masked-mean forms for masked rows); both under torch.compile;
  Liger-Kernel's LigerKLDIVLoss on log_softmax(x / T) (masked rows selected out first) and
  LigerJSD(beta=0), which is forward KL with a mask, when liger_kernel imports.
- JSD (beta = 0.5, TRL / Liger convention): pykd.kd_loss(beta=0.5) against LigerJSD(beta=0.5);
  its time over pykd's forward KL time.
- Hint loss: pykd.hint_loss against the F.mse_loss loop (pykd.reference.hint_loss), eager and
  compiled, K = 4 and 16 ResNet-like pairs of batch 128.

Every form is checked before it is timed: pykd, eager and Liger forms against the float64
reference on the first rows, compiled forms against pykd on the full tensors. A form that differs
is timed but kept out of the goals; one that fails (out of memory, say) is recorded and the run
goes on. Times are medians of CUDA-event timings after warm-up, rotating among several input sets
when one set would fit in L2; effective bandwidth is SPEC's floor 3 * N * C * element_size (the
student's gradient written once, s and t read once) over the time, beside a 1 GiB copy measured in
the same run (bytes read plus written); peak memory is torch.cuda.max_memory_allocated during a
step minus what was allocated before it (the inputs).

    python bench/bench_gpu.py --out bench/results      # writes gpu.json and gpu.md there
    python bench/bench_gpu.py --dry-run                # the plan, no GPU needed

Compiled forms run last and only while --budget-s lasts (compilation takes most of their time);
gpu.json and gpu.md are rewritten after every shape, so a run cut short keeps what it measured.
"""
import argparse
import datetime
import inspect
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import zlib

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from gpu_exercise import reference_kd  # noqa: E402  (the float64 reference, beta and masks too)

KD_SHAPES = [((262144, 10), 0.0), ((65536, 1000), 0.0), ((16384, 32000), 0.0),
             ((8192, 128256), 0.0), ((8, 2048, 128256), 0.25)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TEMPERATURE = 2.0
JSD_BETA = 0.5
IGNORE = -100
CHECK_ROWS = 256  # rows checked in float64 (fewer for long rows: check_rows)
HINT_BATCH = 128
HINT_MAPS = [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
HINT_PAIRS = [4, 16]
# (rtol, atol relative to the largest expected |value|) for "ok"; up to 10 times that is
# "inexact" (timed and counted), beyond is "differs" (timed, not counted in the goals).
CHECK_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 8e-3)}
KD_FORMS = ["pykd", "eager tutorial", "eager kl_div", "liger kl_div", "liger jsd beta=0",
            "compile tutorial", "compile kl_div"]
JSD_FORMS = ["pykd jsd", "liger jsd"]
# "cpu" only to test this script without a GPU (--device cpu, with small --shapes): host timers,
# no peak memory, a smaller copy.
DEVICE = "cuda"


def on_gpu():
    return DEVICE == "cuda"


def synchronize():
    if on_gpu():
        torch.cuda.synchronize()


def empty_cache():
    if on_gpu():
        torch.cuda.empty_cache()


def check_rows(classes):
    return max(8, min(CHECK_ROWS, (1 << 22) // classes))


def import_pykd():
    """pykd as installed; else from this checkout (an in-place build)."""
    try:
        import pykd
    except ImportError:
        sys.path.insert(1, os.path.dirname(HERE))
        import pykd
    return pykd


# ---------------------------------------------------------------------------------------------
# The forms. Each is fn(student, teacher, labels) -> loss, labels None when no row is masked.

def masked_mean(per_row, labels):
    valid = (labels.reshape(-1) != IGNORE).to(per_row.dtype)
    return (per_row.reshape(-1) * valid).sum() / valid.sum().clamp(min=1)


def tutorial(s, t, labels, temperature=TEMPERATURE):
    """The PyTorch tutorial's soft-target loss, as written there; the masked mean when masked."""
    soft_targets = F.softmax(t / temperature, dim=-1)
    soft_prob = F.log_softmax(s / temperature, dim=-1)
    if labels is None:
        rows = soft_prob.numel() // soft_prob.shape[-1]
        return torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / rows * temperature**2
    per_row = torch.sum(soft_targets * (soft_targets.log() - soft_prob), dim=-1)
    return masked_mean(per_row, labels) * temperature**2


def kl_div(s, t, labels, temperature=TEMPERATURE):
    """F.kl_div on log-probabilities (log_target=True), batchmean; the masked mean when masked."""
    classes = s.shape[-1]
    log_ps = F.log_softmax(s.reshape(-1, classes) / temperature, dim=-1)
    log_pt = F.log_softmax(t.reshape(-1, classes) / temperature, dim=-1)
    if labels is None:
        return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temperature**2
    per_row = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
    return masked_mean(per_row, labels) * temperature**2


def pykd_form(pykd, beta):
    params = inspect.signature(pykd.kd_loss).parameters
    if beta and "beta" not in params:
        return None, "pykd.kd_loss has no beta parameter"
    has_labels = "labels" in params

    def fn(s, t, labels):
        kwargs = {"beta": beta} if beta else {}
        if labels is not None:
            kwargs.update(labels=labels, ignore_index=IGNORE)
        return pykd.kd_loss(s, t, TEMPERATURE, **kwargs)

    if not has_labels:
        def fn_unmasked(s, t, labels):
            if labels is not None:
                raise NotImplementedError("pykd.kd_loss has no labels parameter")
            return fn(s, t, None)
        return fn_unmasked, ""
    return fn, ""


def liger_forms():
    """{name: fn or None}, and why not. Liger's losses take log-probabilities and no temperature:
    log_softmax(x / T) first (torch's), the result times T^2. LigerKLDIVLoss has no mask: masked
    rows are selected out first (a copy, as a user would do); LigerJSD masks by shift_labels."""
    try:
        import liger_kernel
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except Exception as error:  # noqa: BLE001  (absent, or triton missing)
        return {}, f"liger_kernel not importable ({type(error).__name__}: {error})"
    version = getattr(liger_kernel, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version("liger-kernel")
        except Exception:  # noqa: BLE001
            version = "?"
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def logprobs(x):
        return F.log_softmax(x.reshape(-1, x.shape[-1]) / TEMPERATURE, dim=-1)

    def liger_kl(s, t, labels):
        if labels is not None:
            valid = labels.reshape(-1) != IGNORE
            s, t = s.reshape(-1, s.shape[-1])[valid], t.reshape(-1, t.shape[-1])[valid]
        return kl(logprobs(s), logprobs(t)) * TEMPERATURE**2

    def jsd(beta):
        module = LigerJSD(beta=beta, ignore_index=IGNORE)

        def fn(s, t, labels):
            shift = None if labels is None else labels.reshape(-1).long()
            return module(logprobs(s), logprobs(t), shift) * TEMPERATURE**2
        return fn

    return {"liger kl_div": liger_kl, "liger jsd beta=0": jsd(0.0),
            "liger jsd": jsd(JSD_BETA), "version": version}, ""


# ---------------------------------------------------------------------------------------------
# Measuring.

def time_ms(step, warmup, reps, sets):
    """Median milliseconds of step(i) by CUDA events, i cycling over the input sets."""
    for i in range(warmup):
        step(i % sets)
    times = []
    for i in range(reps):
        if not on_gpu():
            begin = time.perf_counter()
            step(i % sets)
            times.append((time.perf_counter() - begin) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(i % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_gbps(warmup, reps):
    """Bandwidth of a 1 GiB device-to-device copy, bytes read plus written."""
    numel = 1 << (28 if on_gpu() else 24)
    src = torch.empty(numel, device=DEVICE, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda i: dst.copy_(src), warmup, reps, 1)
    src = dst = None  # noqa: F841  (free them before the losses run)
    empty_cache()
    return 2 * numel * 4 / (ms * 1e-3) / 1e9, numel * 4


def peak_extra_bytes(step):
    """Bytes a step allocates at its peak beyond what was allocated before it (the inputs)."""
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def relative_error(actual, expected):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = e.abs().max().item() or 1.0
    return ((a - e).abs().max().item()) / scale


def verdict(errors, dtype):
    """"ok", "inexact" or "differs" from the (loss, gradient) relative errors."""
    rtol, atol = CHECK_TOL[dtype]
    limit = max(rtol, atol)
    worst = max(errors)
    if not math.isfinite(worst):
        return "differs", worst
    return ("ok" if worst <= limit else "inexact" if worst <= 10 * limit else "differs"), worst


class Bench:
    def __init__(self, args, pykd):
        self.args = args
        self.pykd = pykd
        self.deadline = time.monotonic() + args.budget_s
        self.references = {}
        self.liger, why = liger_forms()
        self.report = {
            "device": torch.cuda.get_device_name() if on_gpu() else "cpu (a test of the script)",
            "capability": "%d.%d" % torch.cuda.get_device_capability() if on_gpu() else "0.0",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nvcc": nvcc_version(),
            "driver": driver_version(),
            "liger_kernel": self.liger.get("version"),
            "triton": module_version("triton"),
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python bench/bench_gpu.py " + shlex.join(sys.argv[1:]),
            "invoked_by": args.invoked_by,
            "temperature": TEMPERATURE,
            "jsd_beta": JSD_BETA,
            "warmup": args.warmup,
            "reps": args.reps,
            "copy_gbps": None,
            "kd": [],
            "hint": [],
            "goals": [],
            "skipped": [],
            "problems": [],
        }
        if why:
            self.report["skipped"].append(f"Liger-Kernel forms: {why}")
        props = torch.cuda.get_device_properties(0) if on_gpu() else None
        self.l2_bytes = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
        self.report["sms"] = getattr(props, "multi_processor_count", None)
        self.report["l2_mib"] = round(self.l2_bytes / 2**20, 1)

    def remaining(self):
        return self.deadline - time.monotonic()

    def save(self):
        self.report["goals"] = goals(self.report)
        os.makedirs(self.args.out, exist_ok=True)
        with open(os.path.join(self.args.out, "gpu.json"), "w") as f:
            json.dump(self.report, f, indent=1, default=str)
            f.write("\n")
        with open(os.path.join(self.args.out, "gpu.md"), "w") as f:
            f.write(markdown(self.report))

    # -- KD -------------------------------------------------------------------------------

    def kd_inputs(self, shape, masked, dtype, seed):
        """Input sets (student leaf requiring grad, teacher, labels or None): as many as needed
        for their bytes to exceed 4 x L2, at most 8."""
        numel = math.prod(shape)
        set_bytes = 2 * numel * torch.tensor([], dtype=dtype).element_size()
        count = max(1, min(8, math.ceil(4 * self.l2_bytes / set_bytes)))
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        sets = []
        for _ in range(count):
            s = torch.empty(shape, device=DEVICE, dtype=dtype).normal_(0, 3, generator=gen)
            t = torch.empty(shape, device=DEVICE, dtype=dtype).normal_(0, 3, generator=gen)
            labels = None
            if masked:
                labels = torch.randint(0, shape[-1], shape[:-1], device=DEVICE, generator=gen)
                drop = torch.rand(shape[:-1], device=DEVICE, generator=gen) < masked
                labels = labels.masked_fill(drop, IGNORE)
            sets.append((s.requires_grad_(), t, labels))
        return sets

    def check_subset(self, fn, sets, dtype, beta):
        """fn on the first rows against the float64 reference: (verdict, error)."""
        s, t, labels = sets[0]
        classes = s.shape[-1]
        rows = check_rows(classes)
        s_sub = s.detach().reshape(-1, classes)[:rows].clone().requires_grad_()
        t_sub = t.reshape(-1, classes)[:rows]
        l_sub = None if labels is None else labels.reshape(-1)[:rows].clone()
        loss = fn(s_sub, t_sub, l_sub)
        (grad,) = torch.autograd.grad(loss, [s_sub])
        key = (id(sets), beta)
        if key not in self.references:  # one float64 reference per input and divergence
            s64 = s_sub.detach().double().cpu().requires_grad_()
            expected = reference_kd(s64, t_sub.double().cpu(), TEMPERATURE, "batchmean", beta,
                                    None if l_sub is None else l_sub.cpu(), IGNORE)
            (expected_grad,) = torch.autograd.grad(expected, [s64])
            self.references = {key: (expected.detach(), expected_grad)}
        expected, expected_grad = self.references[key]
        return verdict([relative_error(loss, expected), relative_error(grad, expected_grad)],
                       dtype)

    def check_against(self, fn, sets, trusted, dtype):
        """fn on the full tensors against the trusted (loss, first rows' gradient)."""
        s, t, labels = sets[0]
        s.grad = None
        loss = fn(s, t, labels)
        loss.backward()
        grad = s.grad.reshape(-1, s.shape[-1])[:check_rows(s.shape[-1])]
        result = verdict([relative_error(loss, trusted[0]), relative_error(grad, trusted[1])],
                         dtype)
        s.grad = None
        return result

    def full_result(self, fn, sets):
        s, t, labels = sets[0]
        s.grad = None
        loss = fn(s, t, labels)
        loss.backward()
        result = (loss.detach().clone(),
                  s.grad.reshape(-1, s.shape[-1])[:check_rows(s.shape[-1])].clone())
        s.grad = None
        return result

    def measure(self, name, fn, sets, dtype, beta, trusted, warmup):
        """{status, check, check_error, ms, peak_extra_bytes, error}."""
        entry = {"status": "not run"}
        try:
            if trusted is None:
                entry["check"], entry["check_error"] = self.check_subset(fn, sets, dtype, beta)
            else:
                entry["check"], entry["check_error"] = self.check_against(fn, sets, trusted,
                                                                          dtype)

            def step(i):
                s, t, labels = sets[i]
                s.grad = None
                fn(s, t, labels).backward()

            entry["ms"] = time_ms(step, warmup, self.args.reps, len(sets))
            for s, _, _ in sets:
                s.grad = None
            entry["peak_extra_bytes"] = peak_extra_bytes(step)
            entry["status"] = "measured"
        except torch.OutOfMemoryError as error:
            entry.update(status="out of memory", error=str(error).splitlines()[0][:200])
        except NotImplementedError as error:
            entry.update(status="not supported", error=str(error))
        except Exception as error:  # noqa: BLE001  (record and go on)
            entry.update(status="failed", error=f"{type(error).__name__}: "
                         f"{str(error).splitlines()[0][:300] if str(error) else ''}")
        finally:
            for s, _, _ in sets:
                s.grad = None
            empty_cache()
        ms = entry.get("ms")
        print(f"    {name:>18}: " + (f"{ms:8.3f} ms" if ms else entry["status"]) +
              (f"  check {entry.get('check')} ({entry.get('check_error', 0):.1e})"
               if "check" in entry else "") + (f"  {entry['error']}" if "error" in entry else ""),
              flush=True)
        return entry

    def kd_row(self, shape, masked, dtype_name, compiled):
        """Measures one shape and dtype: the eager forms (compiled=False) or the compiled ones."""
        dtype = DTYPES[dtype_name]
        key = (tuple(shape), dtype_name)
        row = next((r for r in self.report["kd"] if (tuple(r["shape"]), r["dtype"]) == key),
                   None)
        if row is None:
            numel = math.prod(shape)
            element = torch.tensor([], dtype=dtype).element_size()
            row = {"shape": list(shape), "N": numel // shape[-1], "C": shape[-1],
                   "dtype": dtype_name, "masked_fraction": masked,
                   "grad_bytes": numel * element, "floor_bytes": 3 * numel * element,
                   "rows_bytes": 16 * (numel // shape[-1]), "forms": {}}
            self.report["kd"].append(row)
        print(f"{'x'.join(map(str, shape))} {dtype_name}" + (f" ({masked:.0%} of rows masked)"
                                                             if masked else "") +
              (" compiled" if compiled else ""), flush=True)
        sets = None
        try:
            sets = self.kd_inputs(shape, masked, dtype, seed=zlib.crc32(repr(key).encode()))
            row["input_sets"] = len(sets)
            forms = {}
            if not compiled:
                fn, why = pykd_form(self.pykd, 0.0)
                forms["pykd"] = (fn, why, 0.0)
                fn, why = pykd_form(self.pykd, JSD_BETA)
                forms["pykd jsd"] = (fn, why, JSD_BETA)
                forms["eager tutorial"] = (tutorial, "", 0.0)
                forms["eager kl_div"] = (kl_div, "", 0.0)
                for name, beta in (("liger kl_div", 0.0), ("liger jsd beta=0", 0.0),
                                   ("liger jsd", JSD_BETA)):
                    fn = self.liger.get(name)
                    forms[name] = (fn, "" if fn else "Liger-Kernel not importable", beta)
            else:
                torch._dynamo.reset()
                forms["compile tutorial"] = (torch.compile(tutorial, dynamic=False), "", 0.0)
                forms["compile kl_div"] = (torch.compile(kl_div, dynamic=False), "", 0.0)
            trusted = None
            for name, (fn, why, beta) in forms.items():
                if fn is None:
                    row["forms"][name] = {"status": "not run", "error": why}
                    continue
                if compiled and self.remaining() < self.args.compile_reserve_s:
                    row["forms"][name] = {"status": "not run", "error": "time budget"}
                    self.report["skipped"].append(f"{name} at {'x'.join(map(str, shape))} "
                                                  f"{dtype_name}: time budget")
                    continue
                against = None
                if compiled:
                    if trusted is None:
                        trusted = self.trusted_result(row, sets)
                    against = trusted
                    if against is None:
                        row["forms"][name] = {"status": "not run",
                                              "error": "no checked form to compare with"}
                        continue
                warmup = self.args.warmup + (3 if compiled else 0)
                row["forms"][name] = self.measure(name, fn, sets, dtype, beta, against, warmup)
        except torch.OutOfMemoryError as error:
            self.report["problems"].append(f"{key}: inputs out of memory: {error}")
        finally:
            del sets
            self.references = {}
            empty_cache()
        self.derive(row)
        self.save()

    def trusted_result(self, row, sets):
        """pykd's full-size result when it checked "ok"/"inexact" (else eager kl_div's)."""
        for name, fn in (("pykd", pykd_form(self.pykd, 0.0)[0]), ("eager kl_div", kl_div)):
            entry = row["forms"].get(name, {})
            if fn is not None and entry.get("check") in ("ok", "inexact"):
                try:
                    return self.full_result(fn, sets)
                except Exception:  # noqa: BLE001
                    continue
        return None

    def derive(self, row):
        """GB/s, share of the copy, speed-ups and peak memory ratios for one row."""
        copy = self.report["copy_gbps"]
        forms = row["forms"]
        for name, entry in forms.items():
            if entry.get("ms"):
                entry["gbps"] = row["floor_bytes"] / (entry["ms"] * 1e-3) / 1e9
                entry["pct_copy"] = 100 * entry["gbps"] / copy if copy else None
            if entry.get("peak_extra_bytes") is not None:
                entry["peak_over_grad"] = entry["peak_extra_bytes"] / row["grad_bytes"]

        def best(names):
            timed = [(forms[n]["ms"], n) for n in names if forms.get(n, {}).get("ms")
                     and forms[n].get("check") in ("ok", "inexact")]
            return min(timed) if timed else (None, None)

        pykd_ms = forms.get("pykd", {}).get("ms")
        jsd_ms = forms.get("pykd jsd", {}).get("ms")
        row["best_eager"] = best(["eager tutorial", "eager kl_div"])
        row["best_compile"] = best(["compile tutorial", "compile kl_div"])
        row["best_liger_kl"] = best(["liger kl_div", "liger jsd beta=0"])
        row["liger_jsd"] = best(["liger jsd"])
        ok = forms.get("pykd", {}).get("check") in ("ok", "inexact")
        ok_jsd = forms.get("pykd jsd", {}).get("check") in ("ok", "inexact")
        row["x_eager"] = ratio(row["best_eager"][0], pykd_ms) if ok else None
        row["x_compile"] = ratio(row["best_compile"][0], pykd_ms) if ok else None
        row["x_liger_kl"] = ratio(row["best_liger_kl"][0], pykd_ms) if ok else None
        row["x_liger_jsd"] = ratio(row["liger_jsd"][0], jsd_ms) if ok_jsd else None
        row["jsd_over_kl"] = ratio(jsd_ms, pykd_ms) if ok and ok_jsd else None

    # -- hint -----------------------------------------------------------------------------

    def hint_row(self, dtype_name, pairs, compiled):
        from pykd import reference

        dtype = DTYPES[dtype_name]
        key = (dtype_name, pairs)
        row = next((r for r in self.report["hint"] if (r["dtype"], r["K"]) == key), None)
        shapes = [(HINT_BATCH, *HINT_MAPS[k % len(HINT_MAPS)]) for k in range(pairs)]
        numel = sum(math.prod(s) for s in shapes)
        element = torch.tensor([], dtype=dtype).element_size()
        if row is None:
            row = {"dtype": dtype_name, "K": pairs, "batch": HINT_BATCH, "numel": numel,
                   "floor_bytes": 3 * numel * element, "forms": {}}
            self.report["hint"].append(row)
        print(f"hint K={pairs} {dtype_name}" + (" compiled" if compiled else ""), flush=True)
        gen = torch.Generator(device=DEVICE).manual_seed(pairs)
        student = teacher = None
        try:
            student = [torch.empty(s, device=DEVICE, dtype=dtype).normal_(generator=gen)
                       .requires_grad_() for s in shapes]
            teacher = [torch.empty(s, device=DEVICE, dtype=dtype).normal_(generator=gen)
                       for s in shapes]
            if compiled:
                torch._dynamo.reset()
                forms = {"compile loop": torch.compile(reference.hint_loss, dynamic=False)}
            else:
                forms = {"pykd": self.pykd.hint_loss, "eager loop": reference.hint_loss}
            for name, fn in forms.items():
                if compiled and self.remaining() < self.args.compile_reserve_s:
                    row["forms"][name] = {"status": "not run", "error": "time budget"}
                    self.report["skipped"].append(f"hint {name} K={pairs} {dtype_name}: budget")
                    continue
                row["forms"][name] = self.measure_hint(name, fn, student, teacher, dtype,
                                                       compiled)
        except torch.OutOfMemoryError as error:
            self.report["problems"].append(f"hint {key}: out of memory: {error}")
        finally:
            student = teacher = None
            empty_cache()
        copy = self.report["copy_gbps"]
        for entry in row["forms"].values():
            if entry.get("ms"):
                entry["gbps"] = row["floor_bytes"] / (entry["ms"] * 1e-3) / 1e9
                entry["pct_copy"] = 100 * entry["gbps"] / copy if copy else None
        pykd_ms = row["forms"].get("pykd", {}).get("ms")
        eager = row["forms"].get("eager loop", {}).get("ms")
        comp = row["forms"].get("compile loop", {}).get("ms")
        row["x_eager"] = ratio(eager, pykd_ms)
        row["x_compile"] = ratio(comp, pykd_ms)
        self.save()

    def measure_hint(self, name, fn, student, teacher, dtype, compiled):
        from pykd import reference

        entry = {"status": "not run"}
        try:
            # Checked against the float64 loop on upcast copies of the first 8 batch items.
            s_sub = [s.detach()[:8].clone().requires_grad_() for s in student]
            t_sub = [t[:8] for t in teacher]
            loss = fn(s_sub, t_sub)
            grads = torch.autograd.grad(loss, s_sub)
            s64 = [s.detach().double().requires_grad_() for s in s_sub]
            ref = reference.hint_loss(s64, [t.double() for t in t_sub])
            ref_grads = torch.autograd.grad(ref, s64)
            errors = [relative_error(loss, ref)] + [relative_error(g, e) for g, e in
                                                     zip(grads, ref_grads)]
            entry["check"], entry["check_error"] = verdict(errors, dtype)

            def step(i):
                for s in student:
                    s.grad = None
                fn(student, teacher).backward()

            entry["ms"] = time_ms(step, self.args.warmup + (3 if compiled else 0),
                                  self.args.reps, 1)
            for s in student:
                s.grad = None
            entry["peak_extra_bytes"] = peak_extra_bytes(step)
            entry["status"] = "measured"
        except torch.OutOfMemoryError as error:
            entry.update(status="out of memory", error=str(error).splitlines()[0][:200])
        except Exception as error:  # noqa: BLE001
            entry.update(status="failed", error=f"{type(error).__name__}: {error}"[:300])
        finally:
            for s in student:
                s.grad = None
        print(f"    {name:>18}: " + (
            f"{entry['ms']:8.3f} ms" if entry.get("ms") else entry["status"]) +
            f"  check {entry.get('check')}" + (f"  {entry['error']}" if "error" in entry else ""),
            flush=True)
        return entry

    # -- all ------------------------------------------------------------------------------

    def run(self):
        self.report["copy_gbps"], self.report["copy_bytes"] = copy_gbps(self.args.warmup,
                                                                         self.args.reps)
        print(f"{self.report['device']}, torch {self.report['torch']} (CUDA "
              f"{self.report['cuda']}): copy {self.report['copy_gbps']:.0f} GB/s", flush=True)
        self.save()
        shapes = KD_SHAPES
        if self.args.shapes is not None:  # SPEC's shapes by name, or others (3-D: 25% masked)
            named = {"x".join(map(str, s)): (s, m) for s, m in KD_SHAPES}
            shapes = [named.get(n) or (tuple(int(d) for d in n.split("x")),
                                       0.25 if n.count("x") == 2 else 0.0)
                      for n in self.args.shapes]
        dtypes = [d for d in DTYPES if d in self.args.dtypes]
        for dtype_name in dtypes:
            for shape, masked in shapes:
                self.kd_row(shape, masked, dtype_name, compiled=False)
        if "hint" not in self.args.skip:
            for dtype_name in dtypes:
                for pairs in HINT_PAIRS:
                    self.hint_row(dtype_name, pairs, compiled=False)
        if "compile" in self.args.skip:
            self.report["skipped"].append("torch.compile forms: --skip compile")
        else:
            for shape, masked in shapes:  # shape-major: each shape compiled once first
                for dtype_name in dtypes:
                    if self.remaining() < self.args.compile_reserve_s:
                        self.report["skipped"].append(
                            f"compiled forms at {'x'.join(map(str, shape))} {dtype_name}: "
                            "time budget")
                        continue
                    self.kd_row(shape, masked, dtype_name, compiled=True)
            if "hint" not in self.args.skip:
                for dtype_name in dtypes:
                    for pairs in HINT_PAIRS:
                        if self.remaining() < self.args.compile_reserve_s:
                            self.report["skipped"].append(
                                f"hint compile loop K={pairs} {dtype_name}: time budget")
                            continue
                        self.hint_row(dtype_name, pairs, compiled=True)
        not_measured = {}  # (form, why) -> [where]
        for row in self.report["kd"] + self.report["hint"]:
            where = ("x".join(map(str, row["shape"])) if "shape" in row else
                     f"hint K={row['K']}") + f" {row['dtype']}"
            for name, entry in row["forms"].items():
                if name.startswith("pykd") and entry.get("status") == "failed":
                    self.report["problems"].append(f"{name} at {where} failed: {entry['error']}")
                if entry.get("status") not in ("measured", None) and entry.get("error") != \
                        "time budget":
                    why = f"{entry['status']} ({entry.get('error', '')})"
                    not_measured.setdefault((name, why), []).append(where)
                if entry.get("check") == "differs":
                    self.report["problems"].append(
                        f"{name} at {where}: differs from the reference (relative error "
                        f"{entry['check_error']:.2e})")
        for (name, why), wheres in not_measured.items():
            self.report["skipped"].append(f"{name}: {why} at {', '.join(wheres)}")
        self.save()
        bad = [p for p in self.report["problems"] if p.startswith(("pykd", "(", "hint"))]
        if bad:
            print("problems:\n  " + "\n  ".join(bad), flush=True)
        return 1 if bad else 0


def ratio(a, b):
    return a / b if a and b else None


def module_version(name):
    try:
        return getattr(__import__(name), "__version__", "?")
    except Exception:  # noqa: BLE001
        return None


def nvcc_version():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    nvcc = shutil.which("nvcc") or os.path.join(home, "bin", "nvcc")
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                              timeout=20).stdout
        return text.strip().splitlines()[-1] if text.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def driver_version():
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout
        return text.strip().splitlines()[0] if text.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ---------------------------------------------------------------------------------------------
# Goals (issue 10) and the report.

def goals(report):
    kd = report["kd"]

    def rows(pred):
        return [r for r in kd if pred(r)]

    def extreme(values, fn):
        values = [(v, w) for v, w in values if v is not None]
        return fn(values) if values else (None, None)

    def where(r):
        return f"{'x'.join(map(str, r['shape']))} {r['dtype']}"

    def pct(r, name="pykd"):
        e = r["forms"].get(name, {})
        return e.get("pct_copy") if e.get("check") in ("ok", "inexact") else None

    out = []

    def goal(text, value, target, higher_is_better, unit, at):
        met = None if value is None else (value >= target if higher_is_better else
                                          value <= target)
        out.append({"goal": text, "measured": value, "target": target, "unit": unit,
                    "where": at, "met": met})

    v, at = extreme([(pct(r), where(r)) for r in rows(lambda r: r["C"] >= 1000)], min)
    goal("KD >= 90% of copy bandwidth, every shape with C >= 1000 (fp32, bf16); worst", v, 90,
         True, "% of copy", at)
    v, at = extreme([(pct(r), where(r)) for r in rows(lambda r: r["C"] == 10)], min)
    goal("KD >= 80% of copy bandwidth at C = 10; worst", v, 80, True, "% of copy", at)
    v, at = extreme([(r.get("x_compile"), where(r)) for r in kd], min)
    goal("KD >= 1.5x torch.compile (the faster compiled form); worst", v, 1.5, True, "x", at)
    v, at = extreme([(r.get("x_liger_kl"), where(r)) for r in kd], min)
    goal("KD >= 2x Liger-Kernel, forward KL (the faster of LigerKLDIVLoss and "
         "LigerJSD(beta=0)); worst", v, 2.0, True, "x", at)
    v, at = extreme([(r.get("x_liger_jsd"), where(r)) for r in kd], min)
    goal(f"JSD (beta={JSD_BETA}) >= 2x LigerJSD; worst", v, 2.0, True, "x", at)
    v, at = extreme([(r.get("jsd_over_kl"), where(r)) for r in kd], max)
    goal("JSD time <= 1.3x forward KL time; worst", v, 1.3, False, "x", at)

    def peak(r):
        e = r["forms"].get("pykd", {})
        b = e.get("peak_extra_bytes")
        return None if b is None else b / (r["grad_bytes"] + r["rows_bytes"])

    v, at = extreme([(peak(r), where(r)) for r in kd], max)
    goal("KD peak extra memory <= one gradient buffer (+ 16 bytes per row of per-row "
         "scalars); worst", v, 1.0, False, "x (grad + row scalars)", at)
    v, at = extreme([(r["forms"].get("pykd", {}).get("pct_copy"), f"K={r['K']} {r['dtype']}")
                     for r in report["hint"]], min)
    goal("Hint loss >= 85% of copy bandwidth; worst", v, 85, True, "% of copy", at)
    return out


def fmt(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def cell(entry, digits=3):
    if not entry:
        return "-"
    if entry.get("ms"):
        mark = {"inexact": "~", "differs": " (differs)"}.get(entry.get("check"), "")
        return f"{entry['ms']:.{digits}f}{mark}"
    status = entry.get("status", "-")
    return {"out of memory": "OOM", "not run": "-", "not supported": "n/s"}.get(status, status)


def mib(value):
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def markdown(report):
    copy = report.get("copy_gbps")
    lines = [
        f"# pykd on {report['device']} (sm_{report['capability'].replace('.', '')}, "
        f"{report.get('sms')} SMs, {report.get('l2_mib')} MiB L2)",
        "",
        f"torch {report['torch']} (CUDA {report['cuda']}), nvcc {report.get('nvcc')}, driver "
        f"{report.get('driver')}, triton {report.get('triton')}, Liger-Kernel "
        f"{report.get('liger_kernel') or 'absent'}; {report['when']}.",
        f"Copy bandwidth in this run: {fmt(copy, 0)} GB/s (a copy of "
        f"{(report.get('copy_bytes') or 0) / 2**30:.2g} GiB, bytes read + written).",
        "",
        f"Forward + backward, the student requiring grad, T = {report['temperature']}; median ms "
        f"of {report['reps']} CUDA-event timings after {report['warmup']} warm-up steps (3 more "
        "for compiled forms). GB/s is SPEC's floor 3 * N * C * element_size over the time; "
        "'~' marks a form whose check was inexact (within 10x the tolerance), 'differs' one "
        "that failed it (not counted); OOM: out of memory; n/s: not supported.",
        "",
        "## KD loss (forward KL)",
        "",
        "| shape | dtype | masked | pykd ms | pykd GB/s | % of copy | eager tutorial | eager "
        "kl_div | compile tutorial | compile kl_div | liger kl_div | liger jsd b=0 | x eager | "
        "x compile | x liger |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["kd"]:
        f = r["forms"]
        p = f.get("pykd", {})
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['masked_fraction']:.0%} "
            f"| {cell(p)} | {fmt(p.get('gbps'), 0)} | {fmt(p.get('pct_copy'), 0)} "
            f"| {cell(f.get('eager tutorial'))} | {cell(f.get('eager kl_div'))} "
            f"| {cell(f.get('compile tutorial'))} | {cell(f.get('compile kl_div'))} "
            f"| {cell(f.get('liger kl_div'))} | {cell(f.get('liger jsd beta=0'))} "
            f"| {fmt(r.get('x_eager'), 2)} | {fmt(r.get('x_compile'), 2)} "
            f"| {fmt(r.get('x_liger_kl'), 2)} |")
    lines += [
        "",
        f"## JSD (beta = {report['jsd_beta']})",
        "",
        "| shape | dtype | pykd jsd ms | pykd jsd GB/s | jsd / forward KL | liger jsd ms | x liger |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["kd"]:
        f = r["forms"]
        j = f.get("pykd jsd", {})
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {cell(j)} "
            f"| {fmt(j.get('gbps'), 0)} | {fmt(r.get('jsd_over_kl'), 2)} "
            f"| {cell(f.get('liger jsd'))} | {fmt(r.get('x_liger_jsd'), 2)} |")
    names = KD_FORMS + JSD_FORMS + ["liger jsd"]
    names = list(dict.fromkeys(names))
    lines += [
        "",
        "## Peak memory beyond the inputs (MiB), and one gradient buffer",
        "",
        "| shape | dtype | gradient | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in report["kd"]:
        f = r["forms"]
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {mib(r['grad_bytes'])} "
                     "| " + " | ".join(mib(f.get(n, {}).get("peak_extra_bytes")) for n in names)
                     + " |")
    lines += [
        "",
        f"## Hint loss (K pairs of {', '.join('x'.join(map(str, m)) for m in HINT_MAPS)} cycled, "
        f"batch {HINT_BATCH})",
        "",
        "| dtype | K | pykd ms | pykd GB/s | % of copy | eager loop ms | compiled loop ms | "
        "x eager | x compile | pykd peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["hint"]:
        f = r["forms"]
        p = f.get("pykd", {})
        lines.append(
            f"| {r['dtype']} | {r['K']} | {cell(p)} | {fmt(p.get('gbps'), 0)} "
            f"| {fmt(p.get('pct_copy'), 0)} | {cell(f.get('eager loop'))} "
            f"| {cell(f.get('compile loop'))} | {fmt(r.get('x_eager'), 2)} "
            f"| {fmt(r.get('x_compile'), 2)} | {mib(p.get('peak_extra_bytes'))} |")
    lines += ["", "## Issue 10 goals", "", "| goal | measured | target | met | where |",
              "|---|---|---|---|---|"]
    for g in report["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(f"| {g['goal']} | {fmt(g['measured'], 2)} {g['unit']} | {g['target']} "
                     f"| {met} | {g['where'] or ''} |")
    if report["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in report["problems"]]
    if report["skipped"]:
        lines += ["", "## Not measured", ""] + [f"- {s}" for s in report["skipped"]]
    lines += ["", "Command:", "", f"    {report['command']}"]
    if report.get("invoked_by"):
        lines += ["", f"run by `{report['invoked_by']}`"]
    return "\n".join(lines) + "\n"


def dry_run(args):
    print("bench_gpu.py plan (no GPU touched):")
    for shape, masked in KD_SHAPES:
        numel = math.prod(shape)
        for dtype_name, dtype in DTYPES.items():
            element = torch.tensor([], dtype=dtype).element_size()
            print(f"  KD {'x'.join(map(str, shape))} {dtype_name}: {3 * numel * element / 1e9:.2f}"
                  f" GB floor, {numel * element / 2**30:.2f} GiB per tensor"
                  + (f", {masked:.0%} of rows masked" if masked else ""))
    print(f"  forms: {', '.join(KD_FORMS)}; JSD: {', '.join(JSD_FORMS)}")
    print(f"  hint: K = {HINT_PAIRS}, batch {HINT_BATCH}, maps {HINT_MAPS}")
    try:
        pykd = import_pykd()
        params = inspect.signature(pykd.kd_loss).parameters
        print(f"  pykd.kd_loss: beta={'beta' in params}, labels={'labels' in params}")
    except Exception as error:  # noqa: BLE001
        print(f"  pykd not importable here: {type(error).__name__}: {error}")
    forms, why = liger_forms()
    print(f"  Liger-Kernel: {forms.get('version') or why}")
    report = {"device": "(dry run)", "capability": "0.0", "torch": torch.__version__,
              "cuda": torch.version.cuda, "when": "-", "temperature": TEMPERATURE,
              "jsd_beta": JSD_BETA, "reps": args.reps, "warmup": args.warmup, "copy_gbps": None,
              "kd": [], "hint": [], "skipped": [], "problems": [], "command": "(dry run)"}
    report["goals"] = goals(report)
    markdown(report)  # the report renders with nothing measured
    print(f"  goals: {len(report['goals'])}")
    return 0


def main():
    global DEVICE, HINT_BATCH
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--budget-s", type=float, default=600,
                        help="stop starting compiled forms when less than --compile-reserve-s "
                             "of this is left")
    parser.add_argument("--compile-reserve-s", type=float, default=45,
                        help="start no compiled form with less time than this left")
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=None,
                        help="comma-separated, e.g. 16384x32000,8x2048x128256")
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=list(DTYPES))
    parser.add_argument("--skip", type=lambda s: s.split(","), default=[],
                        help="compile, hint")
    parser.add_argument("--invoked-by", default=None)
    parser.add_argument("--hint-batch", type=int, default=HINT_BATCH)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu only tests this script (use small --shapes and --hint-batch)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        return dry_run(args)
    DEVICE, HINT_BATCH = args.device, args.hint_batch
    if args.device == "cpu":
        pykd = import_pykd()
        bench = Bench(args, pykd)
        try:
            return bench.run()
        finally:
            bench.save()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                 "run it on a machine with a GPU and a CUDA build of torch and pykd.")
    pykd = import_pykd()
    if not any(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")
               for n in torch._C._dispatch_get_all_op_names() if n.startswith("pykd::")):
        sys.exit("bench_gpu.py: pykd was built without its CUDA kernels; rebuild it with a CUDA "
                 "build of torch and CUDA_HOME set (see README).")
    bench = Bench(args, pykd)
    try:
        return bench.run()
    finally:
        bench.save()


if __name__ == "__main__":
    sys.exit(main())
