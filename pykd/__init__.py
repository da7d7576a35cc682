"""pykd: fused knowledge-distillation losses for PyTorch."""
from . import ops  # noqa: F401  (registers fake kernels and autograd for torch.ops.pykd)
from .fused_linear import FusedLinearKDLoss
from .hint import FeatureCapture, HintRegressor, hint_loss
from .loss import KDLoss, kd_loss
from ._multi_stand_in import multi_teacher_kd_loss  # STAND-IN

__all__ = ["FeatureCapture", "FusedLinearKDLoss", "HintRegressor", "KDLoss", "hint_loss", "kd_loss"]
__version__ = "0.1.0"
