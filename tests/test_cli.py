"""The pykd command line: short runs in a temporary directory, its errors, the sweep, torchrun."""
import json
import os
import re

import pytest
import torch

from pykd import cli
from testing import run_python

FAST = ["--epochs", "1", "--train-fraction", "0.1", "--no-progress"]


def pykd(*argv):
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A small 'teacher' (the tutorial's student network is quick to train) in its own --out."""
    out = tmp_path_factory.mktemp("teacher")
    assert pykd("train", "--model", "tutorial-student", "--name", "teacher", "--out", out,
                "--epochs", "2", "--train-fraction", "0.2", "--no-progress") == 0
    return out / "teacher.pt"


def test_train_distill_eval(teacher, tmp_path, capsys):
    metrics = json.loads((teacher.parent / "teacher.json").read_text())
    assert metrics["model"] == "tutorial-student" and len(metrics["history"]) == 2
    assert set(metrics["test"]) >= {"accuracy", "precision", "recall", "f1"}
    assert set(metrics["cost"]) == {"parameters", "size_bytes", "macs", "inference_ms"}

    assert pykd("distill", "--teacher", teacher, "--student", "keras-student", "--out", tmp_path,
                "--temperature", "2", "--soft-weight", "0.7", "--hard-weight", "0.3",
                "--logit-weight", "0.1", "--nuclear-weight", "0.001", *FAST) == 0
    checkpoint = tmp_path / "keras-student-distilled.pt"
    distilled = json.loads((tmp_path / "keras-student-distilled.json").read_text())
    assert distilled["teacher"] == str(teacher)
    assert distilled["config"]["temperature"] == 2.0 and distilled["config"]["soft_weight"] == 0.7
    # The student is normalised exactly as the teacher was.
    assert distilled["data"]["mean"] == metrics["data"]["mean"]

    assert pykd("eval", "--checkpoint", checkpoint) == 0
    out = capsys.readouterr().out
    assert "keras-student on digits (test" in out and "M MACs" in out
    evaluated = json.loads((tmp_path / "keras-student-distilled.eval.json").read_text())
    assert evaluated["metrics"]["accuracy"] == pytest.approx(distilled["test"]["accuracy"])


def test_resume_continues_the_run(tmp_path):
    args = ["train", "--model", "tutorial-student", "--out", tmp_path, "--train-fraction", "0.1",
            "--no-progress"]
    assert pykd(*args, "--epochs", "1") == 0
    assert pykd(*args, "--epochs", "2", "--resume") == 0
    history = json.loads((tmp_path / "tutorial-student.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]


def folder_with_two_classes(root):
    from PIL import Image

    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "tutorial-student", "--dataset", "cifar10:/no/such/dir"],
     "cifar10: no such directory: /no/such/dir"),
    (["train", "--model", "resnet-9000"], "--model/--student: unknown model 'resnet-9000'"),
    (["train", "--model", "tutorial-student", "--dataset", "imagenet"],
     "dataset must be digits, cifar10:PATH or folder:PATH, got 'imagenet'"),
    (["train", "--model", "tutorial-student", "--epochs", "0"],
     "argument --epochs: must be >= 1, got 0"),
    (["train", "--model", "tutorial-student", "--train-fraction", "1.5"],
     "argument --train-fraction: must be <= 1, got 1.5"),
    (["distill", "--teacher", "/no/such.pt", "--student", "keras-student"],
     "checkpoint not found: /no/such.pt"),
    (["eval", "--checkpoint", "{teacher}", "--dataset", "folder:{folder}"],
     "predicts 10 classes but --dataset folder:"),
    (["distill", "--teacher", "{teacher}", "--student", "keras-student",
      "--dataset", "folder:{folder}"], "predicts 10 classes but the data set has 2"),
    (["train", "--model", "keras-student", "--name", "teacher", "--out", "{teacher_dir}",
      "--resume"], "holds model 'tutorial-student', not 'keras-student'"),
    (["eval", "--checkpoint", "{junk}"], "is not a pykd checkpoint"),
    (["sweep", "--soft-weights", "0.5,2"], "--soft-weights: every weight must be in [0, 1]"),
    (["distill", "--teacher", "{teacher}", "--student", "keras-student", "--hint-layer", "x"],
     "expected STUDENT_LAYER:TEACHER_LAYER"),
])
def test_errors_are_one_line(argv, message, teacher, tmp_path, capsys):
    torch.save({"not": "pykd"}, tmp_path / "junk.pt")
    fill = {"teacher": teacher, "teacher_dir": teacher.parent, "junk": tmp_path / "junk.pt",
            "folder": folder_with_two_classes(tmp_path / "folder")}
    argv = [a.format(**fill) for a in argv] + ["--no-progress"] * (argv[0] != "eval")
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def exit_code(argv):
    """What the process would exit with: main's return value, or argparse's SystemExit."""
    try:
        return pykd(*argv)
    except SystemExit as e:
        return e.code


def test_help_for_every_command(capsys):
    for name, _, _ in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit:
            pykd(name, "--help")
        assert exit.value.code == 0
        out = capsys.readouterr().out
        if name == "bench":
            assert "--shapes" in out and "--device" in out
        else:
            assert "--dataset" in out and "--out" in out or name == "eval"


def test_sweep_writes_png_and_json(teacher, tmp_path):
    assert pykd("sweep", "--teacher", teacher, "--student", "tutorial-student", "--out", tmp_path,
                "--temperatures", "1,4", "--soft-weights", "0.5,1", *FAST) == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["temperatures"] == [1.0, 4.0] and result["soft_weights"] == [0.5, 1.0]
    assert len(result["test"]) == 2 and len(result["test"][0]) == 2
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sweep-T4-w0.5.pt").exists()


def test_python_dash_m(tmp_path):
    done = run_python(["-m", "pykd", "eval", "--checkpoint", tmp_path / "x.pt"], timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"pykd eval: error: checkpoint not found: {tmp_path / 'x.pt'}\n"


def test_torchrun_two_processes(teacher, tmp_path):
    done = run_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pykd", "distill", "--teacher", teacher, "--student", "tutorial-student",
         "--out", tmp_path, "--epochs", "2", "--train-fraction", "0.2", "--no-progress"],
        env={"OMP_NUM_THREADS": "1"}, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "tutorial-student-distilled.json").read_text())
    single = json.loads((teacher.parent / "teacher.json").read_text())
    # Each rank trained on its half; the reduced count covers the whole training split (the
    # sampler pads it to an even number), and every test image is counted exactly once.
    n = single["history"][0]["train_examples"]
    assert n <= metrics["history"][-1]["train_examples"] <= n + 1
    assert metrics["test"]["examples"] == single["test"]["examples"]
    assert sorted(os.listdir(tmp_path)) == ["tutorial-student-distilled.json",
                                            "tutorial-student-distilled.pt"]
    assert done.stdout.count("tutorial-student-distilled: test accuracy") == 1  # rank 0 only


def test_bench_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert pykd("bench", "--shapes", "64x10,8x300", "--dtypes", "float32",
                "--only", "pykd,eager_kl_div", "--repeats", "1", "--json", out) == 0
    table = capsys.readouterr().out
    assert "| 64 | 10 | float32 |" in table and "| 8 | 300 | float32 |" in table
    rows = json.loads(out.read_text())["rows"]
    assert [(r["N"], r["C"]) for r in rows] == [(64, 10), (8, 300)]
    assert all(r["pykd_ms"] > 0 and r["eager_kl_div_ms"] > 0 and r["copy_gbps"] > 0 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--only", "nope"], "--only: unknown implementations"),
    (["--dtypes", "int64"], "--dtypes must name floating-point"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--only", "x"], "cuda|--only"),
])
def test_bench_bad_arguments(argv, message, capsys):
    assert pykd("bench", "--shapes", "8x10", "--repeats", "1", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err)


def test_bench_bad_shapes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        pykd("bench", "--shapes", "8by10")
    assert exit_info.value.code == 2
    assert "shapes must look like" in capsys.readouterr().err


def test_bench_always_times_pykd(capsys):
    assert pykd("bench", "--shapes", "16x10", "--dtypes", "float32", "--only", "eager_tutorial",
                "--repeats", "1") == 0
    header = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| N |")]
    assert "pykd ms" in header[-1] and "eager_tutorial ms" in header[-1]
