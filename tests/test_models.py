"""The seed models: parameter counts of the Keras deck, shapes, and the registry."""
import pytest
import torch
from torch import nn

from pykd import models


def parameters(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, expected", [
    ("keras-teacher", 1_515_018),  # the deck's model.summary() on 32x32x3
    ("keras-student", 313_354),
    ("tutorial-teacher", 1_186_986),  # the PyTorch tutorial's counts
    ("tutorial-student", 267_738),
])
def test_parameter_counts(name, expected):
    assert parameters(models.build_model(name, num_classes=10)) == expected


def test_keras_feature_maps_follow_same_padding():
    # The deck's summary: 16x16 after the first block, 8x8 after the second.
    model = models.build_model("keras-teacher")
    x = torch.randn(2, 3, 32, 32)
    assert model.features[:5](x).shape == (2, 256, 16, 16)
    assert model.features(x).shape == (2, 512, 8, 8)


def test_keras_max_pool_padding_never_wins():
    # All-negative activations: Keras' "same" max-pool ignores padding, so no zero appears.
    model = models.build_model("keras-student")
    with torch.no_grad():
        model.features[1].weight.zero_()
        model.features[1].bias.fill_(-1.0)
        out = model.features[:5](torch.randn(1, 3, 32, 32))
    assert torch.all(out == -0.2)


@pytest.mark.parametrize("name", models.model_names())
def test_num_classes_and_image_size(name):
    model = models.build_model(name, num_classes=7, image_size=64)
    assert model(torch.randn(3, 3, 64, 64)).shape == (3, 7)


def tiny(num_classes=10, in_channels=3, image_size=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))


def test_user_model_by_registration():
    models.register_model("tiny-test", tiny)
    try:
        model = models.build_model("tiny-test", num_classes=4)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    finally:
        del models.MODELS["tiny-test"]


FACTORIES = """
from torch import nn

def tiny(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, num_classes))

def not_a_module(**kwargs):
    return 3
"""


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_user_model_by_import_path(factories):
    model = models.build_model("my_factories:tiny", num_classes=3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("name, message", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("no_such_module_xyz:f", "cannot import it"),
    ("my_factories:missing", "cannot import it"),
    ("my_factories:not_a_module", "returned int"),
])
def test_bad_model_names(factories, name, message):
    with pytest.raises(ValueError, match=message):
        models.build_model(name)


def test_user_model_from_the_current_directory(tmp_path, monkeypatch):
    """As a console script runs: the current directory is not on sys.path by itself."""
    import sys

    (tmp_path / "cwd_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model = models.build_model("cwd_factories:tiny", num_classes=2)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_a_failing_factory_is_one_error(factories, tmp_path):
    (tmp_path / "broken_factories.py").write_text(
        "def broken(num_classes, in_channels, image_size):\n    raise RuntimeError('boom')\n"
        "def no_arguments():\n    pass\n")
    with pytest.raises(ValueError, match="its factory raised RuntimeError: boom"):
        models.build_model("broken_factories:broken")
    with pytest.raises(ValueError, match="its factory raised TypeError"):
        models.build_model("broken_factories:no_arguments")
    with pytest.raises(ValueError, match="expected package.module:function"):
        models.build_model(":tiny")
