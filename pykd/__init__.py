"""pykd: fused knowledge-distillation losses for PyTorch."""
from . import ops  # noqa: F401  (registers fake kernels and autograd for torch.ops.pykd)
from .fused_linear import FusedLinearKDLoss
from .hint import FeatureCapture, HintRegressor, hint_loss
from .loss import KDLoss, kd_loss
# TEMPORARY: the pure-PyTorch stand-in until the fused op (branch sparse) is merged; at the merge
# this line becomes the fused op's import. Everything else calls pykd.sparse_kd_loss.
from ._sparse_stand_in import sparse_kd_loss

__all__ = ["FeatureCapture", "FusedLinearKDLoss", "HintRegressor", "KDLoss", "hint_loss", "kd_loss",
           "sparse_kd_loss", "TeacherCache"]
__version__ = "0.1.0"


def __getattr__(name):
    # The teacher cache needs numpy (the `train` extra): imported on first use, not with pykd.
    if name == "TeacherCache":
        from .teacher_cache import TeacherCache

        return TeacherCache
    raise AttributeError(f"module 'pykd' has no attribute {name!r}")
