"""pykd: fused knowledge-distillation losses for PyTorch."""
from . import ops  # noqa: F401  (registers fake kernels and autograd for torch.ops.pykd)
from .loss import KDLoss, kd_loss

__all__ = ["KDLoss", "kd_loss"]
__version__ = "0.1.0"
