#!/usr/bin/env bash
# One command for a fresh GPU machine: build pykd, run the whole test suite (no CUDA test may skip),
# compute-sanitizer (memcheck, racecheck, initcheck, synccheck) over every CUDA kernel path, and the
# GPU benchmark, everything written under one folder. bench/gpu_check.py does the work and says
# what each step does; bench/README.md says how to run it on the device machine.
#
#   bash bench/gpu_check.sh [OUT] [gpu_check.py options]     OUT defaults to $OUT, else ./gpu-check-out
#
# Carried wheels (Liger-Kernel) are installed from .whl/ in the checkout (or GPU_CHECK_WHEELS).
# Exit status 1 if anything failed; OUT/summary.md says what ran, what failed and what was skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-$PWD/gpu-check-out}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  out=$1
  shift
fi
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "gpu_check.sh: $python not found" >&2; exit 2; }
exec "$python" bench/gpu_check.py --out "$out" \
  --invoked-by "bash bench/gpu_check.sh $out${*:+ $*}" "$@"
