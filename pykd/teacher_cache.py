"""A teacher cache: a teacher's top-k logits on a training split, for distilling without it.

Written once while streaming over the split (batch by batch into a file of its final size, never
the whole split's logits in memory) and memory-mapped for reading, so that ``pykd distill
--teacher-cache`` never loads the teacher model (offline distillation, issue 13).

The file is one safetensors file (the format of Hugging Face's safetensors library; any of its
readers loads it) of three tensors, row i for image i of the training split in its order:

- ``values``  [N, K] bfloat16 (or float16): the teacher's K largest logits t, largest first;
- ``indices`` [N, K] int32: their classes;
- ``lse``     [N] float32: the log-sum-exp of t / T over all V classes, at the cache's T,

so that ``pykd.sparse_kd_loss(..., teacher_lse=lse)`` gives the exact teacher probabilities
exp(v_k / T - lse) and one tail bucket for the rest. The lse is taken over the *stored* top-k
values (rounded to bfloat16) and the other classes' exact logits: the stored probabilities then
sum to at most 1 and the tail keeps the exact mass of the other classes, where the log-sum-exp
of the unrounded logits could make the rounded top-k sum above 1 (a negative tail).

Its ``__metadata__`` holds a JSON header (key "pykd"): the format, K, V, T, the values' dtype,
the teacher checkpoint (path, sha256 of its bytes, run id, epochs, model), the class names, and
the data split: spec, data seed, train fraction, normalisation statistics, number of images and
a fingerprint (sha256 of the normalised images and labels, in order). A reader refuses, in one
line (:class:`CacheError`), a file that is not such a cache and a cache that does not match the
split, classes or temperature it is used with (:meth:`TeacherCache.check`).

pykd trains without data augmentation (each epoch sees the split's images as they are), so the
cached logits are exactly what the live teacher computes for the images the student sees; with
augmentation a cache would hold the un-augmented images' logits instead.
"""
import datetime
import errno
import hashlib
import json
import os
import struct
import time
import uuid

import numpy as np
import torch
import torch.nn.functional as F

import pykd  # sparse_kd_loss, looked up at each call

from . import report

__all__ = ["FORMAT", "CacheError", "TeacherCache", "write_cache", "cache_teacher",
           "split_fingerprint", "distillation_loss"]

FORMAT = "pykd-teacher-cache/1"
# dtype name -> (safetensors dtype, numpy dtype the bytes are read as, torch dtype)
VALUE_DTYPES = {"bfloat16": ("BF16", np.int16, torch.bfloat16),
                "float16": ("F16", np.float16, torch.float16)}
TENSORS = ("lse", "indices", "values")  # their order in the file: the widest elements first


class CacheError(ValueError):
    """A teacher cache that is missing, unreadable, or not the one the run needs."""


def split_fingerprint(x, y):
    """sha256 (hex) of a split's images and labels, in order, with their dtypes and shapes."""
    digest = hashlib.sha256()
    for tensor in (x, y):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array)
    return digest.hexdigest()


def _file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _layout(rows, top_k, values_dtype):
    """{name: (safetensors dtype, shape, begin, end)} of the data section, and its size."""
    entries = {"lse": ("F32", [rows], 4), "indices": ("I32", [rows, top_k], 4),
               "values": (VALUE_DTYPES[values_dtype][0], [rows, top_k], 2)}
    layout, offset = {}, 0
    for name in TENSORS:
        dtype, shape, size = entries[name]
        end = offset + size * int(np.prod(shape))
        layout[name] = (dtype, shape, offset, end)
        offset = end
    return layout, offset


def _header_bytes(layout, header):
    """The safetensors header: its length (u64, little-endian) and JSON, padded with spaces so
    that the data starts at a multiple of 8 bytes."""
    entries = {name: {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
               for name, (dtype, shape, begin, end) in layout.items()}
    entries["__metadata__"] = {"format": FORMAT, "pykd": json.dumps(header, sort_keys=True)}
    text = json.dumps(entries, sort_keys=True).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def top_k_rows(logits, top_k, temperature, values_dtype="bfloat16"):
    """(values, indices int32, lse float32) of float logits [B, V], as the cache stores them."""
    logits = logits.float()
    values, indices = logits.topk(top_k, dim=-1)
    values = values.to(VALUE_DTYPES[values_dtype][2])
    # The stored (rounded) values replace the exact ones in the log-sum-exp (see the module's doc).
    scaled = (logits / temperature).scatter(-1, indices, values.float() / temperature)
    return values, indices.int(), torch.logsumexp(scaled, dim=-1)


def _preallocate(f, size):
    """The file at its final size now: a full disk fails here, before any teacher work."""
    f.flush()
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise  # a file system without fallocate gets a plain (sparse) truncate
        f.truncate(size)


def write_cache(path, logits_batches, *, rows, num_classes, top_k, temperature, header=None,
                values_dtype="bfloat16"):
    """Writes the cache of `logits_batches` (float [b, num_classes] tensors, in row order, `rows`
    rows in all) to `path`, atomically: into a temporary file beside it, preallocated to its final
    size and filled batch by batch, fsynced and renamed over `path` only once every row is in. A
    failure (or Ctrl-C) on the way leaves no file behind and an earlier cache at `path` as it was.

    `header` adds fields to the cache's JSON header. Returns the :class:`TeacherCache` and the
    seconds spent waiting for the batches ("teacher_s") and in everything else ("write_s": top-k,
    log-sum-exp and writing, fsync included).
    """
    if values_dtype not in VALUE_DTYPES:
        raise ValueError(f"values_dtype must be one of {', '.join(VALUE_DTYPES)}, "
                         f"got {values_dtype!r}")
    if not 1 <= top_k <= num_classes:
        raise ValueError(f"--top-k {top_k} must be in [1, {num_classes}] (the classes)")
    if rows < 1:
        raise ValueError("a teacher cache needs at least one row")
    header = {**(header or {}), "format": FORMAT, "id": uuid.uuid4().hex, "top_k": top_k,
              "num_classes": num_classes, "rows": rows, "temperature": float(temperature),
              "values_dtype": values_dtype}
    layout, size = _layout(rows, top_k, values_dtype)
    head = _header_bytes(layout, header)
    timings = {"teacher_s": 0.0, "write_s": 0.0}
    started = time.perf_counter()

    def fill(f):
        f.write(head)
        _preallocate(f, len(head) + size)
        done = 0
        batches = iter(logits_batches)
        while True:
            before = time.perf_counter()
            logits = next(batches, None)
            timings["teacher_s"] += time.perf_counter() - before
            if logits is None:
                break
            if logits.dim() != 2 or logits.shape[1] != num_classes or not (
                    0 < len(logits) <= rows - done):
                raise ValueError(f"teacher logits {tuple(logits.shape)} after {done} of {rows} "
                                 f"rows: expected [b, {num_classes}] batches of {rows} rows")
            if not torch.isfinite(logits).all():
                raise ValueError(f"the teacher's logits are not finite in rows {done} to "
                                 f"{done + len(logits) - 1}: a diverged teacher cannot be cached")
            arrays = top_k_rows(logits, top_k, temperature, values_dtype)
            for name, tensor in zip(("values", "indices", "lse"), arrays):
                _, shape, begin, _ = layout[name]
                row_bytes = tensor.element_size() * (shape[1] if len(shape) > 1 else 1)
                f.seek(len(head) + begin + done * row_bytes)
                if tensor.dtype == torch.bfloat16:
                    tensor = tensor.view(torch.int16)  # numpy has no bfloat16: the same bits
                f.write(np.ascontiguousarray(tensor.cpu().numpy()))
            done += len(logits)
        if done != rows:
            raise ValueError(f"the teacher gave {done} rows, not the {rows} of the split")
        f.seek(0, os.SEEK_END)

    report.write_atomically(path, fill, binary=True)
    timings["write_s"] = time.perf_counter() - started - timings["teacher_s"]
    return TeacherCache(path), timings


def cache_teacher(path, teacher_path, splits, data, *, top_k, temperature,
                  values_dtype="bfloat16", batch_size=256, device=None, bf16=False,
                  progress=False):
    """The cache of the teacher checkpoint `teacher_path` on the training split of `splits`
    (pykd.data.Splits normalised as the teacher's inputs; `data` is train.data_meta of them),
    computed in eval mode, `batch_size` images at a time on `device` (bfloat16 autocast with
    `bf16`). Returns what :func:`write_cache` returns."""
    from .train import _progress, load_teacher, resolve_device

    device = resolve_device(device)
    teacher, record, _ = load_teacher(teacher_path, data["spec"], splits.classes)
    teacher.to(device).eval()
    x = splits.train_x
    starts = range(0, len(x), batch_size)

    def batches():
        for start in _progress(starts, progress, f"caching {record['model']}"):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=bf16):
                logits = teacher(x[start:start + batch_size].to(device)).float()
            yield logits

    header = {
        "teacher": {**record, "sha256": _file_sha256(teacher_path)},
        "classes": list(splits.classes),
        "data": {**data, "split": "train", "examples": len(x),
                 "fingerprint": split_fingerprint(x, splits.train_y)},
        "bf16_inference": bool(bf16), "pykd_version": pykd.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return write_cache(path, batches(), rows=len(x), num_classes=splits.num_classes,
                       top_k=top_k, temperature=temperature, header=header,
                       values_dtype=values_dtype)


def _describe(data, examples):
    fraction = data.get("train_fraction")
    return (f"{data.get('spec')}, data seed {data.get('data_seed')}, train fraction "
            f"{'?' if fraction is None else f'{fraction:g}'}, {examples} images")


class TeacherCache:
    """A teacher cache file, memory-mapped (read-only); every field of its header checked.

    ``len(cache)`` rows; :meth:`lookup` gives the rows of given sample indices as tensors;
    :meth:`check` refuses a split, classes or temperature the cache was not written for.
    """

    def __init__(self, path):
        self.path = str(path)
        header, offsets = self._read_header()
        self.header = header
        self.top_k, self.num_classes = header["top_k"], header["num_classes"]
        self.temperature, self.values_dtype = header["temperature"], header["values_dtype"]
        rows = header["rows"]
        value_numpy = VALUE_DTYPES[self.values_dtype][1]
        self._arrays = {
            name: np.memmap(self.path, dtype=dtype, mode="r", offset=offsets[name],
                            shape=tuple(shape))
            for name, dtype, shape in (("values", value_numpy, (rows, self.top_k)),
                                       ("indices", np.int32, (rows, self.top_k)),
                                       ("lse", np.float32, (rows,)))}

    def _fail(self, what):
        raise CacheError(f"{self.path} {what}")

    def _read_header(self):
        path = self.path
        if os.path.isdir(path):
            self._fail("is a directory, not a teacher cache file")
        if not os.path.exists(path):
            raise CacheError(f"teacher cache not found: {path}")
        size = os.path.getsize(path)
        not_safetensors = "is not a pykd teacher cache (not a safetensors file)"
        try:
            with open(path, "rb") as f:
                start = f.read(8)
                length = struct.unpack("<Q", start)[0] if len(start) == 8 else -1
                text = f.read(length) if 2 <= length <= min(size - 8, 1 << 26) else None
        except OSError as e:
            raise CacheError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            entries = json.loads(text) if text is not None else None
        except (UnicodeDecodeError, ValueError):
            entries = None
        if not isinstance(entries, dict):
            self._fail(not_safetensors)
        meta = entries.get("__metadata__")
        kind = meta.get("format") if isinstance(meta, dict) else None
        if not isinstance(kind, str) or not kind.startswith("pykd-teacher-cache/"):
            self._fail("is a safetensors file but not a pykd teacher cache")
        if kind != FORMAT:
            self._fail(f"is a {kind} cache; this pykd reads {FORMAT}: write it again with "
                       "pykd cache-teacher")
        try:
            header = json.loads(meta["pykd"])
            missing = [name for name in ("rows", "top_k", "values_dtype", "num_classes",
                                         "temperature", "classes", "teacher", "data", "id")
                       if name not in header]
            if missing:
                self._fail(f"is not a complete pykd teacher cache: its header has no "
                           f"{missing[0]!r}")
            layout, data_size = _layout(header["rows"], header["top_k"], header["values_dtype"])
        except CacheError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            self._fail(f"is not a complete pykd teacher cache (its header: {type(e).__name__} "
                       f"{e})")
        data_start = 8 + length
        for name, (dtype, shape, begin, end) in layout.items():
            expected = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
            if entries.get(name) != expected:
                self._fail(f"is not a complete pykd teacher cache (its {name!r} is "
                           f"{entries.get(name)}, not {expected})")
        if size != data_start + data_size:
            self._fail(f"is {size} bytes but its header describes {data_start + data_size}: "
                       "the file is damaged or was cut short")
        return header, {name: data_start + begin for name, (_, _, begin, _) in layout.items()}

    def __len__(self):
        return self.header["rows"]

    @property
    def classes(self):
        return self.header["classes"]

    @property
    def data(self):
        """The split it was written for: spec, data_seed, train_fraction, mean, std, ..."""
        return self.header["data"]

    @property
    def teacher(self):
        """The teacher checkpoint: path, sha256, run_id, epoch, model."""
        return self.header["teacher"]

    def lookup(self, rows):
        """(values, indices int32, lse float32) CPU tensors of the sample indices `rows`
        (a tensor or sequence of ints)."""
        index = np.asarray(torch.as_tensor(rows, dtype=torch.int64).cpu())
        if index.size and not (index.min() >= 0 and index.max() < len(self)):
            raise IndexError(f"sample indices in [{index.min()}, {index.max()}] outside the "
                             f"{len(self)} rows of {self.path}")
        values = torch.from_numpy(self._arrays["values"][index])
        if self.values_dtype == "bfloat16":
            values = values.view(torch.bfloat16)
        return (values, torch.from_numpy(self._arrays["indices"][index]),
                torch.from_numpy(self._arrays["lse"][index]))

    def record(self):
        """How a run distilled from this cache records its teacher."""
        return {**self.teacher, "cache": {"path": os.path.abspath(self.path),
                                          "id": self.header["id"], "top_k": self.top_k,
                                          "values_dtype": self.values_dtype}}

    def check(self, splits, temperature, data=None):
        """CacheError (one line) unless the cache was written for these classes, this training
        split (the same images and labels in the same order) and this temperature. `data`
        (train.data_meta of the splits) names the split in the message."""
        from .train import check_classes

        what = f"--teacher-cache {self.path}"
        data = data or {}
        try:
            check_classes(f"the teacher of {what}", self.classes, data.get("spec"),
                          splits.classes)
        except ValueError as e:
            raise CacheError(str(e)) from None
        fingerprint = split_fingerprint(splits.train_x, splits.train_y)
        if fingerprint != self.data.get("fingerprint"):
            cached = _describe(self.data, len(self))
            here = _describe(data, len(splits.train_y))
            if here == cached:
                raise CacheError(f"{what} was written for other images than this run's "
                                 f"training split ({cached}), though with the same options: "
                                 "the data or the way it is read changed; write the cache again "
                                 "with pykd cache-teacher")
            raise CacheError(f"{what} was written for another training split ({cached}) than "
                             f"this run's ({here}): pass the cache's --dataset, --data-seed and "
                             "--train-fraction, or write a cache for this split with pykd "
                             "cache-teacher")
        if float(temperature) != self.temperature:
            raise CacheError(f"--temperature {temperature:g} is not the T = "
                             f"{self.temperature:g} {what} was written at (its log-sum-exps hold "
                             "for that T only): leave --temperature out, or write a cache at "
                             f"T = {temperature:g} with pykd cache-teacher")


def distillation_loss(cache, logits, labels, rows, config):
    """The loss of pykd.KDLoss with the cached teacher of sample indices `rows`:
    soft_weight * sparse_kd_loss (exact mode: with the cache's lse, the mass outside the top-k
    as one tail bucket) + hard_weight * cross-entropy; and the KD term (detached, for the
    record)."""
    values, indices, lse = (t.to(logits.device, non_blocking=True) for t in cache.lookup(rows))
    kd = pykd.sparse_kd_loss(logits, values, indices, config.temperature, teacher_lse=lse,
                             labels=labels, ignore_index=-100)
    loss = config.soft_weight * kd
    if config.hard_weight:
        loss = loss + config.hard_weight * F.cross_entropy(logits, labels, ignore_index=-100)
    return loss, kd.detach()
