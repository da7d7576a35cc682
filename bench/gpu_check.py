"""One command for a fresh GPU machine: build pykd, run every test, sanitize every CUDA path, time.

    bash bench/gpu_check.sh OUT          # or: python3 bench/gpu_check.py --out OUT

From a checkout on a machine with torch (a CUDA build), nvcc, compute-sanitizer and no internet:

1. env      device, driver, torch / CUDA / nvcc / sanitizer versions, packages
2. wheels   installs the wheels carried in .whl/ (or --wheels DIR), e.g. Liger-Kernel, into a
            folder of their own on PYTHONPATH (pip --target, no index, no deps)
3. build    pip install --no-build-isolation --no-deps --no-index --target WORK/site . with
            MAX_JOBS = all cores, TORCH_CUDA_ARCH_LIST = this GPU's capability, CUDA_HOME from
            nvcc's location, FORCE_CUDA=1, ptxas -v in the log; then checks that every pykd op
            has a CUDA kernel
4. tests    pytest -rs -v over tests/ (junit XML; pytest-xdist, a file per worker, when it is
            installed); fails if a test failed, none ran on the GPU or any CUDA test skipped (a
            skip that needs hardware this machine lacks, e.g. two GPUs, is listed, not failed)
5. sanitize compute-sanitizer memcheck, racecheck, initcheck and synccheck over
            bench/gpu_exercise.py (every CUDA kernel path, small sizes), all four in parallel with
            the tests, beside one plain run of the exercise; caching allocator off, so that each
            tensor is its own allocation; errors counted per tool and attributed to pykd's kernels
            or to others
6. bench    bench/bench_gpu.py writes OUT/gpu.json and OUT/gpu.md, with whatever time is left

Writes at most five files under OUT (the device machine returns 8 at most): summary.md (every
step, what failed and what was skipped), summary.json, gpu.json, gpu.md and logs.tar.gz (build,
tests + junit XML, one log per sanitizer tool and its exercise JSON, the plain exercise, the
benchmark, the environment). Every step has a time limit inside one budget (--budget, default 560
s, so a 600 s run limit holds); a step that fails is recorded and the next one runs. The exit
status is 1 if anything failed, 0 otherwise; the summary printed last says what was skipped.
"""
import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOOLS = ["memcheck", "racecheck", "initcheck", "synccheck"]
SANITIZER_ERROR_EXIT = 86
# Skips that need hardware a one-GPU machine does not have: listed, not failed.
HARDWARE_SKIPS = [r"two CUDA GPUs", r"multiple (CUDA )?GPUs", r"more than one GPU"]


class Runner:
    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.out = os.path.abspath(args.out)
        self.work = os.path.abspath(args.work)
        self.logs = os.path.join(self.work, "logs")
        self.site = os.path.join(self.work, "site")          # pykd
        self.wheel_site = os.path.join(self.work, "wheels")  # carried wheels
        self.steps = []      # dicts: name, status, seconds, detail, log
        self.skipped = []    # what was not done, in words
        self.facts = {}      # environment
        self.python = sys.executable
        self.children = []

    # -- helpers --------------------------------------------------------------------------

    def remaining(self):
        return self.deadline - time.monotonic()

    def env(self, **extra):
        env = dict(os.environ)
        paths = [self.site, self.wheel_site] + [p for p in env.get("PYTHONPATH", "").split(
            os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONSAFEPATH"] = "1"  # never import the checkout's pykd/ (it has no _C)
        env["PYTHONUNBUFFERED"] = "1"
        env.update({k: v for k, v in extra.items() if v is not None})
        return env

    def spawn(self, cmd, log, env=None, cwd=REPO):
        f = open(log, "ab")
        f.write(f"$ {shlex.join(cmd)}\n".encode())
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env or self.env(), start_new_session=True)
        proc.log_file = f
        self.children.append(proc)
        return proc

    def wait(self, proc, timeout):
        """The exit status, or None after killing the process group at the time limit."""
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.kill(proc)
            rc = None
        proc.log_file.close()
        return rc

    def kill(self, proc):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            try:
                proc.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue

    def run(self, cmd, log, timeout, env=None, cwd=REPO):
        return self.wait(self.spawn(cmd, log, env=env, cwd=cwd), timeout)

    def capture(self, cmd, timeout=30, env=None):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=env or self.env(), cwd=REPO)
            return (done.stdout + done.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"({shlex.join(cmd)}: {error})"

    def step(self, name, status, started, detail="", log=None, **more):
        entry = {"name": name, "status": status, "seconds": round(time.monotonic() - started, 1),
                 "detail": detail, "log": os.path.relpath(log, self.logs) if log else None,
                 **more}
        if status in ("failed", "timeout") and log and name not in ("tests", "env"):
            entry["log_tail"] = log_tail(log)
        self.steps.append(entry)
        print(f"[{self.elapsed():6.1f} s] {name}: {status}" + (f" ({detail})" if detail else ""),
              flush=True)
        return entry

    def elapsed(self):
        return time.monotonic() - self.start

    def log(self, name):
        return os.path.join(self.logs, name)

    def skip_step(self, name, why):
        entry = self.step(name, "not run", time.monotonic(), why)
        self.skipped.append(f"step {name}: {why}")
        return entry

    # -- 1. environment -------------------------------------------------------------------

    def record_env(self):
        t0 = time.monotonic()
        log = self.log("env.txt")
        probe = r"""
import json, os, sys, platform
info = {"python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(), "cpus": os.cpu_count()}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), capability="%d.%d" % (p.major, p.minor),
                    sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                    device_count=torch.cuda.device_count())
except Exception as e:
    info["torch_error"] = repr(e)
for mod in ("triton", "liger_kernel", "pytest", "numpy", "pytest_timeout", "xdist"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "yes")
    except Exception as e:
        info[mod] = None
print(json.dumps(info))
"""
        text = self.capture([self.python, "-c", probe], timeout=120)
        try:
            self.facts.update(json.loads(text.splitlines()[-1]))
        except (ValueError, IndexError):
            self.facts["probe_error"] = text[-2000:]
        self.facts["cuda_home"] = self.cuda_home()
        nvcc = os.path.join(self.facts["cuda_home"] or "", "bin", "nvcc")
        self.facts["nvcc"] = nvcc if os.path.exists(nvcc) else shutil.which("nvcc")
        self.facts["nvcc_version"] = self.version_line(
            [self.facts["nvcc"], "--version"], r"release [\d.]+, V[\d.]+") if self.facts[
                "nvcc"] else None
        self.facts["sanitizer"] = self.find_tool("compute-sanitizer")
        self.facts["sanitizer_version"] = self.version_line(
            [self.facts["sanitizer"], "--version"], r"Version [\w.]+") if self.facts[
                "sanitizer"] else None
        self.facts["ncu"] = self.find_tool("ncu")
        smi = shutil.which("nvidia-smi")
        if smi:
            query = self.capture([smi, "--query-gpu=name,driver_version,memory.total,"
                                  "clocks.sm,clocks.max.sm,clocks.mem,power.limit",
                                  "--format=csv,noheader"])
            self.facts["nvidia_smi"] = query
            parts = [p.strip() for p in query.splitlines()[0].split(",")] if query else []
            if len(parts) > 1:
                self.facts["driver"] = parts[1]
        self.facts["kernel"] = os.uname().release
        self.facts["runtime"] = ("gVisor (compute-sanitizer and ncu did not work there)"
                                 if os.uname().release.startswith("4.4.0") else "")
        self.facts["commit"] = self.capture(["git", "rev-parse", "HEAD"], timeout=10)
        if not re.fullmatch(r"[0-9a-f]{40}", self.facts["commit"] or ""):
            self.facts["commit"] = "unknown (no git checkout)"
        with open(log, "w") as f:
            f.write(json.dumps(self.facts, indent=1) + "\n\n")
            for cmd in (["nvidia-smi"], [self.facts["nvcc"] or "nvcc", "--version"],
                        [self.facts["sanitizer"] or "compute-sanitizer", "--version"],
                        [self.python, "-m", "pip", "list"]):
                f.write(f"$ {shlex.join(cmd)}\n{self.capture(cmd, timeout=60)}\n\n")
        missing = [k for k in ("device", "nvcc") if not self.facts.get(k)]
        status = "failed" if missing else "passed"
        dev = self.facts.get("device", "no GPU visible to torch")
        self.step("env", status, t0, f"{dev}, driver {self.facts.get('driver')}, torch "
                  f"{self.facts.get('torch')} (CUDA {self.facts.get('torch_cuda')}), nvcc "
                  f"{self.facts.get('nvcc_version')}" + (f"; missing: {missing}" if missing else ""),
                  log)

    def version_line(self, cmd, pattern):
        text = self.capture(cmd)
        m = re.search(pattern, text)
        return m.group(0) if m else text.splitlines()[-1] if text else None

    def cuda_home(self):
        """CUDA_HOME if set, else the toolkit holding the nvcc on PATH (symbolic links resolved),
        else /usr/local/cuda."""
        candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
        nvcc = shutil.which("nvcc")
        if nvcc:
            candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
            candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
        for home in candidates:
            if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and (
                    glob.glob(os.path.join(home, "include", "cuda_runtime.h"))
                    or glob.glob(os.path.join(home, "targets", "*", "include", "cuda_runtime.h"))):
                return home
        return None

    def find_tool(self, name):
        found = shutil.which(name)
        if found:
            return found
        home = self.facts.get("cuda_home") or "/usr/local/cuda"
        for path in (os.path.join(home, "bin", name),
                     os.path.join(home, name.split("-")[-1], name),
                     os.path.join(home, "compute-sanitizer", name),
                     *sorted(glob.glob(f"/opt/nvidia/nsight-compute/*/{name}"), reverse=True)):
            if os.path.exists(path):
                return path
        return None

    # -- 2. carried wheels ----------------------------------------------------------------

    def install_wheels(self):
        t0 = time.monotonic()
        wheels = sorted(glob.glob(os.path.join(self.args.wheels, "*.whl")))
        if not wheels:
            self.skipped.append(f"wheels: none in {self.args.wheels} (Liger-Kernel is compared "
                                "only if it is installed already)")
            return self.step("wheels", "not run", t0, f"no wheels in {self.args.wheels}")
        log = self.log("wheels.log")
        rc = self.run([self.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                       "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                       self.wheel_site, *wheels], log, timeout=min(120, self.remaining()))
        names = [os.path.basename(w) for w in wheels]
        if rc == 0:
            return self.step("wheels", "passed", t0, ", ".join(names), log)
        return self.step("wheels", "failed", t0, f"pip exit {rc} for {', '.join(names)}", log)

    # -- 3. build -------------------------------------------------------------------------

    def build(self):
        t0 = time.monotonic()
        log = self.log("build.log")
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or (
            self.facts.get("capability") and self.facts["capability"])
        env = self.env(MAX_JOBS=str(os.cpu_count() or 8), TORCH_CUDA_ARCH_LIST=arch,
                       CUDA_HOME=self.facts.get("cuda_home"), FORCE_CUDA="1",
                       NVCC_APPEND_FLAGS=(os.environ.get("NVCC_APPEND_FLAGS", "") +
                                          " --ptxas-options=-v").strip())
        env.pop("FORCE_CPU", None)
        if not arch or not env.get("CUDA_HOME"):
            return self.step("build", "failed", t0, "no GPU capability or no CUDA toolkit "
                             f"(arch {arch!r}, CUDA_HOME {env.get('CUDA_HOME')!r})")
        shutil.rmtree(self.site, ignore_errors=True)
        with open(log, "w") as f:
            f.write(f"MAX_JOBS={env['MAX_JOBS']} TORCH_CUDA_ARCH_LIST={arch} "
                    f"CUDA_HOME={env['CUDA_HOME']} NVCC_APPEND_FLAGS={env['NVCC_APPEND_FLAGS']}\n")
        cmd = [self.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
               "--no-index", "--no-cache-dir", "--target", self.site, "."]
        rc = self.run(cmd, log, timeout=min(self.args.build_timeout, self.remaining() - 60),
                      env=env)
        detail = f"arch {arch}, {env['MAX_JOBS']} jobs"
        if rc != 0:
            return self.step("build", "timeout" if rc is None else "failed", t0,
                             f"pip exit {rc}; {detail}; see the end of build.log", log)
        check = r"""
import pathlib, re, sys, torch, pykd
print("pykd from", pykd.__file__)
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pykd::"))
for op in ops:
    print(f"  {op:32} CPU={has(op, 'CPU')} CUDA={has(op, 'CUDA')}")
missing = [op for op in ops if has(op, "CPU") and not has(op, "CUDA")]
if missing or not ops:
    print(f"no CUDA kernel for: {missing or 'any pykd op'}")
    sys.exit(3)
"""
        rc = self.run([self.python, "-c", check], log, timeout=120, cwd=self.work)
        spills, kernels = self.ptxas_report(log)
        if rc == 3:  # importable: the steps after still run, on what has CUDA kernels
            return self.step("build", "failed", t0, "built, but some pykd ops have no CUDA "
                             f"kernel (see build.log); {detail}", log, importable=True)
        if rc != 0:
            return self.step("build", "failed", t0, f"built, but pykd does not import (see "
                             f"build.log); {detail}", log)
        return self.step("build", "passed", t0, detail + (f"; ptxas reports spills in "
                         f"{len(spills)} kernels" if spills else f"; {len(kernels)} kernels, "
                         "no spills (ptxas -v)" if kernels else ""), log, spills=spills,
                         ptxas=kernels)

    @staticmethod
    def ptxas_report(log):
        """From ptxas -v in the build log: kernels with spills, and every kernel's registers,
        stack frame and spill bytes (mangled names)."""
        spills, kernels, current = [], {}, None
        try:
            text = open(log, errors="replace").read()
        except OSError:
            return spills, kernels
        for line in text.splitlines():
            m = re.search(r"Compiling entry function '([^']+)' for '(\w+)'", line)
            if m:
                current = f"{m.group(1)} [{m.group(2)}]"
                kernels.setdefault(current, {})
                continue
            if current is None:
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                          r"loads", line)
            if m:
                kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                        spill_loads=int(m.group(3)))
                if int(m.group(2)) or int(m.group(3)):
                    spills.append(f"{current[:100]}: {m.group(2)} B stores, {m.group(3)} B loads")
            m = re.search(r"Used (\d+) registers", line)
            if m:
                kernels[current]["registers"] = int(m.group(1))
        return sorted(set(spills)), kernels

    # -- 4. tests and 5. sanitizers, in parallel ------------------------------------------

    def tests_and_sanitizers(self):
        limit = min(self.args.check_timeout, self.remaining() - self.args.bench_reserve - 20)
        if limit < 60:
            limit = max(30.0, self.remaining() - 60)
        self.check_limit = limit
        t0 = time.monotonic()
        jobs = {}
        if "tests" not in self.args.skip:
            jobs["tests"] = self.start_tests()
        else:
            self.skip_step("tests", "--skip tests")
        if "sanitize" not in self.args.skip:
            jobs["exercise"] = self.start_exercise(None)
            tools = [t for t in self.args.tools if t]
            if not self.facts.get("sanitizer"):
                for tool in tools:
                    self.skip_step(f"sanitize {tool}", "compute-sanitizer not found")
            else:
                for tool in tools:
                    jobs[tool] = self.start_exercise(tool)
        else:
            self.skip_step("sanitize", "--skip sanitize")
        ended = {}  # name -> (exit status or None, seconds)
        while len(ended) < len(jobs) and time.monotonic() - t0 < limit:
            for name, (proc, _, _) in jobs.items():
                if name not in ended and proc.poll() is not None:
                    ended[name] = (proc.returncode, time.monotonic() - t0)
            time.sleep(0.5)
        for name, (proc, log, extra) in jobs.items():
            if name not in ended:  # at the time limit
                self.kill(proc)
                ended[name] = (None, time.monotonic() - t0)
            proc.log_file.close()
            rc, seconds = ended[name]
            started = time.monotonic() - seconds  # so that the step reports its own duration
            if name == "tests":
                self.finish_tests(rc, log, extra, started)
            else:
                self.finish_exercise(name, rc, log, extra, started)

    def start_tests(self):
        log = self.log("test.log")
        junit = self.log("junit.xml")
        # -v: one line per test with its outcome (and a skip's reason), so that a run cut short by
        # its time limit, which writes no junit XML, can still be read (parse_pytest_log).
        cmd = [self.python, "-m", "pytest", "-rs", "-v", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "--durations=15", "tests"]
        if self.facts.get("pytest_timeout"):
            cmd.insert(-1, "--timeout=240")
        env = None
        workers = self.args.pytest_workers
        if workers and self.facts.get("xdist"):
            # The CPU tests (training runs, gradcheck) take most of the suite's time; a file per
            # worker keeps each module's fixtures (a trained teacher) computed once.
            cmd[-1:-1] = ["-n", str(workers), "--dist", "loadfile"]
            threads = max(2, (os.cpu_count() or 8) // (workers + 2))
            env = self.env(OMP_NUM_THREADS=str(threads))
        elif workers:
            self.skipped.append("tests run serially: pytest-xdist is not installed")
        cmd[-1:-1] = self.args.pytest_args
        return self.spawn(cmd, log, env=env), log, junit

    def finish_tests(self, rc, log, junit, t0):
        summary = parse_junit(junit, self.facts.get("device_count") or 0, self.args.allow_skip)
        if summary.get("error"):  # no XML: pytest was stopped; read its verbose log instead
            partial = parse_pytest_log(log, self.facts.get("device_count") or 0,
                                       self.args.allow_skip)
            summary = {**partial, "error": summary["error"] + "; counts read from test.log"}
        problems = []
        if rc is None:
            problems.append("timed out")
        elif rc == 5:
            problems.append("pytest collected no tests")
        elif rc != 0:
            problems.append(f"pytest exit {rc}")
        if summary.get("error"):
            problems.append(summary["error"])
        if summary.get("cuda_skipped"):
            problems.append(f"{summary['cuda_skipped_count']} CUDA tests skipped")
        if summary.get("tests") and not summary.get("cuda_passed"):
            problems.append("no CUDA test passed")
        for s in summary.get("other_skipped", []):
            self.skipped.append(f"test (not CUDA) skipped: {s}")
        for s in summary.get("allowed_skipped", []):
            self.skipped.append(f"CUDA test skipped for want of hardware: {s}")
        counts = {k: summary.get(k, 0) for k in ("tests", "passed", "failed", "errors", "skipped")}
        detail = ", ".join(f"{v} {k}" for k, v in counts.items()) + (
            f"; {summary.get('cuda_passed', 0)} CUDA tests passed")
        if problems:
            detail += "; " + "; ".join(problems)
        self.step("tests", "failed" if problems else "passed", t0, detail, log, summary=summary)

    def start_exercise(self, tool):
        name = tool or "exercise"
        log = self.log(f"sanitizer-{tool}.log" if tool else "exercise.log")
        out_json = self.log(f"exercise-{name}.json")
        # The plain run checks every result in float64; under a sanitizer the same cases (each
        # seeded by its name) only run, which is what the tools need and much faster.
        exercise = [self.python, os.path.join(HERE, "gpu_exercise.py"), "--device",
                    self.args.exercise_device, "--json", out_json, "--label", name,
                    "--checks", "light" if tool else "full",
                    # Start no path after this, so that the tool still ends and counts its errors.
                    "--max-seconds", str(int(max(20, self.check_limit_hint() - 40))),
                    *self.args.exercise_args]
        threads = str(max(2, (os.cpu_count() or 8) // 8))
        if not tool:
            return self.spawn(exercise, log, env=self.env(OMP_NUM_THREADS=threads)), log, {
                "json": out_json}
        sanitizer_log = self.log(f"sanitizer-{tool}.sanitizer.log")
        cmd = [self.facts["sanitizer"], "--tool", tool, "--error-exitcode",
               str(SANITIZER_ERROR_EXIT), "--print-limit", "100", "--log-file", sanitizer_log]
        # Only pykd's kernels are instrumented, except for initcheck: it must see the writes
        # of torch's kernels into the inputs, or every read of them would look uninitialized.
        if tool != "initcheck" and self.kernel_filter():
            cmd += self.kernel_filter()
        if tool == "memcheck":
            cmd += ["--leak-check", "no"]
        # One cudaMalloc per tensor, so that memcheck sees each tensor's bounds and initcheck each
        # fresh buffer (the caching allocator hands out pieces of larger, reused blocks).
        env = self.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1", OMP_NUM_THREADS=threads)
        return self.spawn(cmd + exercise, log, env=env), log, {
            "json": out_json, "sanitizer_log": sanitizer_log, "filtered": tool != "initcheck"
            and bool(self.kernel_filter())}

    def check_limit_hint(self):
        """The time limit tests_and_sanitizers will give its jobs (set before they start)."""
        return getattr(self, "check_limit", None) or min(
            self.args.check_timeout, self.remaining() - self.args.bench_reserve - 20)

    def kernel_filter(self):
        if not hasattr(self, "_filter"):
            helptext = self.capture([self.facts["sanitizer"], "--help"], timeout=30)
            self._filter = (["--kernel-name", "kernel_substring=pykd"]
                            if "--kernel-name" in helptext else [])
            if self._filter:  # the syntax, tried on a program without CUDA: exit 0 if accepted
                try:
                    ok = subprocess.run([self.facts["sanitizer"], *self._filter, "true"],
                                        capture_output=True, timeout=60).returncode == 0
                except (OSError, subprocess.TimeoutExpired):
                    ok = False
                if not ok:
                    self._filter = []
            if not self._filter:
                self.skipped.append("compute-sanitizer has no --kernel-name filter, or refused "
                                    "kernel_substring=pykd: every kernel (torch's too) "
                                    "instrumented")
        return self._filter

    def finish_exercise(self, name, rc, log, extra, t0):
        report = read_json(extra["json"])
        paths = report.get("paths", []) if report else []
        failed = [p for p in paths if p.get("status") == "failed"]
        cases = sum(p.get("cases", 0) for p in paths)
        if name == "exercise":
            for p in paths:
                if p.get("status") in ("skipped", "not run"):
                    self.skipped.append(f"exercise path {p['path']}: {p.get('reason')}")
            for op in report.get("ops_never_seen_on_device", []) if report else []:
                self.skipped.append(f"exercise: op {op} never seen by the dispatch counter (not "
                                    "called, or called on autograd's thread, which it may miss)")
        else:
            late = [p["path"].split(":")[0] for p in paths if p.get("status") == "not run"]
            if late:
                self.skipped.append(f"sanitize {name}: paths not run for want of time: "
                                    + "; ".join(late))
        problems = []
        if rc is None:
            problems.append("timed out")
        if not report:
            problems.append("the exercise wrote no results")
        if failed:
            problems.append(f"{len(failed)} paths failed: " + "; ".join(
                f"{p['path'].split(':')[0]} ({p.get('failed')} of {p.get('cases')}: "
                f"{(p.get('failures') or [{}])[0].get('error', '')[:160]})" for p in failed[:4]))
        sanitizer = None
        if name != "exercise":
            sanitizer = parse_sanitizer_log(extra["sanitizer_log"])
            sanitizer["kernel_filter"] = extra["filtered"]
            if not sanitizer["summary_found"]:
                problems.append("no sanitizer summary (the tool did not finish or refused the "
                                "device; see its log)")
            if sanitizer["pykd"]:
                problems.append(f"{sanitizer['pykd']} errors in pykd kernels")
            if sanitizer["unattributed"]:
                problems.append(f"{sanitizer['unattributed']} errors not attributed")
            if rc not in (None, 0, 1, SANITIZER_ERROR_EXIT):
                problems.append(f"exit {rc}")
        elif rc not in (None, 0, 1):
            problems.append(f"exit {rc}")
        detail = f"{len(paths)} paths, {cases} cases"
        if sanitizer:
            detail += (f"; {sanitizer['total']} errors reported, {sanitizer['pykd']} in pykd, "
                       f"{sanitizer['other']} elsewhere")
        if problems:
            detail += "; " + "; ".join(problems)
        step_name = "exercise (no sanitizer)" if name == "exercise" else f"sanitize {name}"
        self.step(step_name, "failed" if problems else "passed", t0, detail, log,
                  sanitizer=sanitizer, exercise_failures=[
                      {"path": p["path"], "failures": p.get("failures", [])[:5]} for p in failed])

    # -- 6. benchmark ---------------------------------------------------------------------

    def bench(self):
        t0 = time.monotonic()
        log = self.log("bench.log")
        limit = min(self.args.bench_timeout, self.remaining() - 15)
        if limit < 45:
            return self.skip_step("bench", f"only {self.remaining():.0f} s of the budget left")
        cmd = [self.python, os.path.join(HERE, "bench_gpu.py"), "--out", self.out,
               "--budget-s", str(int(limit - 10)), "--invoked-by", self.args.invoked_by,
               *self.args.bench_args]
        rc = self.run(cmd, log, timeout=limit)
        report = read_json(os.path.join(self.out, "gpu.json"))
        problems = []
        if rc is None:
            problems.append("timed out (gpu.json holds what was measured)")
        elif rc != 0:
            problems.append(f"exit {rc}")
        if not report:
            problems.append("no gpu.json")
        detail = ""
        if report:
            goals = report.get("goals", [])
            met = sum(1 for g in goals if g.get("met") is True)
            unmet = [g["goal"] for g in goals if g.get("met") is False]
            detail = (f"{len(report.get('kd', []))} KD rows, {len(report.get('hint', []))} hint "
                      f"rows; goals met {met} of {len(goals)}")
            for s in report.get("skipped", []):
                self.skipped.append(f"bench: {s}")
            if unmet:
                detail += "; not met: " + "; ".join(unmet)
        if problems:
            detail += ("; " if detail else "") + "; ".join(problems)
        return self.step("bench", "failed" if problems else "passed", t0, detail, log)

    # -- summary --------------------------------------------------------------------------

    def summarize(self):
        os.makedirs(self.out, exist_ok=True)
        failed = [s for s in self.steps if s["status"] in ("failed", "timeout")]
        result = {
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": self.args.invoked_by,
            "seconds": round(self.elapsed(), 1),
            "ok": not failed,
            "environment": self.facts,
            "steps": self.steps,
            "skipped": self.skipped,
        }
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
            f.write("\n")
        text = render_summary(result)
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(text)
        with tarfile.open(os.path.join(self.out, "logs.tar.gz"), "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
        print("\n" + text, flush=True)
        return 0 if not failed else 1

    def cleanup(self):
        for proc in self.children:
            if proc.poll() is None:
                self.kill(proc)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def parse_junit(path, device_count, allow):
    """Counts, failures and skips from pytest's junit XML; a skip is a CUDA test's when its id or
    reason mentions CUDA or a GPU; one whose reason names hardware this machine lacks (two GPUs)
    is allowed, listed apart."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        return {"error": f"no junit XML ({error})"}
    results = []
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None or error is not None:
            node = failure if failure is not None else error
            message = (node.get("message") or node.text or "").strip().splitlines()
            results.append((test_id, "failed" if failure is not None else "errors",
                            message[0] if message else ""))
        elif skipped is not None:
            outcome = "xfailed" if "xfail" in (skipped.get("type") or "") else "skipped"
            results.append((test_id, outcome, (skipped.get("message") or "").strip()))
        else:
            results.append((test_id, "passed", ""))
    return classify_tests(results, device_count, allow)


def classify_tests(results, device_count, allow):
    """Counts and lists from (test id, outcome, message) triples; see parse_junit."""
    allowed = [re.compile(p, re.I) for p in (HARDWARE_SKIPS if device_count < 2 else []) + allow]
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "xfailed": 0,
           "cuda_passed": 0, "failures": [], "cuda_skipped": [], "allowed_skipped": [],
           "other_skipped": []}
    for test_id, outcome, message in results:
        out["tests"] += 1
        is_cuda = re.search(r"cuda|gpu", test_id, re.I)
        # A test that ran on the GPU: test_cuda.py's, or one parametrized with the device "cuda".
        ran_on_gpu = re.search(r"(^|[./])test_cuda(\.py)?::|[\[\-]cuda[\]\-]", test_id)
        if outcome in ("failed", "errors"):
            out[outcome] += 1
            out["failures"].append(f"{test_id}: {message[:300]}")
        elif outcome == "xfailed":
            out["xfailed"] += 1
        elif outcome == "skipped":
            out["skipped"] += 1
            entry = f"{test_id}: {message}"
            if is_cuda or re.search(r"cuda|gpu", message, re.I):
                bucket = "allowed_skipped" if any(a.search(message) for a in allowed) else \
                    "cuda_skipped"
            else:
                bucket = "other_skipped"
            out[bucket].append(entry)
        else:
            out["passed"] += 1
            if ran_on_gpu:
                out["cuda_passed"] += 1
    for key in ("failures", "cuda_skipped", "allowed_skipped", "other_skipped"):
        out[f"{key}_count"] = len(out[key])
        out[key] = out[key][:200]
    return out


def parse_pytest_log(path, device_count, allow):
    """The outcomes of pytest -v's lines "path::test[params] OUTCOME (reason)"."""
    results = []
    try:
        text = open(path, errors="replace").read()
    except OSError as error:
        return {"error": f"no test log ({error})"}
    # "tests/x.py::t[p] PASSED (reason)", or under xdist "[gw0] [ 3%] PASSED tests/x.py::t[p]"
    pattern = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?: \((.*)\))?")
    xdist = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) "
                       r"(\S+::\S+)")
    names = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
             "SKIPPED": "skipped", "XFAIL": "xfailed"}
    for line in text.splitlines():
        m = pattern.match(line.strip())
        if m:
            results.append((m.group(1), names[m.group(2)], m.group(3) or ""))
            continue
        m = xdist.match(line.strip())
        if m:
            results.append((m.group(2), names[m.group(1)], ""))
    return classify_tests(results, device_count, allow)


SUMMARY_LINE = re.compile(r"ERROR SUMMARY: (\d+) errors?")
RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, "
                          r"(\d+) warnings?\)")
NOT_ERRORS = re.compile(r"^(COMPUTE-SANITIZER|ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY|"
                        r"Target application returned|This can happen|Saved host backtrace)")


def parse_sanitizer_log(path):
    """Errors of a compute-sanitizer log: the tool's own count, and each reported error (a block
    of lines) attributed to pykd when the block names it (kernel name, source file or library)."""
    result = {"log": os.path.basename(path), "summary_found": False, "total": 0, "pykd": 0,
              "other": 0, "unattributed": 0, "examples": [], "tool_messages": []}
    try:
        text = open(path, errors="replace").read()
    except OSError:
        result["tool_messages"].append("no sanitizer log")
        return result
    blocks, current = [], None
    for line in text.splitlines():
        if not line.startswith("========="):
            continue
        body = line[len("========="):]
        if body.startswith(" ") and not body.startswith("  ") and body.strip():
            head = body.strip()
            m, r = SUMMARY_LINE.search(head), RACE_SUMMARY.search(head)
            if m:
                result["summary_found"] = True
                result["total"] += int(m.group(1))
            elif r:
                result["summary_found"] = True
                result["total"] += int(r.group(2)) + int(r.group(3))
            if NOT_ERRORS.match(head):
                current = None
                if not (m or r) and not head.startswith(("COMPUTE-SANITIZER", "Saved host")):
                    result["tool_messages"].append(head[:200])
                continue
            current = [head]
            blocks.append(current)
        elif current is not None and body.strip():
            current.append(body.strip())
    for block in blocks:
        joined = "\n".join(block)
        # A device error names its kernel in its first "at ..." line; an API error has only the
        # host backtrace, whose frames name pykd's library or functions when pykd made the call.
        device_at = next((line for line in block[1:] if line.startswith("at ")), None)
        if re.search(r"pykd", device_at if device_at is not None else joined):
            result["pykd"] += 1
            if len(result["examples"]) < 8:
                result["examples"].append(joined[:600])
        elif re.search(r"\bat \S|Host Frame|hazard|access|barrier|memory", joined, re.I):
            result["other"] += 1
            if len(result["examples"]) < 8:
                result["examples"].append("(outside pykd) " + joined[:400])
        else:
            result["tool_messages"].append(block[0][:200])
    counted = result["pykd"] + result["other"]
    if result["total"] > counted and not blocks:
        result["unattributed"] = result["total"] - counted
    return result


def listed(items, limit=15, total=None):
    items = list(items)
    total = len(items) if total is None else total
    more = [f"... and {total - limit} more (summary.json lists up to 200)"] if total > limit \
        else []
    return [f"- {x}" for x in items[:limit]] + ([f"- {more[0]}"] if more else [])


def log_tail(path, lines=25):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-lines:]
    except OSError:
        return []


def render_summary(result):
    env = result["environment"]
    lines = [
        f"# pykd GPU check: {'PASSED' if result['ok'] else 'FAILED'}",
        "",
        f"{env.get('device', 'no GPU')} ({env.get('capability', '?')}, {env.get('sms', '?')} SMs, "
        f"{env.get('memory_gib', '?')} GiB), driver {env.get('driver', '?')}; torch "
        f"{env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), nvcc "
        f"{env.get('nvcc_version', '?')}, compute-sanitizer {env.get('sanitizer_version', '?')}, "
        f"Python {env.get('python', '?')}, triton {env.get('triton')}, liger_kernel "
        f"{env.get('liger_kernel')}; {env.get('cpus', '?')} CPUs; kernel {env.get('kernel', '?')}"
        + (f" ({env['runtime']})" if env.get("runtime") else "") + f"; commit {env.get('commit')}.",
        "",
        f"`{result['command']}`, {result['seconds']} s, {result['when']}.",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for s in result["steps"]:
        detail = str(s["detail"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {detail} |")
    for s in result["steps"]:
        if s["name"] == "tests" and s.get("summary"):
            t = s["summary"]
            if t.get("failures"):
                lines += ["", "## Test failures", ""] + listed(t["failures"], 40,
                                                                 t.get("failures_count"))
            if t.get("cuda_skipped"):
                lines += ["", "## CUDA tests skipped (a failure here)", ""] + listed(
                    t["cuda_skipped"], total=t.get("cuda_skipped_count"))
        if s.get("sanitizer"):
            z = s["sanitizer"]
            if z["examples"] or z["tool_messages"]:
                lines += ["", f"## {s['name']}: what the tool reported", ""]
                lines += ["```"] + [e for e in z["examples"]] + ["```"] if z["examples"] else []
                lines += [f"- tool: {m}" for m in z["tool_messages"][:10]]
        for f in s.get("exercise_failures") or []:
            lines += ["", f"## {s['name']}: {f['path']}", ""] + [
                f"- {x['case']}: {x['error']}" for x in f["failures"]]
        if s.get("spills"):
            lines += ["", "## ptxas spills", ""] + [f"- {x}" for x in s["spills"]]
        if s["status"] in ("failed", "timeout") and s.get("log_tail"):
            lines += ["", f"## {s['name']}: the end of {s['log']}", "", "```"] + [
                x[:300] for x in s["log_tail"]] + ["```"]
    lines += ["", "## Skipped or not run", ""]
    lines += [f"- {x}" for x in result["skipped"]] or ["- nothing"]
    lines += ["", "Logs: logs.tar.gz (build.log, test.log, junit.xml, sanitizer-TOOL.log with "
              "the tool's own sanitizer-TOOL.sanitizer.log and exercise-TOOL.json, exercise.log, "
              "bench.log, env.txt). Benchmark: gpu.md, gpu.json.", ""]
    return "\n".join(lines)


def dry_run(args):
    """What the run would do, checked without a GPU: the tools it would look for, the plan of the
    exercise, the parsers on sample logs."""
    print(f"out={args.out} work={args.work} budget={args.budget}s wheels={args.wheels} "
          f"tools={args.tools} skip={args.skip}")
    found = {t: shutil.which(t) for t in ("nvcc", "compute-sanitizer", "nvidia-smi", "ncu")}
    print("tools on PATH here: " + ", ".join(f"{k}={v or 'absent'}" for k, v in found.items()))
    wheels = sorted(glob.glob(os.path.join(args.wheels, "*.whl")))
    print(f"wheels to install: {[os.path.basename(w) for w in wheels] or 'none'}")
    rc = subprocess.call([sys.executable, os.path.join(HERE, "gpu_exercise.py"), "--dry-run"],
                         cwd=REPO)
    rc |= subprocess.call([sys.executable, os.path.join(HERE, "bench_gpu.py"), "--dry-run"],
                          cwd=REPO)
    return rc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO,
                                                                               "gpu-check-out"))
    parser.add_argument("--work", default=None,
                        help="scratch folder for the build and the logs (default: a fresh "
                             "folder under /tmp)")
    parser.add_argument("--budget", type=float, default=float(os.environ.get(
        "GPU_CHECK_BUDGET_S", 560)), help="seconds for everything (default 560, inside the "
        "device machine's 600 s limit for one command)")
    parser.add_argument("--build-timeout", type=float, default=330)
    parser.add_argument("--check-timeout", type=float, default=260,
                        help="seconds for the tests and the sanitizers, which run together")
    parser.add_argument("--bench-timeout", type=float, default=300)
    parser.add_argument("--bench-reserve", type=float, default=170,
                        help="seconds kept for the benchmark when limiting the earlier steps")
    parser.add_argument("--wheels", default=os.environ.get("GPU_CHECK_WHEELS") or
                        os.path.join(REPO, ".whl"))
    parser.add_argument("--tools", type=lambda s: s.split(","), default=TOOLS)
    parser.add_argument("--skip", type=lambda s: s.split(","), default=[],
                        help="comma-separated steps to leave out: build,tests,sanitize,bench")
    parser.add_argument("--allow-skip", action="append", default=[],
                        help="a regular expression of CUDA skip reasons not to fail on")
    parser.add_argument("--pytest-args", type=shlex.split, default=[])
    parser.add_argument("--pytest-workers", type=int, default=4,
                        help="pytest-xdist workers when it is installed (0: one process)")
    parser.add_argument("--bench-args", type=shlex.split, default=[])
    parser.add_argument("--exercise-args", type=shlex.split, default=[],
                        help="more options for gpu_exercise.py, e.g. \"--only hint\"")
    parser.add_argument("--invoked-by", default=None)
    parser.add_argument("--exercise-device", default="cuda",
                        help="the exercise's --device (cpu only to test this driver without a GPU)")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    args.invoked_by = args.invoked_by or shlex.join(["python3", "bench/gpu_check.py",
                                                     *(argv if argv is not None else
                                                       sys.argv[1:])])
    if args.dry_run:
        return dry_run(args)
    if args.work is None:
        args.work = subprocess.check_output(["mktemp", "-d", "/tmp/gpucheck.XXXXXX"],
                                            text=True).strip()
    runner = Runner(args)
    os.makedirs(runner.logs, exist_ok=True)
    os.makedirs(runner.out, exist_ok=True)
    print(f"pykd GPU check: out {runner.out}, work {runner.work}, budget {args.budget:.0f} s",
          flush=True)
    try:
        runner.record_env()
        runner.install_wheels()
        built = False
        if "build" in args.skip:
            runner.skip_step("build", "--skip build (pykd must already be importable)")
            built = True
        else:
            result = runner.build()
            built = result["status"] == "passed" or result.get("importable", False)
        if built:
            runner.tests_and_sanitizers()
            if "bench" in args.skip:
                runner.skip_step("bench", "--skip bench")
            else:
                runner.bench()
        else:
            for name in ("tests", "sanitize", "bench"):
                runner.skip_step(name, "the build failed")
    except Exception as error:  # noqa: BLE001  (record it; the summary still gets written)
        import traceback

        runner.step("driver", "failed", time.monotonic(), f"{type(error).__name__}: {error}")
        traceback.print_exc()
    finally:
        runner.cleanup()
    return runner.summarize()


if __name__ == "__main__":
    sys.exit(main())
