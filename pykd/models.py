"""The seed documents' models, looked up by name, and a way to bring your own.

``keras-teacher`` / ``keras-student``: the Keras deck's CNNs (000). Each is two blocks of
Conv 3x3 stride 2 "same" - LeakyReLU(0.2) - MaxPool 2x2 stride 1 "same", then Flatten - Dense.
Keras' "same" pads asymmetrically (the extra row/column goes after), and its max-pool padding never
wins the max; both are reproduced so a 32x32 input gives the deck's 16x16 and 8x8 maps and its
parameter counts (1,515,018 and 313,354 for 10 classes).

``tutorial-teacher`` / ``tutorial-student``: the PyTorch knowledge-distillation tutorial's
TeacherCNN and StudentCNN (001).

``selector-cnn``: the multi-student framework's model selector (003), a 3-layer CNN with batch
normalisation (the seed found fewer layers, or no batch normalisation, to perform poorly); its
"classes" are the students it chooses between.

``ByteLM`` (``byte_lm_teacher`` / ``byte_lm_student``): a small causal transformer over bytes,
for language-model distillation (``python -m pykd.lm``); not in the image registry below.

Every image model's convolutional trunk is the submodule ``features``: it is the default hint/guided
layer for feature distillation (FitNets, 002).

Your own model: pass any ``nn.Module`` to the functions in :mod:`pykd.train`, register a factory
with :func:`register_model`, or name an importable factory as ``"package.module:function"``
(the command line and checkpoints accept that form too).
"""
import importlib
import math
import os
import sys

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "get_factory", "register_model", "model_names", "ByteLM",
           "byte_lm_teacher", "byte_lm_student"]


def _same_padding(size, kernel, stride):
    """Keras' "same" padding for one spatial dimension: (before, after, output size)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class KerasCNN(nn.Module):
    """Conv-LeakyReLU-MaxPool blocks with Keras "same" padding, then one linear layer."""

    def __init__(self, widths, num_classes=10, in_channels=3, image_size=32):
        super().__init__()
        layers = []
        size = image_size
        for width in widths:
            before, after, size = _same_padding(size, 3, 2)
            layers += [
                nn.ZeroPad2d((before, after, before, after)),
                nn.Conv2d(in_channels, width, 3, stride=2),
                nn.LeakyReLU(0.2),
            ]
            before, after, size = _same_padding(size, 2, 1)
            layers += [
                # -inf so that padding never wins the max, as in Keras.
                nn.ConstantPad2d((before, after, before, after), float("-inf")),
                nn.MaxPool2d(2, stride=1),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels * size * size, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class TutorialCNN(nn.Module):
    """The tutorial's CNNs: 3x3 convolutions (padding 1) with ReLU, 2x2 max-pools ("M"),
    then Linear-ReLU-Dropout(0.1)-Linear."""

    def __init__(self, plan, hidden, num_classes=10, in_channels=3, image_size=32):
        super().__init__()
        layers = []
        size = image_size
        for step in plan:
            if step == "M":
                layers.append(nn.MaxPool2d(2, stride=2))
                size //= 2
            else:
                layers += [nn.Conv2d(in_channels, step, 3, padding=1), nn.ReLU()]
                in_channels = step
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * size * size, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def keras_teacher(num_classes=10, in_channels=3, image_size=32):
    return KerasCNN((256, 512), num_classes, in_channels, image_size)


def keras_student(num_classes=10, in_channels=3, image_size=32):
    return KerasCNN((64, 256), num_classes, in_channels, image_size)


def tutorial_teacher(num_classes=10, in_channels=3, image_size=32):
    return TutorialCNN((128, 64, "M", 64, 32, "M"), 512, num_classes, in_channels, image_size)


def tutorial_student(num_classes=10, in_channels=3, image_size=32):
    return TutorialCNN((16, "M", 16, "M"), 256, num_classes, in_channels, image_size)


class SelectorCNN(nn.Module):
    """Three Conv 3x3 (padding 1) - BatchNorm - ReLU - MaxPool 2x2 blocks, then one linear layer."""

    def __init__(self, widths, num_classes=2, in_channels=3, image_size=32):
        super().__init__()
        layers = []
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width),
                       nn.ReLU(), nn.MaxPool2d(2, stride=2)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        size = image_size // 2 ** len(widths)
        self.classifier = nn.Linear(in_channels * size * size, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def selector_cnn(num_classes=2, in_channels=3, image_size=32):
    return SelectorCNN((8, 16, 32), num_classes, in_channels, image_size)


class ByteLM(nn.Module):
    """A causal transformer language model over the 256 byte values: byte and position
    embeddings, pre-norm transformer layers under a causal mask, a final layer norm, and the
    output layer ``head`` (256 classes). ``hidden(x)`` gives the states that ``head`` maps to
    logits, so that a fused-linear loss (pykd.FusedLinearKDLoss) can take the head's weight
    instead of the logits."""

    VOCAB = 256

    def __init__(self, width, layers, heads, context):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(self.VOCAB, width)
        self.position = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.VOCAB)

    def hidden(self, x):
        """[B, L] byte values (int64, L <= context) -> [B, L, width] states."""
        length = x.shape[1]
        if length > self.context:
            raise ValueError(f"ByteLM: sequences of at most {self.context} bytes, got {length}")
        positions = torch.arange(length, device=x.device)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device)
        h = self.blocks(self.embed(x) + self.position(positions), mask=mask, is_causal=True)
        return self.norm(h)

    def forward(self, x):
        return self.head(self.hidden(x))


def byte_lm_teacher(context=128):
    return ByteLM(width=128, layers=4, heads=4, context=context)


def byte_lm_student(context=128):
    return ByteLM(width=64, layers=2, heads=2, context=context)


MODELS = {
    "keras-teacher": keras_teacher,
    "keras-student": keras_student,
    "tutorial-teacher": tutorial_teacher,
    "tutorial-student": tutorial_student,
    "selector-cnn": selector_cnn,
}


def register_model(name, factory):
    """Makes ``factory(num_classes=..., in_channels=..., image_size=...)`` buildable by name."""
    if not callable(factory):
        raise TypeError(f"register_model: factory must be callable, got {type(factory).__name__}")
    MODELS[name] = factory


def model_names():
    return sorted(MODELS)


def _import_from_cwd(module_name):
    """Imports a user's module as ``python -m`` would: the current directory comes first on
    sys.path (a console script such as ``pykd`` does not put it there by itself)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return importlib.import_module(module_name)


def get_factory(name):
    """The factory of a registry name or of "package.module:function" (importable from the
    current directory or sys.path)."""
    if name in MODELS:
        return MODELS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if not module_name or not attr:
            raise ValueError(f"model {name!r}: expected package.module:function")
        try:
            factory = getattr(_import_from_cwd(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"model {name!r}: cannot import it ({e}; the current directory "
                             f"is {os.getcwd()})") from None
        except Exception as e:  # the user's module failed while it was being imported
            raise ValueError(f"model {name!r}: importing {module_name} raised "
                             f"{type(e).__name__}: {e}") from None
        if callable(factory):
            return factory
        raise ValueError(f"model {name!r}: {attr} is not callable")
    raise ValueError(
        f"unknown model {name!r}; choose one of {', '.join(model_names())} "
        "or name a factory as package.module:function"
    )


def build_model(name, num_classes=10, in_channels=3, image_size=32):
    """Builds a model by registry name or "package.module:function"."""
    factory = get_factory(name)
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    except Exception as e:  # a user's factory: report it in one line, as the CLI promises
        raise ValueError(f"model {name!r}: its factory raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r}: the factory returned {type(model).__name__}, "
                         "not an nn.Module")
    return model
