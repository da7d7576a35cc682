import os
import sys

import pytest

# The tests import their shared matrix as `testing`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# PYKD_EMULATED_CUDA=forward|reverse|shuffled: every test (but test_cuda.py's, which choose what
# runs where) runs with pykd's CUDA drivers and kernels in place of its CPU kernels, on the host
# (tests/emulated_cuda), the threads of a block scheduled in that order: the CPU tests run the
# CUDA code on a machine without a GPU. Processes a test starts run the CPU kernels.
SCHEDULES = {"forward": 0, "reverse": 1, "shuffled": 2}
EMULATION = os.environ.get("PYKD_EMULATED_CUDA")
if EMULATION is not None and EMULATION not in SCHEDULES:
    raise SystemExit(f"PYKD_EMULATED_CUDA: one of {', '.join(SCHEDULES)}, got {EMULATION!r}")


@pytest.fixture(autouse=True)
def _emulated_cuda(request):
    if EMULATION is None or request.module.__name__ == "test_cuda":
        yield
        return
    from emulated_cuda import build

    with build.emulated() as ops:
        ops.set_schedule(SCHEDULES[EMULATION], 0)
        yield
