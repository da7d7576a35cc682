#!/usr/bin/env bash
# Compiles pykd with its CUDA kernels on a machine without a GPU, in a fresh venv with the CUDA
# build of torch: builds a copy of the sources, imports it, checks that every op implemented in
# csrc/cuda (the KD ops at least) has a CUDA kernel registered, and runs the test suite against
# that build (its CPU tests; the GPU tests skip with their reason).
#
# Environment: PYKD_CUDA_TORCH (default 2.14.1), CUDA_HOME (default /usr/local/cuda),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default 2).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/pykd-cuda-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
export FORCE_CUDA=1
unset FORCE_CPU

echo "== cuda build check: venv with torch==${PYKD_CUDA_TORCH:-2.14.1} in $work"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
# The project's own and its test dependencies, from pyproject.toml, beside the CUDA torch.
deps=$(cd "$repo" && "$py" -c '
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["test"]
print(" ".join(r for r in reqs if not r.startswith("torch")))')
# shellcheck disable=SC2086  # one word per requirement
"$py" -m pip install -q --disable-pip-version-check \
  "torch==${PYKD_CUDA_TORCH:-2.14.1}" $deps ninja setuptools wheel
"$py" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else "torch is not a CUDA build")'

# A copy of the sources (tracked and untracked, not ignored), so that this build and its objects
# never mix with a CPU build in the work tree.
src="$work/src"
mkdir "$src"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard |
  xargs -0 cp --parents -t "$src")

echo "== building: CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST" \
  "MAX_JOBS=$MAX_JOBS"
start=$SECONDS
(cd "$src" && "$py" setup.py -q build_ext --inplace)
echo "== built in $((SECONDS - start)) s"

echo "== checking the registered kernels"
(cd "$src" && "$py" - <<'PY'
import pathlib
import re

import torch

import pykd

assert pathlib.Path(pykd.__file__).resolve().is_relative_to(pathlib.Path.cwd()), pykd.__file__
cuda_sources = "".join(p.read_text() for p in sorted(pathlib.Path("csrc/cuda").glob("*.cu")))
expected = {"kd_loss"} | set(re.findall(r'm\.impl\(\s*"(\w+)"', cuda_sources))
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pykd::"))
has = torch._C._dispatch_has_kernel_for_dispatch_key
for op in ops:
    print(f"  {op:32} CPU={has(op, 'CPU')} CUDA={has(op, 'CUDA')}")
missing = sorted(n for n in expected if not has(f"pykd::{n}", "CUDA"))
if missing:
    raise SystemExit(f"no CUDA kernel registered for: {', '.join(missing)}")
print(f"  CUDA kernels registered for {', '.join(sorted(expected))}")
PY
)

echo "== tests against the CUDA build"
status=0
# PYTHONPATH: tests that start a Python of their own import this build too.
# The package-metadata test needs an installed pykd; this build is in place, not installed (the
# README's install above runs that test).
(cd "$src" && PYTHONPATH="$src" "$py" -m pytest -q -p no:cacheprovider tests \
  --deselect tests/test_cli.py::test_version_and_package_metadata) || status=$?
if [ "$status" -eq 5 ]; then
  echo "cuda build check: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
