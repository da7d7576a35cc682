"""pykd: fused knowledge-distillation losses for PyTorch."""
import warnings

with warnings.catch_warnings():
    # torch warns at import when numpy is missing. The losses do not need numpy; the command line
    # does, and its commands say so in one line (cli.NEEDS), which this warning would precede.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch  # noqa: F401

from . import ops  # noqa: F401  (registers fake kernels and autograd for torch.ops.pykd)
from .fused_linear import FusedLinearKDLoss
from .hint import FeatureCapture, HintRegressor, hint_loss
from .loss import KDLoss, kd_loss
from .multi_teacher import multi_teacher_kd_loss
from .sparse import sparse_kd_loss

__all__ = ["FeatureCapture", "FusedLinearKDLoss", "HintRegressor", "KDLoss", "TeacherCache",
           "hint_loss", "kd_loss", "multi_teacher_kd_loss", "sparse_kd_loss"]
__version__ = "0.1.0"


def __getattr__(name):
    # The teacher cache needs numpy (the `train` extra): imported on first use, not with pykd.
    if name == "TeacherCache":
        from .teacher_cache import TeacherCache

        return TeacherCache
    raise AttributeError(f"module 'pykd' has no attribute {name!r}")
