"""Feature-hint distillation (FitNets): the batched hint loss, regressors and feature capture."""
import functools
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


def _check_features(name, features):
    if not isinstance(features, (list, tuple)):
        raise TypeError(
            f"hint_loss: {name} must be a list or tuple of tensors, got {type(features).__name__}"
        )
    for k, feature in enumerate(features):
        if not isinstance(feature, torch.Tensor):
            raise TypeError(
                f"hint_loss: {name}[{k}] must be a torch.Tensor, got {type(feature).__name__}"
            )


def _check_weights(weights, pairs):
    if weights is None:
        return [1.0] * pairs
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(
            f"hint_loss: weights must be a list or tuple of numbers, got {type(weights).__name__}"
        )
    if len(weights) != pairs:
        raise ValueError(
            f"hint_loss: weights must hold one number per pair ({pairs}), got {len(weights)}"
        )
    for k, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(f"hint_loss: weights[{k}] must be a number, got {type(weight).__name__}")
        if not math.isfinite(weight):
            raise ValueError(f"hint_loss: weights[{k}] must be finite, got {weight}")
    return [float(w) for w in weights]


def hint_loss(student_features, teacher_features, weights=None):
    """The FitNets hint loss ``sum_k weights[k] * mean((student_features[k] - teacher_features[k])**2)``.

    Pair k must have one shape; pairs may differ from each other (4-D maps, 2-D vectors, single
    elements). All pairs go through one fused kernel (one launch on a GPU, one parallel region on
    the CPU) that accumulates in float32 (float64 for float64 features) and reduces in a fixed
    order, so the result is deterministic. ``weights`` default to 1 per pair. When features
    require grad, the same kernel, in the same single read of every feature, also writes their
    gradients ``2 w_k (s_k - t_k) / numel_k``; autograd keeps only those gradients until the
    backward (never the features), which scales them in place by the upstream gradient (skipped
    when it is exactly 1). So a second backward through the same graph raises, unless both run
    inside ``pykd.ops.functional_backward()``. Without grad, a forward-only kernel. Features of different
    floating dtypes are promoted to a common dtype (a copy of the others); the result is a 0-d
    tensor of that dtype. Non-contiguous features are read through a dense copy; dense ones in any
    memory format (channels_last included) are read in place. Gradients flow to the student
    features and, when they require grad, to the teacher features. An empty pair gives NaN, as
    ``F.mse_loss`` does.
    """
    _check_features("student_features", student_features)
    _check_features("teacher_features", teacher_features)
    if len(student_features) != len(teacher_features):
        raise ValueError(
            "hint_loss: student_features and teacher_features must have the same length, got "
            f"{len(student_features)} and {len(teacher_features)}"
        )
    if not student_features:
        raise ValueError("hint_loss: needs at least one feature pair, got empty lists")
    weights = _check_weights(weights, len(student_features))
    features = [*student_features, *teacher_features]
    if all(f.is_floating_point() for f in features):
        dtype = functools.reduce(torch.promote_types, (f.dtype for f in features))
        features = [f.to(dtype) for f in features]
    pairs = len(student_features)
    grad = torch.is_grad_enabled()
    student_grad = grad and any(f.requires_grad for f in features[:pairs])
    teacher_grad = grad and any(f.requires_grad for f in features[pairs:])
    loss = ops.hint_loss_with_autograd(features[:pairs], features[pairs:], weights, student_grad,
                                       teacher_grad)
    return loss.to(features[0].dtype)


def _check_positive_int(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value}")
    return int(value)


class HintRegressor(nn.Module):
    """Maps a student feature to the teacher's channels, as the FitNets regressor does.

    ``kind="conv"``: a Conv2d with ``kernel_size`` 1 or 3 and the padding that keeps the spatial
    size, for ``[N, student_channels, H, W]`` maps. ``forward(x, size=(H_t, W_t))`` then resizes
    the output to the teacher's spatial size when it differs: adaptive average pooling when no
    dimension grows (each output pixel averages the student pixels it covers), bilinear
    interpolation (``align_corners=False``) when one does.

    ``kind="linear"``: an nn.Linear for ``[N, student_channels]`` features (or any ``[..., C]``);
    ``size`` does not apply.

    The regressor's parameters are ordinary module parameters: give them to the optimizer with the
    student's so they train together.
    """

    KINDS = ("conv", "linear")

    def __init__(self, student_channels, teacher_channels, kernel_size=1, kind="conv"):
        super().__init__()
        owner = "HintRegressor"
        self.student_channels = _check_positive_int(owner, "student_channels", student_channels)
        self.teacher_channels = _check_positive_int(owner, "teacher_channels", teacher_channels)
        if kind not in self.KINDS:
            raise ValueError(f"{owner}: kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        sizes = (1, 3) if kind == "conv" else (1,)
        if (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, numbers.Integral)
            or kernel_size not in sizes
        ):
            allowed = "1 or 3" if kind == "conv" else "1 (kernel_size applies to kind='conv' only)"
            raise ValueError(f"{owner}: kernel_size must be {allowed}, got {kernel_size!r}")
        if kind == "conv":
            self.proj = nn.Conv2d(
                self.student_channels, self.teacher_channels, kernel_size, padding=kernel_size // 2
            )
        else:
            self.proj = nn.Linear(self.student_channels, self.teacher_channels)

    def forward(self, student_feature, size=None):
        if not isinstance(student_feature, torch.Tensor):
            raise TypeError(
                "HintRegressor: student_feature must be a torch.Tensor, got "
                f"{type(student_feature).__name__}"
            )
        if self.kind == "linear":
            if size is not None:
                raise ValueError("HintRegressor: size applies to kind='conv' only")
            if student_feature.dim() < 2 or student_feature.shape[-1] != self.student_channels:
                raise ValueError(
                    f"HintRegressor: expected features [N, {self.student_channels}], got shape "
                    f"{tuple(student_feature.shape)}"
                )
            return self.proj(student_feature)

        if student_feature.dim() != 4 or student_feature.shape[1] != self.student_channels:
            raise ValueError(
                f"HintRegressor: expected a feature map [N, {self.student_channels}, H, W], got "
                f"shape {tuple(student_feature.shape)}"
            )
        out = self.proj(student_feature)
        if size is None:
            return out
        size = self._check_size(size)
        if tuple(out.shape[-2:]) == size:
            return out
        if all(o >= s for o, s in zip(out.shape[-2:], size)):
            return F.adaptive_avg_pool2d(out, size)
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)

    @staticmethod
    def _check_size(size):
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or any(
                isinstance(v, bool) or not isinstance(v, (numbers.Integral, torch.SymInt)) or v <= 0
                for v in size
            )
        ):
            raise ValueError(
                f"HintRegressor: size must be the teacher's spatial size (H, W), two ints > 0, "
                f"got {size!r}"
            )
        return tuple(size)

    def extra_repr(self):
        return f"kind={self.kind!r}"


class FeatureCapture:
    """Captures the outputs of named submodules of any nn.Module with forward hooks.

    ``names`` are dotted names as in ``model.named_modules()`` (``"features.3"``, ``"layer2.1"``).
    After each forward of ``model``, ``capture.features`` maps every name to its module's output,
    in the order of ``names``; the outputs keep their autograd graph, so a hint loss on them trains
    the student. Each forward of ``model`` starts a fresh capture: a module that did not run in the
    latest forward is absent. ``remove()`` (or leaving a ``with`` block) removes every hook; the
    last captured features stay readable.
    """

    def __init__(self, model, names):
        if not isinstance(model, nn.Module):
            raise TypeError(f"FeatureCapture: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise TypeError(
                "FeatureCapture: names must be a list or tuple of module names, got "
                f"{type(names).__name__}"
            )
        if not names:
            raise ValueError("FeatureCapture: names must name at least one module")
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"FeatureCapture: module names must be str, got {name!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"FeatureCapture: names must not repeat, got {list(names)}")
        modules = dict(model.named_modules())
        unknown = [name for name in names if name not in modules]
        if unknown:
            raise KeyError(
                f"FeatureCapture: no submodule named {unknown} in {type(model).__name__}; "
                f"known names include {[n for n in modules if n][:20]}"
            )
        self.names = tuple(names)
        self._outputs = {}
        self._handles = [model.register_forward_pre_hook(self._clear)]
        for name in self.names:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _clear(self, module, args):
        self._outputs.clear()

    def _hook(self, name):
        def hook(module, args, output):
            self._outputs[name] = output

        return hook

    @property
    def features(self):
        return {name: self._outputs[name] for name in self.names if name in self._outputs}

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False
