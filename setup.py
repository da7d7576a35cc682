"""Builds pykd._C from csrc/ against the torch installed in this environment.

Environment overrides: FORCE_CUDA=1 / FORCE_CPU=1 (default: CUDA when torch is a CUDA build and a
CUDA toolkit is found, whether or not a GPU is visible), TORCH_CUDA_ARCH_LIST (needed for a CUDA
build without a GPU), MAX_JOBS, DEBUG=1 (-O0 -g).
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
except ImportError:
    sys.exit(
        "pykd is a PyTorch extension and is built against the torch already installed in this "
        "environment, but none was found. Install torch first (for example "
        "`pip install torch`), then run `pip install .` again."
    )
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def use_cuda():
    if env_flag("FORCE_CPU"):
        return False
    if env_flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def sources(with_cuda):
    patterns = ["csrc/*.cpp", "csrc/cpu/*.cpp", "csrc/python/*.cpp"]
    if with_cuda:
        patterns.append("csrc/cuda/*.cu")
    return sorted(p for pattern in patterns for p in glob.glob(pattern, root_dir=HERE))


def extension():
    with_cuda = use_cuda()
    debug = env_flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std: torch's build helpers add the standard its headers need (C++20 from torch 2.14 on).
    cxx = opt + ["-fopenmp"]
    kwargs = dict(
        name="pykd._C",
        sources=sources(with_cuda),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        return cpp_extension.CppExtension(**kwargs)
    # No --use_fast_math: the kernels pick their fast operations themselves (exp2), and the
    # per-row logarithms and divisions stay exact.
    kwargs["extra_compile_args"]["nvcc"] = opt + ["-lineinfo"]
    kwargs["define_macros"] = [("PYKD_WITH_CUDA", None)]
    return cpp_extension.CUDAExtension(**kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
