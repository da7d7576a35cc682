"""The test matrix shared by every test module: dtypes, devices and tolerances."""
import pytest
import torch

import pykd  # noqa: F401  (registers the ops)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def cuda_kernels_built():
    return torch._C._dispatch_has_kernel_for_dispatch_key("pykd::kd_loss_fwd", "CUDA")


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
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol * scale, equal_nan=True
    )
