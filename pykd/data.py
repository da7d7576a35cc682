"""Image classification data sets as normalised float tensors [N, 3, 32, 32], read from local files.

A data set is named by a spec string:

- ``digits``: scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes, shipped
  inside scikit-learn), upsampled bilinearly to 32x32 and repeated over 3 channels so the seed
  models apply unchanged.
- ``cifar10:PATH``: CIFAR-10 in its python-pickle batch format (``data_batch_1`` ..
  ``data_batch_5``, ``test_batch``, ``batches.meta``) in the directory PATH. Its test batch is the
  test split.
- ``folder:PATH``: one subfolder of images per class (as the UC Merced / remote-sensing sets are
  distributed); images are read with Pillow, converted to RGB and resized to 32x32.

Splits are stratified and deterministic for a given ``data_seed``. Normalisation is per channel,
with the mean and standard deviation of the training examples in use; a caller can pass the
statistics of another run (a teacher's) so both models see the same inputs.
"""
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DataError", "Splits", "load_dataset", "IMAGE_SIZE"]

IMAGE_SIZE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A data set that cannot be read or does not fit the request."""


@dataclass
class Splits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)

    @property
    def num_classes(self):
        return len(self.classes)

    def split(self, name):
        if name not in ("train", "val", "test"):
            raise DataError(f"split must be train, val or test, got {name!r}")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


def _to_float_images(images):
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)


def _read_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(digits.target).long()
    return x, y, None, None, [str(c) for c in digits.target_names]


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"cifar10: missing file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cifar10: {path} is not a CIFAR-10 python batch ({e})") from None


def _field(batch, name, path):
    """A CIFAR pickle's field: bytes keys in the original (Python 2) files, str in re-pickled."""
    if isinstance(batch, dict):
        for key in (name.encode(), name):
            if key in batch:
                return batch[key]
    raise DataError(f"cifar10: {path} is not a CIFAR-10 python batch (no {name!r})")


def _cifar_batch(path):
    batch = _unpickle(path)
    data, labels = _field(batch, "data", path), _field(batch, "labels", path)
    try:
        data = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"cifar10: {path} is not a CIFAR-10 python batch ({e})") from None
    if len(data) != len(labels):
        raise DataError(f"cifar10: {path} has {len(data)} images but {len(labels)} labels")
    return data.transpose(0, 2, 3, 1), labels


def _read_cifar10(root):
    if not os.path.isdir(root):
        raise DataError(f"cifar10: no such directory: {root}")
    meta_path = os.path.join(root, "batches.meta")
    classes = [n.decode() if isinstance(n, bytes) else str(n)
               for n in _field(_unpickle(meta_path), "label_names", meta_path)]
    parts = [_cifar_batch(os.path.join(root, f"data_batch_{i}")) for i in range(1, 6)]
    test_images, test_labels = _cifar_batch(os.path.join(root, "test_batch"))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    for y in (labels, test_labels):
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"cifar10: labels outside 0..{len(classes) - 1} in {root}")
    return (_to_float_images(images), torch.from_numpy(labels),
            _to_float_images(test_images), torch.from_numpy(test_labels), classes)


def _read_folder(root):
    try:
        from PIL import Image
    except ImportError:
        raise DataError("folder: reading images needs Pillow: pip install 'pykd[train]'") from None
    if not os.path.isdir(root):
        raise DataError(f"folder: no such directory: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if len(classes) < 2:
        raise DataError(f"folder: {root} needs at least two class subfolders, found {len(classes)}")
    images, labels = [], []
    for label, name in enumerate(classes):
        directory = os.path.join(root, name)
        files = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise DataError(f"folder: class folder {directory} holds no images")
        for file in files:
            path = os.path.join(directory, file)
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
                    images.append(np.asarray(image, dtype=np.uint8))
            except OSError as e:
                raise DataError(f"folder: cannot read image {path} ({e})") from None
            labels.append(label)
    return _to_float_images(np.stack(images)), torch.tensor(labels), None, None, classes


def _stratified_split(y, fractions, seed):
    """Per class, shuffled with `seed`: one part per fraction, then a last part with the rest."""
    generator = torch.Generator().manual_seed(seed)
    parts = [[] for _ in range(len(fractions) + 1)]
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        start = 0
        for part, fraction in zip(parts, fractions):
            count = int(round(fraction * len(idx)))
            part.append(idx[start:start + count])
            start += count
        parts[-1].append(idx[start:])
    return [torch.sort(torch.cat(p)).values for p in parts]


def _check_fraction(name, value, low_open=True):
    ok = 0 < value <= 1 if low_open else 0 <= value < 1
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1)"
        raise DataError(f"{name} must be in {interval}, got {value}")


def _images_per_class(fractions):
    """The fewest images a class needs for one in each split, rounding as the split does."""
    for n in range(2, 10_000):
        counts = [round(f * n) for f in fractions]
        if min(counts) >= 1 and n - sum(counts) >= 1:
            return n
    return "more"


def load_dataset(spec="digits", data_seed=0, val_fraction=0.15, test_fraction=0.2,
                 train_fraction=1.0, mean=None, std=None):
    """Reads the data set named by `spec` and returns normalised train/val/test splits.

    ``test_fraction`` applies only where the data set has no test split of its own (digits,
    folders). ``train_fraction`` keeps that (stratified) fraction of the training split, to study
    distillation with little labelled data; validation and test splits are unchanged by it.
    ``mean``/``std`` (per channel) override the statistics of the training split.
    """
    _check_fraction("train_fraction", train_fraction)
    _check_fraction("val_fraction", val_fraction, low_open=False)
    _check_fraction("test_fraction", test_fraction, low_open=False)
    kind, _, path = spec.partition(":")
    path = os.path.expanduser(path)  # a shell leaves the ~ of folder:~/images as it is
    if kind == "digits" and not path:
        x, y, test_x, test_y, classes = _read_digits()
    elif kind == "cifar10" and path:
        x, y, test_x, test_y, classes = _read_cifar10(path)
    elif kind == "folder" and path:
        x, y, test_x, test_y, classes = _read_folder(path)
    else:
        raise DataError(f"dataset must be digits, cifar10:PATH or folder:PATH, got {spec!r}")

    fractions = [val_fraction] if test_x is not None else [val_fraction, test_fraction]
    if test_x is None:
        if val_fraction + test_fraction >= 1:
            raise DataError("val_fraction + test_fraction must be below 1")
        val_idx, test_idx, train_idx = _stratified_split(
            y, [val_fraction, test_fraction], data_seed)
        test_x, test_y = x[test_idx], y[test_idx]
    else:
        val_idx, train_idx = _stratified_split(y, [val_fraction], data_seed)
    if train_fraction < 1:
        keep, _ = _stratified_split(y[train_idx], [train_fraction], data_seed + 1)
        train_idx = train_idx[keep]
    sizes = {"training": len(train_idx), "validation": len(val_idx), "test": len(test_y)}
    empty = [name for name, size in sizes.items() if size == 0]
    if empty:
        if empty[0] == "training" and train_fraction < 1:
            advice = "use a larger train fraction"
        else:
            advice = f"give each class at least {_images_per_class(fractions)} images"
        raise DataError(
            f"dataset {spec!r} is too small to split: its {len(y)} images in {len(classes)} "
            f"classes leave the {empty[0]} split empty (train fraction {train_fraction:g}, "
            f"validation fraction {val_fraction:g}); {advice}")
    train_x, train_y = x[train_idx], y[train_idx]
    missing = sorted(set(range(len(classes))) - set(train_y.tolist()))
    if missing:
        raise DataError(
            f"dataset {spec!r}: class {classes[missing[0]]!r} has no image in the training split "
            f"(train fraction {train_fraction:g}); use a larger train fraction or more images")
    if mean is None or std is None:
        mean = train_x.mean(dim=(0, 2, 3)).tolist()
        std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise DataError(f"normalisation needs {x.shape[1]} channel statistics, got {len(mean)}")
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)

    def norm(t):
        return (t - m) / s

    return Splits(norm(train_x), train_y, norm(x[val_idx]), y[val_idx], norm(test_x), test_y,
                  list(classes), list(mean), list(std))
