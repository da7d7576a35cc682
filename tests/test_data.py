"""Data readers on generated files, deterministic splits, normalisation."""
import pickle

import numpy as np
import pytest
import torch

from pykd.data import DataError, load_dataset


def test_digits_default():
    s = load_dataset("digits")
    assert s.train_x.shape[1:] == (3, 32, 32) and s.num_classes == 10
    assert len(s.train_y) + len(s.val_y) + len(s.test_y) == 1797
    # Normalised with the training split's own statistics.
    torch.testing.assert_close(s.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(s.train_x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    # Every class is in every split (stratified).
    for y in (s.train_y, s.val_y, s.test_y):
        assert set(y.tolist()) == set(range(10))


def test_splits_are_deterministic_and_disjoint():
    a, b = load_dataset("digits", data_seed=3), load_dataset("digits", data_seed=3)
    c = load_dataset("digits", data_seed=4)
    for name in ("train", "val", "test"):
        assert torch.equal(a.split(name)[0], b.split(name)[0])
    assert not torch.equal(a.test_y, c.test_y) or not torch.equal(a.test_x, c.test_x)
    rows = {tuple(x.flatten()[::37].tolist()) for x in torch.cat([a.train_x, a.val_x, a.test_x])}
    assert len(rows) > 1790  # (digits has a handful of duplicate images)


def test_train_fraction_keeps_val_and_test():
    full = load_dataset("digits")
    part = load_dataset("digits", train_fraction=0.25, mean=full.mean, std=full.std)
    assert abs(len(part.train_y) - 0.25 * len(full.train_y)) <= 10
    assert torch.equal(part.val_x, full.val_x) and torch.equal(part.test_y, full.test_y)
    assert torch.bincount(part.train_y).min() >= 25


def write_cifar(root, per_batch=6, classes=("cat", "dog", "ship")):
    rng = np.random.default_rng(0)
    root.mkdir()
    # The real files were pickled by Python 2: bytes keys and names (read with encoding="bytes").
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes],
                     b"num_cases_per_batch": per_batch}, f)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [i % len(classes) for i in range(per_batch)]
        batches[name] = (data, labels)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    return batches


def test_cifar10_reader(tmp_path):
    batches = write_cifar(tmp_path / "cifar")
    s = load_dataset(f"cifar10:{tmp_path / 'cifar'}", val_fraction=0.2)
    assert s.classes == ["cat", "dog", "ship"]
    assert len(s.train_y) + len(s.val_y) == 30 and len(s.val_y) == 6
    # The test batch is the test split, channel-major rows turned into CHW images.
    data, labels = batches["test_batch"]
    expected = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255
    mean, std = torch.tensor(s.mean).view(3, 1, 1), torch.tensor(s.std).view(3, 1, 1)
    torch.testing.assert_close(s.test_x * std + mean, expected, atol=1e-5, rtol=0)
    assert s.test_y.tolist() == labels


def test_cifar10_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(f"cifar10:{tmp_path / 'missing'}")
    write_cifar(tmp_path / "cifar")
    (tmp_path / "cifar" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing file .*data_batch_3"):
        load_dataset(f"cifar10:{tmp_path / 'cifar'}")
    (tmp_path / "cifar" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR-10 python batch"):
        load_dataset(f"cifar10:{tmp_path / 'cifar'}")


def write_folder(root, classes=("forest", "river"), per_class=5, size=(48, 40)):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            pixels[..., c] = 255  # a class-dependent colour
            mode_image = Image.fromarray(pixels)
            mode_image = mode_image.convert("L") if i == 0 else mode_image  # grayscale too
            mode_image.save(root / name / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (root / classes[0] / "notes.txt").write_text("not an image")


def test_folder_reader(tmp_path):
    write_folder(tmp_path / "ucm")
    s = load_dataset(f"folder:{tmp_path / 'ucm'}", val_fraction=0.2, test_fraction=0.2)
    assert s.classes == ["forest", "river"]
    assert s.train_x.shape[1:] == (3, 32, 32)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (6, 2, 2)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match="at least two class subfolders"):
        load_dataset(f"folder:{tmp_path / 'one'}")
    write_folder(tmp_path / "bad")
    (tmp_path / "bad" / "river" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        load_dataset(f"folder:{tmp_path / 'bad'}")


@pytest.mark.parametrize("spec", ["mnist", "cifar10", "folder:", "digits:x"])
def test_bad_specs(spec):
    with pytest.raises(DataError, match="dataset must be digits, cifar10:PATH or folder:PATH"):
        load_dataset(spec)


def test_bad_fractions():
    with pytest.raises(DataError, match=r"train_fraction must be in \(0, 1\]"):
        load_dataset("digits", train_fraction=0)


def test_too_small_to_split(tmp_path):
    write_folder(tmp_path / "tiny", per_class=2)
    with pytest.raises(DataError, match="is too small to split: its 4 images in 2 classes leave "
                       "the validation split empty .*give each class at least 4 images"):
        load_dataset(f"folder:{tmp_path / 'tiny'}")
    write_folder(tmp_path / "four", per_class=4)
    s = load_dataset(f"folder:{tmp_path / 'four'}")  # the fewest the message asks for
    assert min(len(s.train_y), len(s.val_y), len(s.test_y)) >= 1


def test_a_class_without_training_images():
    with pytest.raises(DataError, match="leave the training split empty.*larger train fraction"):
        load_dataset("digits", train_fraction=0.001)
    with pytest.raises(DataError, match="class '.' has no image in the training split"):
        load_dataset("digits", train_fraction=0.0043)  # some classes 1, some 0


def test_folder_path_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_folder(tmp_path / "images")
    assert load_dataset("folder:~/images").classes == ["forest", "river"]
