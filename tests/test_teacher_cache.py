"""The teacher cache: its file, its refusals, training from it, and its command line."""
import dataclasses
import hashlib
import os

import pytest
import torch

import pykd
from pykd import models, train
from pykd.data import load_dataset
from pykd.teacher_cache import (CacheError, TeacherCache, _header_bytes, _layout, cache_teacher,
                                split_fingerprint, write_cache)
from pykd.train import TrainConfig, data_meta, fit
from test_cli import STUDENT, ok, one_line_error, read_json, run_cli
from testing import assert_close, run_python


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", train_fraction=0.15)  # ~180 training images


@pytest.fixture(scope="module")
def data(splits):
    return data_meta("digits", 0, 0.15, splits)


def config(**kwargs):
    return TrainConfig(**{"epochs": 3, "batch_size": 32, "seed": 1, "progress": False, **kwargs})


@pytest.fixture(scope="module")
def teacher_path(splits, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train.run("tutorial-student", splits, data, config(epochs=1), out, "teacher")
    return str(out / "teacher.pt")


def teacher_logits(teacher_path, x, batch_size):
    """The teacher's logits, batch by batch as cache_teacher runs it (the same arithmetic)."""
    teacher = train.load_model(teacher_path)[0].eval()
    with torch.no_grad():
        return torch.cat([teacher(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@pytest.fixture(scope="module")
def cache(splits, data, teacher_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "teacher.safetensors"
    return cache_teacher(path, teacher_path, splits, data, top_k=4, temperature=2.0)[0]


def test_round_trip(splits, data, teacher_path, tmp_path):
    path = tmp_path / "cache.safetensors"
    cache, timings = cache_teacher(path, teacher_path, splits, data, top_k=4, temperature=2.0,
                                   batch_size=50)  # the last batch is a partial one
    assert timings["teacher_s"] > 0 and timings["write_s"] > 0
    logits = teacher_logits(teacher_path, splits.train_x, 50)
    expected_values, expected_indices = logits.topk(4, dim=-1)
    values, indices, lse = cache.lookup(torch.arange(len(cache)))
    assert values.dtype == torch.bfloat16 and indices.dtype == torch.int32
    assert torch.equal(values, expected_values.bfloat16())
    assert torch.equal(indices, expected_indices.int())
    # The log-sum-exp over the stored (rounded) top-k and the exact rest, in float64.
    rest = torch.ones_like(logits, dtype=torch.bool).scatter(-1, expected_indices, False)
    exact = logits.double() / 2.0
    stored = torch.where(rest, exact, torch.zeros_like(exact)).scatter(
        -1, expected_indices, values.double() / 2.0)
    assert_close(lse, torch.logsumexp(stored, -1), torch.float32)
    assert_close(lse, torch.logsumexp(exact, -1), torch.bfloat16)  # ~ the unrounded one
    probabilities = (values.double() / 2.0 - lse.double().unsqueeze(-1)).exp()
    assert (probabilities.sum(-1) <= 1 + 1e-6).all()  # a tail bucket >= 0
    # Rows come back for any sample indices, in their order.
    rows = torch.tensor([5, 0, 5, len(cache) - 1])
    assert torch.equal(cache.lookup(rows)[1], indices[rows])
    with pytest.raises(IndexError, match="outside the"):
        cache.lookup(torch.tensor([len(cache)]))

    header = cache.header
    assert (len(cache), cache.top_k, cache.num_classes) == (len(splits.train_y), 4, 10)
    assert cache.temperature == 2.0 and cache.values_dtype == "bfloat16"
    assert cache.classes == splits.classes
    with open(teacher_path, "rb") as f:
        assert cache.teacher["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert cache.teacher["path"] == os.path.abspath(teacher_path)
    assert cache.teacher["run_id"] == train.load_checkpoint(teacher_path)["run_id"]
    assert {k: cache.data[k] for k in data} == data
    assert cache.data["fingerprint"] == split_fingerprint(splits.train_x, splits.train_y)
    assert header["format"] == "pykd-teacher-cache/1" and len(header["id"]) == 32

    # The file is plain safetensors: that library reads the same tensors.
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = safetensors.load_file(str(path))
    assert torch.equal(tensors["values"], values) and torch.equal(tensors["lse"], lse)
    assert torch.equal(tensors["indices"], indices)


def test_exact_mode_with_every_class_is_dense_kd(splits, data, teacher_path, tmp_path):
    """K = V: the cached teacher gives pykd.kd_loss's value (up to the values' rounding)."""
    cache = cache_teacher(tmp_path / "all.safetensors", teacher_path, splits, data, top_k=10,
                          temperature=3.0, values_dtype="float16")[0]
    values, indices, lse = cache.lookup(torch.arange(len(cache)))
    assert values.dtype == torch.float16
    logits = teacher_logits(teacher_path, splits.train_x, 256)
    student = torch.randn(len(cache), 10, dtype=torch.float64) * 3
    sparse = pykd.sparse_kd_loss(student.float(), values, indices, 3.0, teacher_lse=lse)
    dense = pykd.kd_loss(student, logits.double(), 3.0)
    assert_close(sparse, dense, torch.float16)


def fake_batches(rows, stop_after=None):
    for start in range(0, rows, 16):
        if stop_after is not None and start // 16 == stop_after:
            raise RuntimeError("the teacher crashed")
        yield torch.randn(min(16, rows - start), 10)


def test_write_is_atomic(tmp_path):
    path = tmp_path / "cache.safetensors"
    settings = {"rows": 100, "num_classes": 10, "top_k": 3, "temperature": 1.0}
    header = {"teacher": {}, "classes": list("abcdefghij"), "data": {}}
    write_cache(path, fake_batches(100), header=header, **settings)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="the teacher crashed"):
        write_cache(path, fake_batches(100, stop_after=2), header=header, **settings)
    with pytest.raises(ValueError, match="the teacher gave 64 rows, not the 100"):
        write_cache(path, fake_batches(64), header=header, **settings)
    with pytest.raises(ValueError, match=r"teacher logits \(16, 10\) after 96 of 100 rows"):
        write_cache(path, fake_batches(112), header=header, **settings)
    with pytest.raises(ValueError, match="logits are not finite in rows 0 to 15"):
        write_cache(path, (torch.full((16, 10), float("nan")) for _ in range(7)), header=header,
                    **settings)
    assert path.read_bytes() == before  # the earlier cache is untouched
    assert os.listdir(tmp_path) == ["cache.safetensors"]  # and no temporary file is left
    with pytest.raises(RuntimeError, match="the teacher crashed"):
        write_cache(tmp_path / "new.safetensors", fake_batches(100, stop_after=1), header=header,
                    **settings)
    assert os.listdir(tmp_path) == ["cache.safetensors"]  # a failed first write leaves nothing
    TeacherCache(path)


def test_refuses_another_split_classes_or_temperature(cache, splits, data):
    cache.check(splits, 2.0, data)
    with pytest.raises(CacheError, match=r"--temperature 4 is not the T = 2 --teacher-cache .* "
                                         r"was written at"):
        cache.check(splits, 4.0, data)
    other = load_dataset("digits", train_fraction=0.2, mean=splits.mean, std=splits.std)
    with pytest.raises(CacheError, match=r"was written for another training split \(digits, data "
                                         r"seed 0, train fraction 0.15, \d+ images\) than this "
                                         r"run's \(digits, data seed 0, train fraction 0.2"):
        cache.check(other, 2.0, data_meta("digits", 0, 0.2, other))
    changed = splits.train_x.clone()
    changed[3, 0, 0, 0] += 1
    with pytest.raises(CacheError, match="other images than this run's training split .* though "
                                         "with the same options"):
        cache.check(dataclasses.replace(splits, train_x=changed), 2.0, data)
    relabelled = splits.train_y.clone()
    relabelled[0] = (relabelled[0] + 1) % 10
    with pytest.raises(CacheError, match="other images"):
        cache.check(dataclasses.replace(splits, train_y=relabelled), 2.0, data)
    renamed = dataclasses.replace(splits, classes=[f"c{i}" for i in range(10)])
    with pytest.raises(CacheError, match="the teacher of --teacher-cache .* was trained on other "
                                         "classes than --dataset digits has: class 0 is '0'"):
        cache.check(renamed, 2.0, data)


def test_refuses_what_is_not_a_cache(cache, tmp_path):
    def fails(path, message):
        with pytest.raises(CacheError, match=message):
            TeacherCache(path)

    fails(tmp_path / "missing", "teacher cache not found")
    fails(tmp_path, "is a directory, not a teacher cache file")
    (tmp_path / "empty").write_bytes(b"")
    fails(tmp_path / "empty", r"is not a pykd teacher cache \(not a safetensors file\)")
    (tmp_path / "text").write_text("hello, I am not a cache\n")
    fails(tmp_path / "text", r"is not a pykd teacher cache \(not a safetensors file\)")
    whole = open(cache.path, "rb").read()
    (tmp_path / "short").write_bytes(whole[:-2])
    fails(tmp_path / "short", "bytes but its header describes .*: the file is damaged or was cut")
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    fails(tmp_path / "other.safetensors", "is a safetensors file but not a pykd teacher cache")
    head = _header_bytes(_layout(len(cache), cache.top_k, "bfloat16")[0], cache.header)
    assert whole.startswith(head)
    (tmp_path / "future").write_bytes(
        head.replace(b"pykd-teacher-cache/1", b"pykd-teacher-cache/9") + whole[len(head):])
    fails(tmp_path / "future", "is a pykd-teacher-cache/9 cache; this pykd reads "
                               "pykd-teacher-cache/1")


def test_fit_from_the_cache_resumes_bit_identically(cache, splits, data, tmp_path):
    meta = {"model": "tutorial-student", "data": data, "teacher": cache.record()}
    cfg = config(epochs=2, temperature=2.0, nuclear_weight=1e-3)

    def student(seed=0):
        torch.manual_seed(seed)
        return models.build_model("tutorial-student")  # has Dropout: uses the RNG

    whole = student()
    result = fit(whole, splits, cfg, checkpoint=str(tmp_path / "whole.pt"), meta=meta,
                 teacher_cache=cache)
    assert all(0 < r["train_kd"] for r in result["history"])

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    path = str(tmp_path / "split.pt")
    with pytest.raises(train.Interrupted):
        fit(student(), splits, cfg, checkpoint=path, meta=meta, on_epoch_end=stop,
            teacher_cache=cache)
    torch.manual_seed(1234)  # the checkpoint, not the caller, decides the RNG state
    resumed = student(seed=99)
    again = fit(resumed, splits, cfg, checkpoint=path, meta=meta, resume_from=path,
                teacher_cache=cache)
    assert [r["epoch"] for r in again["history"]] == [1, 2]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert [r["train_loss"] for r in again["history"]] == \
        [r["train_loss"] for r in result["history"]]
    with pytest.raises(ValueError, match="--logit-weight and --hint-weight need the teacher's"):
        fit(student(), splits, config(temperature=2.0, logit_weight=0.1), teacher_cache=cache)
    with pytest.raises(CacheError, match="--temperature 4 is not the T = 2"):
        fit(student(), splits, config(temperature=4.0), teacher_cache=cache)


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def cli_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-teacher")
    ok(*run_cli(["train", *STUDENT, "--name", "teacher", "--out", out, "--epochs", "1",
                 "--train-fraction", "0.1"]))
    return out / "teacher.pt"


@pytest.fixture(scope="module")
def cli_cache(cli_teacher):
    """A cache at T = 2 of the demo's students' split (a tenth of the training images)."""
    cache = cli_teacher.parent / "top3.safetensors"
    ok(*run_cli(["cache-teacher", "--teacher", cli_teacher, "--top-k", "3", "--temperature", "2",
                 "--train-fraction", "0.1", "--out", cache]))
    return cache


def state_dict(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_cache_teacher_and_distill_from_it(cli_teacher, tmp_path):
    cache = tmp_path / "top5.safetensors"
    write = ["cache-teacher", "--teacher", cli_teacher, "--top-k", "5", "--train-fraction", "0.1",
             "--out", cache]
    distill = ["distill", "--teacher-cache", cache, "--student", "tutorial-student"]
    written, refused, replaced, whole, first, resumed, live = run_cli(
        write, write, [*write, "--overwrite"],
        [*distill, "--out", tmp_path / "whole", "--epochs", "2"],
        [*distill, "--out", tmp_path / "split", "--epochs", "1"],
        [*distill, "--out", tmp_path / "split", "--epochs", "2", "--resume"],
        ["distill", "--teacher", cli_teacher, "--student", "tutorial-student", "--out",
         tmp_path / "whole", "--train-fraction", "0.1", "--epochs", "3", "--resume"])
    assert ok(written).stdout.startswith(f"wrote {cache}: the top 5 of 10 logits (bfloat16) and "
                                         "the log-sum-exp at T = 4 of ")
    one_line_error(refused, "top5.safetensors exists: pass --overwrite to replace it")
    ok(replaced)
    assert TeacherCache(cache).data["train_fraction"] == 0.1

    ok(whole)
    metrics = read_json(tmp_path / "whole" / "tutorial-student-distilled.json")
    teacher = read_json(cli_teacher.parent / "teacher.json")
    assert metrics["teacher"]["path"] == str(cli_teacher)
    assert metrics["teacher"]["run_id"] == teacher["run_id"]
    assert metrics["teacher"]["cache"]["path"] == str(cache)
    assert metrics["teacher"]["cache"]["top_k"] == 5
    # The cache's T and split are the run's: the demo's 10% of the labels, the teacher's inputs.
    assert metrics["config"]["temperature"] == 4.0 and metrics["data"]["train_fraction"] == 0.1
    assert metrics["data"]["mean"] == teacher["data"]["mean"]
    assert metrics["history"][0]["train_examples"] == len(TeacherCache(cache))
    assert "KD " in whole.stderr and sorted(os.listdir(tmp_path / "whole")) == [
        "tutorial-student-distilled.epochs.jsonl", "tutorial-student-distilled.json",
        "tutorial-student-distilled.pt"]

    ok(first)
    assert "resuming from epoch 1 of 2" in ok(resumed).stderr
    split = tmp_path / "split" / "tutorial-student-distilled"
    a, b = state_dict(tmp_path / "whole" / "tutorial-student-distilled.pt"), state_dict(f"{split}.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(f"{split}.json")["test"] == metrics["test"]
    # A run from the cache does not resume from the live teacher.
    one_line_error(live, "cannot resume .*: it was started with --teacher-cache .*top5.safetensors "
                         r"\(cache [0-9a-f]+\), which this run does not give")


def test_errors_are_one_line(cli_teacher, cli_cache, tmp_path):
    distill = ["distill", "--teacher-cache", cli_cache, "--student", "tutorial-student", "--out",
               tmp_path / "runs"]
    cases = {
        "top-k": (["cache-teacher", "--teacher", cli_teacher, "--top-k", "11", "--out",
                   tmp_path / "x"], "--top-k 11 is more than the 10 classes of --dataset digits"),
        "top-k-0": (["cache-teacher", "--teacher", cli_teacher, "--top-k", "0", "--out",
                     tmp_path / "x"], "argument --top-k: must be an integer >= 1, got 0"),
        "out-dir": (["cache-teacher", "--teacher", cli_teacher, "--top-k", "3", "--out",
                     tmp_path], "--out .* is a directory: name the cache file"),
        "no-teacher": (["cache-teacher", "--teacher", "/no/such.pt", "--top-k", "3", "--out",
                        tmp_path / "x"], "checkpoint not found: /no/such.pt"),
        "both": ([*distill, "--teacher", cli_teacher],
                 "argument --teacher: not allowed with argument --teacher-cache"),
        "neither": (["distill", "--student", "tutorial-student"],
                    "one of the arguments --teacher --teacher-cache is required"),
        "split": ([*distill, "--train-fraction", "0.5"],
                  r"was written for another training split \(digits, data seed 0, train "
                  r"fraction 0.1, \d+ images\) than this run's \(digits, data seed 0, train "
                  r"fraction 0.5"),
        "data-seed": ([*distill, "--data-seed", "1"], "another training split"),
        "temperature": ([*distill, "--temperature", "4"],
                        "--temperature 4 is not the T = 2 --teacher-cache .* was written at"),
        "hint": ([*distill, "--hint-weight", "1"],
                 "--hint-weight needs the teacher's full logits and features, which "
                 "--teacher-cache does not hold"),
        "logit": ([*distill, "--logit-weight", "0.1"], "--logit-weight needs the teacher's"),
        "not-a-cache": ([*distill[:2], cli_teacher, *distill[3:]],
                        r"teacher.pt is not a pykd teacher cache \(not a safetensors file\)"),
        "missing": ([*distill[:2], "/no/such", *distill[3:]],
                    "teacher cache not found: /no/such"),
    }
    results = run_cli(*[argv for argv, _ in cases.values()], parallel=2)
    for (case, (_, message)), done in zip(cases.items(), results):
        one_line_error(done, message)
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()


def test_torchrun_two_processes_read_the_cache(cli_teacher, cli_cache, tmp_path):
    done = run_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pykd", "distill", "--teacher-cache", cli_cache, "--student", "tutorial-student",
         "--out", tmp_path / "runs", "--epochs", "1"],
        env={"OMP_NUM_THREADS": "1"}, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_json(tmp_path / "runs" / "tutorial-student-distilled.json")
    n = len(TeacherCache(cli_cache))
    # Each rank looked up its half of the rows; the sampler pads to an even count.
    assert n <= metrics["history"][-1]["train_examples"] <= n + 1
    assert done.stdout.count("tutorial-student-distilled: test accuracy") == 1  # rank 0 only
    # cache-teacher itself runs in one process.
    refused = run_python(["-m", "pykd", "cache-teacher", "--teacher", cli_teacher, "--top-k", "5",
                          "--out", tmp_path / "x"], env={"WORLD_SIZE": "2"}, timeout=120)
    one_line_error(refused, "cache-teacher runs in one process: start it without torchrun")
