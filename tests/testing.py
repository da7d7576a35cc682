"""The test matrix shared by every test module: dtypes, devices and tolerances."""
import os
import subprocess
import sys

import pytest
import torch

import pykd  # noqa: F401  (registers the ops)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def cuda_kernels_built():
    return torch._C._dispatch_has_kernel_for_dispatch_key("pykd::kd_loss", "CUDA")


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() and cuda_kernels_built()),
            reason="needs a CUDA GPU and pykd built with its CUDA kernels",
        ),
    ),
]

# (rtol, atol) against the float64 reference, by input dtype.
TOLERANCES = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-3),
    torch.float16: (5e-3, 5e-4),
}


def assert_close(actual, expected, dtype, scale=1.0):
    """Compares with the tolerances of `dtype`, absolute ones scaled by `scale`."""
    rtol, atol = TOLERANCES[dtype]
    # Values rounded into the dtype's subnormal range keep only its absolute spacing.
    smallest_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=max(atol * scale, smallest_step),
        equal_nan=True,
    )


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_python(args, env=None, **kwargs):
    """Runs `python *args` in a child that imports the same pykd as this process (an installed one,
    or a source tree with its extension built in place): the folder holding the imported package
    goes first on PYTHONPATH, and the child starts in tests/, never in a checkout whose pykd/ has
    no extension. `env` adds variables; a value of None removes one."""
    pythonpath = [os.path.dirname(os.path.dirname(pykd.__file__)), TESTS_DIR]
    pythonpath += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    for name, value in (env or {}).items():
        if value is None:
            child_env.pop(name, None)
        else:
            child_env[name] = value
    kwargs.setdefault("cwd", TESTS_DIR)
    return subprocess.run(
        [sys.executable, *map(str, args)], env=child_env, capture_output=True, text=True, **kwargs
    )
