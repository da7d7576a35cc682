"""The pykd command line, run as a user runs it: the real entry point in a child process.

Short runs (digits, a tenth of the labels, one or two epochs of the tutorial's small network) in
temporary directories. The many one-line-error cases run side by side in a few processes at a
time, each still its own `python -m pykd`.
"""
import argparse
import ast
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import pykd
from pykd import cli
from testing import TESTS_DIR, run_python

FAST = ["--epochs", "1", "--train-fraction", "0.1"]
STUDENT = ["--model", "tutorial-student"]
README = os.path.join(os.path.dirname(TESTS_DIR), "README.md")


def pykd_cli(*argv, **kwargs):
    """`python -m pykd ARGV` in a fresh child process; the CompletedProcess."""
    kwargs.setdefault("timeout", 300)
    return run_python(["-m", "pykd", *map(str, argv)], **kwargs)


# Runs command lines, each in its own process forked from one that has imported pykd (and what
# its commands import) once: each case is pykd.cli:main, the console script's entry point, with
# its own exit status, stdout and stderr (file descriptors 1 and 2) and no state shared with the
# other cases, without paying torch's import again for every case. `parallel` at a time.
FORK_RUNNER = r"""
import json, os, sys, tempfile, traceback
import matplotlib.figure, sklearn.datasets  # noqa: F401  (imported once, for every case)
from pykd import cli

cases, parallel = json.load(sys.stdin), int(sys.argv[1])
folder = tempfile.mkdtemp()

def start(i, argv, cwd):
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.chdir(cwd)
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{folder}/{i}.{name}", os.O_WRONLY | os.O_CREAT), fd)
        sys.argv = ["pykd", *argv]
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's errors, --help, --version
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()  # as the interpreter would
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)

running, codes = {}, {}
for i, (argv, cwd) in enumerate(cases):
    while len(running) >= parallel:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    running[start(i, argv, cwd)] = i
while running:
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
json.dump([{"returncode": codes[i], "stdout": open(f"{folder}/{i}.out").read(),
            "stderr": open(f"{folder}/{i}.err").read()} for i in range(len(cases))], sys.stdout)
"""


def run_cli(*cases, parallel=1, cwd=TESTS_DIR, timeout=600):
    """Each case (a list of arguments) run as `pykd ARGS` by FORK_RUNNER, in order (or
    `parallel` at a time); their CompletedProcess objects."""
    argvs = [[str(a) for a in argv] for argv in cases]
    done = run_python(["-c", FORK_RUNNER, parallel], input=json.dumps(
        [[argv, str(cwd)] for argv in argvs]), timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [subprocess.CompletedProcess(["pykd", *argv], r["returncode"], r["stdout"],
                                        r["stderr"])
            for argv, r in zip(argvs, json.loads(done.stdout))]


def ok(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_line_error(done, message):
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert re.search(message, done.stderr), done.stderr


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_images(root, classes, per_class):
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (20 * c, 40 * i, 0)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A small 'teacher' (the tutorial's student network is quick to train) in its own --out."""
    out = tmp_path_factory.mktemp("teacher")
    ok(*run_cli(["train", *STUDENT, "--name", "teacher", "--out", out, "--epochs", "2",
                 "--train-fraction", "0.2"]))
    return out / "teacher.pt"


@pytest.fixture(scope="module")
def files(teacher, tmp_path_factory):
    """Everything the error cases point at."""
    root = tmp_path_factory.mktemp("inputs")
    state = torch.load(teacher, weights_only=True)

    def save(name, **changes):
        torch.save({**{k: v for k, v in state.items() if k not in changes.get("drop", ())},
                    **{k: v for k, v in changes.items() if k != "drop"}}, root / name)
        return root / name

    (root / "text.pt").write_text("hello, I am not a checkpoint\n")
    (root / "empty.pt").write_bytes(b"")
    (root / "dir.pt").mkdir()
    save("no-data.pt", drop=("data",))
    save("stopped.pt", complete=False)
    # What a checkpoint looks like once its model's definition has changed: the weights of one
    # architecture under the name of another.
    save("changed.pt", model="keras-student")
    (root / "only-json").mkdir()
    (root / "only-json" / "student-alone-seed7.json").write_text("{}\n")
    (root / "only-json" / "selector-seed7.json").write_text("{}\n")
    (root / "bad_factories.py").write_text(
        "def broken(num_classes, in_channels, image_size):\n    raise RuntimeError('boom')\n")
    return {
        "teacher": teacher, "teacher_dir": teacher.parent, "root": root,
        "two_classes": write_images(root / "two", ["a", "b"], 10),
        # digits' class names, numbered in another order ("1", "10", "2", ... sorted)
        "renamed": write_images(root / "renamed", [str(i) for i in range(1, 11)], 4),
        "too_small": write_images(root / "small", ["a", "b"], 2),
        "cuda": "cuda" if not torch.cuda.is_available() else "cuda:99",
    }


# (id, argv, a regular expression the one line must match). "{name}" is filled from `files`.
ERRORS = [
    ("cifar-dir", ["train", *STUDENT, "--dataset", "cifar10:/no/such/dir"],
     "pykd train: error: cifar10: no such directory: /no/such/dir$"),
    ("unknown-model", ["train", "--model", "resnet-9000"],
     "--model: unknown model 'resnet-9000'"),
    ("bad-spec", ["train", *STUDENT, "--dataset", "imagenet"],
     "dataset must be digits, cifar10:PATH or folder:PATH, got 'imagenet'"),
    ("epochs-0", ["train", *STUDENT, "--epochs", "0"],
     r"argument --epochs: must be an integer >= 1, got 0"),
    ("fraction", ["train", *STUDENT, "--train-fraction", "1.5"],
     r"argument --train-fraction: must be a finite number in \(0, 1\], got 1.5"),
    ("no-teacher", ["distill", "--teacher", "/no/such.pt", "--student", "keras-student"],
     "checkpoint not found: /no/such.pt"),
    ("eval-classes", ["eval", "--checkpoint", "{teacher}", "--dataset", "folder:{two_classes}"],
     "--checkpoint .*teacher.pt was trained on 10 classes but --dataset folder:.* has 2"),
    ("distill-classes", ["distill", "--teacher", "{teacher}", "--student", "keras-student",
                         "--dataset", "folder:{two_classes}"],
     "--teacher .*teacher.pt was trained on 10 classes but --dataset folder:.* has 2"),
    ("class-order", ["distill", "--teacher", "{teacher}", "--student", "tutorial-student",
                     "--dataset", "folder:{renamed}"],
     "was trained on other classes than --dataset folder:.* has: class 0 is '0' there but "
     "'1' here"),
    ("empty", ["eval", "--checkpoint", "{root}/empty.pt"],
     r"empty.pt is empty \(0 bytes\), not a checkpoint"),
    ("text", ["eval", "--checkpoint", "{root}/text.pt"],
     r"text.pt is not a pykd checkpoint \(not a file that torch.save wrote"),
    ("directory", ["eval", "--checkpoint", "{root}/dir.pt"],
     "dir.pt is a directory, not a checkpoint file"),
    ("missing-field", ["eval", "--checkpoint", "{root}/no-data.pt"],
     "no-data.pt is not a complete pykd checkpoint: it has no 'data'"),
    ("changed-model", ["eval", "--checkpoint", "{root}/changed.pt"],
     r"do not fit the model as it is defined now \(missing .*\): its definition changed"),
    ("stopped-teacher", ["distill", "--teacher", "{root}/stopped.pt", "--student",
                         "tutorial-student"], "stopped.pt is a stopped run .*--resume"),
    ("device-tpu", ["train", *STUDENT, "--device", "tpu"],
     "--device tpu: expected cpu, cuda or cuda:N"),
    ("device-cuda", ["train", *STUDENT, "--device", "{cuda}"],
     "--device cuda.*(CPU-only build|no CUDA GPU|only .* visible)"),
    ("bench-device", ["bench", "--device", "tpu"], "--device tpu: expected cpu, cuda"),
    ("hint-student", ["distill", "--teacher", "{teacher}", "--student", "tutorial-student",
                      "--hint-weight", "1", "--hint-layer", "nope:features"],
     "--hint-layer: the student .* has no layer 'nope'; its layers are features, "),
    ("hint-format", ["distill", "--teacher", "{teacher}", "--student", "keras-student",
                     "--hint-layer", "x"], "expected STUDENT_LAYER:TEACHER_LAYER"),
    ("hint-no-weight", ["distill", "--teacher", "{teacher}", "--student", "keras-student",
                        "--hint-layer", "features:features"],
     "--hint-layer needs --hint-weight above 0"),
    ("no-loss", ["distill", "--teacher", "{teacher}", "--student", "tutorial-student",
                 "--soft-weight", "0", "--hard-weight", "0"],
     "--soft-weight, --hard-weight, --logit-weight and --hint-weight are all 0"),
    ("temperature-nan", ["distill", "--teacher", "{teacher}", "--student", "tutorial-student",
                         "--temperature", "nan"],
     r"argument --temperature: must be a finite number > 0, got nan \(see"),
    ("temperature-inf", ["distill", "--teacher", "{teacher}", "--student", "tutorial-student",
                         "--temperature", "inf"],
     r"argument --temperature: must be a finite number > 0, got inf \(see"),
    ("temperature-unused", ["distill", "--teacher", "{teacher}", "--student", "tutorial-student",
                            "--temperature", "2", "--soft-weight", "0"],
     r"--temperature only scales the soft \(KD\) term, which --soft-weight 0 turns off"),
    ("too-small", ["train", *STUDENT, "--dataset", "folder:{too_small}"],
     "is too small to split: its 4 images in 2 classes leave the validation split empty.*"
     "give each class at least 4 images"),
    ("seed-and-seeds", ["demo", "--seed", "5", "--seeds", "1"],
     "--seed and --seeds both given"),
    ("seed-alone", ["demo", "--seed", "7", "--out", "{root}/only-json"],
     "student-alone-seed7.json holds the results of an earlier run"),
    ("seeds-empty", ["demo", "--seeds", ""], "argument --seeds: expected comma-separated seeds"),
    ("sweep-teacher-model", ["sweep", "--teacher", "{teacher}", "--teacher-model", "x"],
     "--teacher and --teacher-model both given"),
    ("sweep-teacher-epochs", ["sweep", "--teacher", "{teacher}", "--teacher-epochs", "3"],
     "--teacher and --teacher-epochs both given"),
    ("sweep-weights", ["sweep", "--soft-weights", "0.5,2"],
     r"argument --soft-weights: 2: must be a finite number in \[0, 1\], got 2"),
    ("sweep-temperature", ["sweep", "--temperature", "2"],
     "pykd sweep: error: unrecognized arguments: --temperature 2"),
    ("option-first", ["--epochs", "1", "train", *STUDENT],
     "pykd: error: --epochs 1 before the command: options go after it, as in pykd train "
     "--epochs 1 --model tutorial-student"),
    ("resume-and-overwrite", ["train", *STUDENT, "--resume", "--overwrite"],
     "argument --overwrite: not allowed with argument --resume"),
    ("existing-run", ["train", *STUDENT, "--name", "teacher", "--out", "{teacher_dir}"],
     "teacher.pt holds a finished run: pass --resume to continue it or --overwrite to replace"),
    ("resume-lr", ["train", *STUDENT, "--name", "teacher", "--out", "{teacher_dir}",
                   "--train-fraction", "0.2", "--epochs", "3", "--resume", "--lr", "0.01"],
     "cannot resume .*teacher.pt: it was started with --lr 0.001, not 0.01; resume with the "
     r"same settings \(only --epochs may grow\) or pass --overwrite"),
    ("resume-dataset", ["train", *STUDENT, "--name", "teacher", "--out", "{teacher_dir}",
                        "--train-fraction", "0.2", "--epochs", "3", "--resume",
                        "--dataset", "folder:{two_classes}"],
     "it was started with --dataset digits, not folder:"),
    ("resume-model", ["train", "--model", "keras-student", "--name", "teacher", "--out",
                      "{teacher_dir}", "--resume"],
     "it was started with model tutorial-student, not keras-student"),
    ("resume-fewer-epochs", ["train", *STUDENT, "--name", "teacher", "--out", "{teacher_dir}",
                             "--train-fraction", "0.2", "--epochs", "1", "--resume"],
     "with --epochs 1: it has already trained 2 epochs"),
    ("out-is-a-file", ["train", *STUDENT, "--out", "{root}/text.pt"],
     "--out .*text.pt is a file, not a directory"),
    ("own-teacher", ["distill", "--teacher", "{teacher}", "--student", "tutorial-student",
                     "--name", "teacher", "--out", "{teacher_dir}", "--overwrite"],
     "run 'teacher' in .* would write over its own --teacher"),
    ("bad-name", ["train", *STUDENT, "--name", "../x"], "--name '../x': expected a plain file"),
    ("eval-fraction", ["eval", "--checkpoint", "{teacher}", "--train-fraction", "0.5"],
     "--train-fraction only selects training images; it does nothing for --split test"),
    ("factory-raises", ["train", "--model", "bad_factories:broken"],
     "model 'bad_factories:broken': its factory raised RuntimeError: boom"),
    ("mutual-one-student", ["mutual", "--students", "keras-student"],
     "--students keras-student: name at least 2 students"),
    ("mutual-unknown-student", ["mutual", "--students", "keras-student,nope"],
     "--students: unknown model 'nope'"),
    ("mutual-repeated-student", ["mutual", "--students", "keras-student,keras-student"],
     "argument --students: 'keras-student,keras-student' repeats a value"),
    ("mutual-hint", ["mutual", "--students", "keras-student,tutorial-student",
                     "--hint-weight", "1"], "unrecognized arguments: --hint-weight 1"),
    ("mutual-temperature-unused", ["mutual", "--students", "keras-student,tutorial-student",
                                   "--temperature", "2", "--soft-weight", "0"],
     r"--temperature only scales the soft \(KD\) term"),
    ("mutual-seed-and-seeds", ["mutual", "--students", "keras-student,tutorial-student",
                               "--seed", "1", "--seeds", "1,2"],
     "--seed and --seeds both given: mutual trains once per seed"),
    ("multistudent-no-teacher", ["multistudent", "--teacher", "/no/such.pt", "--students",
                                 "keras-student,tutorial-student"],
     "checkpoint not found: /no/such.pt"),
    ("multistudent-classes", ["multistudent", "--teacher", "{teacher}", "--students",
                              "keras-student,tutorial-student", "--dataset",
                              "folder:{two_classes}"],
     "--teacher .*teacher.pt was trained on 10 classes but --dataset folder:.* has 2"),
    ("multistudent-existing", ["multistudent", "--teacher", "{teacher}", "--students",
                               "tutorial-student,keras-student", "--seed", "7", "--out",
                               "{root}/only-json"],
     "selector-seed7.json holds the results of an earlier run: pass --resume"),
    ("bench-shapes", ["bench", "--shapes", "8by10"], "shapes must look like"),
    ("bench-repeats", ["bench", "--repeats", "0"], "argument --repeats: must be an integer >= 1"),
    ("teacher-twice", ["distill", "--teacher", "{teacher}", "--teacher", "{teacher}",
                       "--student", "keras-student"],
     "--teacher: the same checkpoint is given twice; to weight a teacher more, use "
     "--teacher-weights"),
    ("teacher-weights-one", ["distill", "--teacher", "{teacher}", "--teacher-weights", "2",
                             "--student", "keras-student"],
     "--teacher-weights weighs several teachers, but one --teacher is given"),
    ("teacher-weights-count", ["distill", "--teacher", "{teacher}", "--teacher",
                               "{root}/stopped.pt", "--teacher-weights", "1,2,3", "--student",
                               "keras-student"],
     "--teacher-weights: 3 weights for 2 teachers; give one weight per --teacher"),
    ("teacher-weights-zero", ["distill", "--teacher", "{teacher}", "--teacher",
                              "{root}/stopped.pt", "--teacher-weights", "0,0", "--student",
                              "keras-student"], "--teacher-weights: all weights are 0"),
    ("teachers-hint", ["distill", "--teacher", "{teacher}", "--teacher", "{root}/stopped.pt",
                       "--hint-weight", "1", "--student", "keras-student"],
     "--hint-weight needs a single --teacher"),
    ("teachers-stopped", ["distill", "--teacher", "{teacher}", "--teacher", "{root}/stopped.pt",
                          "--student", "keras-student", "--out", "{root}/teachers"],
     "--teacher .*stopped.pt is a stopped run"),
]


@pytest.fixture(scope="module")
def results(files):
    """Every case of ERRORS (and the --bf16 warning), two at a time."""
    cases = {case: [a.format(**files) for a in argv] for case, argv, _ in ERRORS}
    cases["bf16"] = ["train", *STUDENT, "--bf16", "--device", "cpu", "--dataset",
                     "cifar10:/no/such/dir"]
    # The factory case imports bad_factories.py from the current directory.
    return dict(zip(cases, run_cli(*cases.values(), parallel=2, cwd=files["root"])))


@pytest.mark.parametrize("case, message", [(c, m) for c, _, m in ERRORS],
                         ids=[c for c, _, _ in ERRORS])
def test_errors_are_one_line(case, message, results):
    one_line_error(results[case], message)


def test_error_left_the_run_alone(results, teacher):
    """The refused reruns and resumes of the teacher's run changed nothing in its --out."""
    assert all(results[c].returncode == 2 for c in results if c.startswith(("existing", "resume")))
    assert sorted(os.listdir(teacher.parent)) == ["teacher.epochs.jsonl", "teacher.json",
                                                  "teacher.pt"]
    assert torch.load(teacher, weights_only=True)["epoch"] == 2


def test_bf16_on_the_cpu_warns(results):
    done = results["bf16"]
    assert done.returncode == 2
    warning, error = done.stderr.splitlines()
    assert warning.startswith("pykd train: warning: --bf16 on the CPU is emulated")
    assert "cifar10: no such directory" in error


def test_distill_from_several_teachers(teacher, tmp_path):
    """Two teachers trained on differently normalised inputs, weighted; the run records both,
    and a resume must keep them and their weights."""
    second = tmp_path / "second"
    ok(*run_cli(["train", "--model", "tutorial-student", "--name", "second", "--out", second,
                 "--epochs", "1", "--train-fraction", "0.3", "--seed", "3"]))
    distill = ["distill", "--teacher", teacher, "--teacher", second / "second.pt",
               "--teacher-weights", "0.75,0.25", "--student", "tutorial-student", "--out",
               tmp_path, *FAST]
    first, resumed, reweighted, reordered = run_cli(
        distill, [*distill, "--epochs", "2", "--resume"],
        [*distill[:6], "0.5,0.5", *distill[7:], "--resume"],
        ["distill", "--teacher", second / "second.pt", "--teacher", teacher, *distill[5:],
         "--resume"])
    ok(first)
    assert re.search(r"epoch 1/1: loss [\d.]+ \(cross-entropy [\d.]+, KD [\d.]+\)", first.stderr)
    ok(resumed)
    metrics = read_json(tmp_path / "tutorial-student-distilled.json")
    assert [t["path"] for t in metrics["teacher"]] == [str(teacher), str(second / "second.pt")]
    assert metrics["config"]["teacher_weights"] == [0.75, 0.25]
    assert len(metrics["history"]) == 2
    # The student's inputs are normalised as the first teacher's were.
    assert metrics["data"]["mean"] == read_json(teacher.parent / "teacher.json")["data"]["mean"]
    one_line_error(reweighted, "cannot resume .*: it was started with --teacher-weights "
                   r"\[0.75, 0.25\], not \[0.5, 0.5\]")
    # Reordered, the student's inputs would be normalised as the other teacher's were.
    one_line_error(reordered, "cannot resume .*: it was started with data set contents")


def test_train_distill_eval(teacher, tmp_path):
    metrics = read_json(teacher.parent / "teacher.json")
    assert metrics["model"] == "tutorial-student" and len(metrics["history"]) == 2
    assert set(metrics["test"]) >= {"accuracy", "precision", "recall", "f1"}
    assert set(metrics["cost"]) == {"parameters", "size_bytes", "macs"}
    assert metrics["data"]["classes"] == [str(i) for i in range(10)]
    assert "temperature" not in metrics["config"]  # a run without a teacher has no T

    checkpoint = tmp_path / "keras-student-distilled.pt"
    distill, *evals, again, other = run_cli(
        ["distill", "--teacher", teacher, "--student", "keras-student", "--out", tmp_path,
         "--temperature", "2", "--soft-weight", "0.7", "--hard-weight", "0.3",
         "--logit-weight", "0.1", "--nuclear-weight", "0.001", *FAST],
        # Each split its own file; the same evaluation again is fine, another one is refused.
        ["eval", "--checkpoint", checkpoint, "--split", "test"],
        ["eval", "--checkpoint", checkpoint, "--split", "val"],
        ["eval", "--checkpoint", checkpoint],
        ["eval", "--checkpoint", checkpoint, "--data-seed", "3"])
    ok(distill)
    distilled = read_json(tmp_path / "keras-student-distilled.json")
    assert distilled["teacher"]["path"] == str(teacher)
    assert distilled["teacher"]["run_id"] == metrics["run_id"]
    assert distilled["config"]["temperature"] == 2.0 and distilled["config"]["soft_weight"] == 0.7
    # The student is normalised exactly as the teacher was, on the teacher's classes.
    assert distilled["data"]["mean"] == metrics["data"]["mean"]
    assert distilled["data"]["classes"] == metrics["data"]["classes"]
    state = torch.load(checkpoint, weights_only=True)
    assert state["run_id"] == distilled["run_id"] and state["complete"]
    assert state["results"]["test"] == distilled["test"]  # .pt and .json describe one run
    assert re.search(r"keras-student-distilled: epoch 1/1: loss [\d.]+ \(cross-entropy [\d.]+, "
                     r"KD [\d.]+\), train accuracy [\d.]+, val accuracy [\d.]+, [\d.]+ s\n",
                     distill.stderr)
    assert "it/s" not in distill.stderr and "s/it" not in distill.stderr  # no bars in a pipe

    for split, done in zip(("test", "val"), evals):
        assert f"keras-student on digits ({split}" in ok(done).stdout and "M MACs" in done.stdout
    test = read_json(tmp_path / "keras-student-distilled.eval-test.json")
    val = read_json(tmp_path / "keras-student-distilled.eval-val.json")
    assert test["metrics"]["accuracy"] == pytest.approx(distilled["test"]["accuracy"])
    assert val["metrics"]["accuracy"] == pytest.approx(distilled["val"]["accuracy"])
    assert (test["evaluated"]["split"], val["evaluated"]["split"]) == ("test", "val")
    assert test["cost"]["latency"]["repeats"] >= 50
    ok(again)
    one_line_error(other, "eval-test.json holds another evaluation .*: pass --overwrite")
    assert read_json(tmp_path / "keras-student-distilled.eval-test.json")["evaluated"] == \
        test["evaluated"]
    ok(*run_cli(["eval", "--checkpoint", checkpoint, "--data-seed", "3", "--overwrite"]))
    assert read_json(tmp_path / "keras-student-distilled.eval-test.json")[
        "evaluated"]["data_seed"] == 3


def test_rerun_refuses_resume_continues_overwrite_replaces(tmp_path):
    args = ["train", *STUDENT, "--out", tmp_path, "--train-fraction", "0.1"]
    first, rerun, resumed, replaced = run_cli([*args, "--epochs", "2", "--tensorboard",
                                               "--resume"],
                                              [*args, "--epochs", "1"],
                                              [*args, "--epochs", "3", "--resume"],
                                              [*args, "--epochs", "1", "--overwrite"])
    assert "nothing to resume in" in ok(first).stderr  # --resume of nothing starts, and says so
    # The case of the issue: a 1-epoch rerun must not replace the 2-epoch model...
    one_line_error(rerun, "tutorial-student.pt holds a finished run: pass --resume")
    # ...which is still there to be resumed.
    assert "tutorial-student: resuming from epoch 2 of 3" in ok(resumed).stderr
    ok(replaced)
    result = read_json(tmp_path / "tutorial-student.json")
    assert [h["epoch"] for h in result["history"]] == [1]
    # The per-epoch log keeps every epoch of both runs, each line naming its run.
    lines = [json.loads(line) for line in
             (tmp_path / "tutorial-student.epochs.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 1]
    assert len({line["run_id"] for line in lines[:3]}) == 1
    assert lines[3]["run_id"] == result["run_id"] != lines[0]["run_id"]
    assert set(lines[0]) >= {"train_loss", "train_cross_entropy", "val_accuracy", "seconds"}
    events = os.listdir(tmp_path / "tensorboard" / "tutorial-student")
    assert events and all(e.startswith("events.out.tfevents") for e in events)
    assert not (tmp_path / "tutorial-student.partial.pt").exists()


CRASHY = """
import os
from torch import nn

class Crashy(nn.Module):
    def __init__(self, num_classes, in_channels, image_size):
        super().__init__()
        self.features = nn.Flatten()
        self.classifier = nn.Linear(in_channels * image_size ** 2, num_classes)

    def forward(self, x):
        # PYKD_TEST_CRASH: fail once training and evaluation are done (measuring the cost, on a
        # batch of 2), as the issue's run did in count_macs.
        if os.environ.get("PYKD_TEST_CRASH") and not self.training and len(x) == 2:
            raise RuntimeError("crash after training")
        return self.classifier(self.features(x))

def tiny(num_classes, in_channels, image_size):
    return Crashy(num_classes, in_channels, image_size)
"""


def installed_script():
    script = os.path.join(os.path.dirname(sys.executable), "pykd")
    if not os.path.exists(script):
        pytest.skip("needs the pykd console script (pip install .)")
    return script


def test_custom_model_from_the_current_directory_and_a_crash_after_training(tmp_path):
    """The console script imports module:function from the current directory, names its files
    without the colon, and a run that fails after training leaves the earlier results alone."""
    (tmp_path / "mymodels.py").write_text(CRASHY)
    argv = [installed_script(), "train", "--model", "mymodels:tiny", "--out", "runs",
            "--train-fraction", "0.1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def script(*extra, **more_env):
        return subprocess.run([*argv, *extra], cwd=tmp_path, env={**env, **more_env},
                              capture_output=True, text=True, timeout=300)

    ok(script("--epochs", "1"))
    runs = tmp_path / "runs"
    assert sorted(os.listdir(runs)) == ["mymodels-tiny.epochs.jsonl", "mymodels-tiny.json",
                                        "mymodels-tiny.pt"]
    before = {name: (runs / name).read_bytes() for name in ("mymodels-tiny.pt",
                                                            "mymodels-tiny.json")}
    crashed = script("--epochs", "1", "--overwrite", PYKD_TEST_CRASH="1")
    assert crashed.returncode != 0 and "crash after training" in crashed.stderr
    assert {name: (runs / name).read_bytes() for name in before} == before
    assert (runs / "mymodels-tiny.partial.pt").exists()  # the new run's epochs are not lost
    done = ok(script("--epochs", "1", "--resume"))
    assert "resuming from epoch 1 of 1" in done.stderr
    assert len(read_json(runs / "mymodels-tiny.json")["history"]) == 1
    assert not (runs / "mymodels-tiny.partial.pt").exists()


def child_env():
    """The environment run_python gives a child, for children started with Popen."""
    pythonpath = [os.path.dirname(os.path.dirname(pykd.__file__)), TESTS_DIR]
    pythonpath += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}


def test_ctrl_c_says_how_to_resume(tmp_path):
    argv = [sys.executable, "-m", "pykd", "train", *STUDENT, "--out", str(tmp_path),
            "--train-fraction", "0.1"]
    child = subprocess.Popen([*argv, "--epochs", "1000"], cwd=TESTS_DIR, env=child_env(),
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        for line in child.stderr:
            if "epoch 1/1000:" in line:
                break
        child.send_signal(signal.SIGINT)
        rest = child.stderr.read()
        assert child.wait(timeout=120) == 130
    finally:
        child.kill()
    last = rest.strip().splitlines()[-1]
    match = re.fullmatch(r"pykd train: interrupted; (.*) holds (\d+) of 1000 epochs: run the "
                         r"same command with --resume to continue", last)
    assert match and match[1] == str(tmp_path / "tutorial-student.partial.pt"), rest
    assert "Traceback" not in rest
    saved = int(match[2])
    done = ok(run_python([*argv[1:], "--epochs", saved + 1, "--resume"], timeout=300))
    assert f"resuming from epoch {saved} of {saved + 1}" in done.stderr
    assert len(read_json(tmp_path / "tutorial-student.json")["history"]) == saved + 1


def test_progress_bars_only_on_a_terminal(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    child = subprocess.Popen(
        [sys.executable, "-m", "pykd", "train", *STUDENT, "--out", str(tmp_path),
         "--train-fraction", "0.1", "--epochs", "2", "--batch-size", "8"],
        cwd=TESTS_DIR, env=child_env(), stdout=subprocess.DEVNULL, stderr=secondary)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closes with the child
            break
        if not chunk:
            break
        output += chunk
    assert child.wait(timeout=300) == 0
    os.close(primary)
    text = output.decode(errors="replace")
    assert "it/s" in text or "s/it" in text  # tqdm's bar
    assert re.search(r"tutorial-student: epoch 2/2: loss .* val accuracy [\d.]+", text)


def test_demo(tmp_path):
    done, help_done = run_cli(
        ["demo", "--teacher-model", "tutorial-student", "--student-model", "tutorial-student",
         "--teacher-epochs", "1", "--teacher-fraction", "0.1", "--epochs", "1", "--seeds", "0,1",
         "--out", tmp_path],
        ["demo", "--help"])
    ok(done)
    table = (tmp_path / "results.md").read_text()
    assert "| student alone | 0." in table and " ± " in table and "ms / image" not in table
    result = read_json(tmp_path / "demo.json")
    assert result["seeds"] == [0, 1] and len(result["test"]["distilled student"]) == 2
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # What --help says are the demo's defaults is what the demo ran with.
    help_text = " ".join(ok(help_done).stdout.split())
    student = read_json(tmp_path / "student-distilled-seed1.json")
    for option, value in (("--batch-size", student["config"]["batch_size"]),
                          ("--train-fraction", student["data"]["train_fraction"]),
                          ("--temperature", student["config"]["temperature"]),
                          ("--soft-weight", student["config"]["soft_weight"])):
        assert re.search(rf"{option} \S+ [^-]*?\(default: {value}\)", help_text), option
    assert student["config"]["batch_size"] == 32 and student["data"]["train_fraction"] == 0.1
    assert student["config"]["seed"] == 1
    assert done.stderr.count("epoch 1/1:") == 5  # a line per epoch of every run


def test_sweep_chooses_on_validation(teacher, tmp_path):
    ok(*run_cli(["sweep", "--teacher", teacher, "--student", "tutorial-student", "--out",
                 tmp_path, "--temperatures", "1,4", "--soft-weights", "0.5", *FAST]))
    result = read_json(tmp_path / "sweep.json")
    assert result["temperatures"] == [1.0, 4.0] and result["soft_weights"] == [0.5]
    val = [row[0]["accuracy"] for row in result["val"]]
    chosen = result["chosen"]
    assert chosen["val"]["accuracy"] == max(val)
    i = result["temperatures"].index(chosen["temperature"])
    assert chosen["test"] == result["test"][i][0]
    table = (tmp_path / "sweep.md").read_text()
    assert "| val accuracy | test accuracy |" in table and table.count("| chosen |") == 1
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mutual_resume_and_the_students_checkpoints(tmp_path):
    args = ["mutual", "--students", "tutorial-student,keras-student", "--out", tmp_path,
            "--train-fraction", "0.1"]
    first, rerun, resumed, cohort_eval, member_eval = run_cli(
        [*args, "--epochs", "1"],
        [*args, "--epochs", "1"],
        [*args, "--epochs", "2", "--resume"],
        ["eval", "--checkpoint", tmp_path / "mutual-seed0.pt"],
        ["eval", "--checkpoint", tmp_path / "mutual-seed0-keras-student.pt"])
    # One line per epoch for the pair, each value student by student.
    assert re.search(r"mutual-seed0: epoch 1/1: loss [\d.]+/[\d.]+ \(cross-entropy [\d.]+/[\d.]+, "
                     r"KD [\d.]+/[\d.]+\), train accuracy [\d.]+/[\d.]+, val accuracy "
                     r"[\d.]+/[\d.]+", ok(first).stderr)
    one_line_error(rerun, "tutorial-student-alone-seed0.pt holds a finished run: pass --resume")
    assert "mutual-seed0: resuming from epoch 1 of 2" in ok(resumed).stderr
    table = (tmp_path / "mutual.md").read_text()
    for row in ("tutorial-student alone", "tutorial-student mutual", "keras-student alone",
                "keras-student mutual"):
        assert f"| {row} | 0." in table
    assert "keras-student: mutual - alone test accuracy" in table
    result = read_json(tmp_path / "mutual.json")
    assert result["students"] == ["tutorial-student", "keras-student"]
    assert set(result["mutual_gain"]) == {"tutorial-student", "keras-student"}
    assert (tmp_path / "mutual.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cohort = read_json(tmp_path / "mutual-seed0.json")
    assert cohort["config"]["temperature"] == 1.0 and cohort["config"]["soft_weight"] == 1.0
    # Each student of the pair is a checkpoint of its own, for eval (or as a teacher)...
    member = read_json(tmp_path / "mutual-seed0-keras-student.json")
    assert member["model"] == "keras-student" and len(member["history"]) == 2
    assert member["history"][1]["val_accuracy"] == cohort["history"][1]["val_accuracy"][1]
    assert member["test"] == cohort["test"][1] and member["run_id"] == cohort["run_id"]
    ok(member_eval)
    evaluated = read_json(tmp_path / "mutual-seed0-keras-student.eval-test.json")
    assert evaluated["metrics"]["accuracy"] == pytest.approx(member["test"]["accuracy"])
    # ...while the pair's own checkpoint is what resumes, and is not one model.
    one_line_error(cohort_eval, "mutual-seed0.pt holds 2 students trained together")


def test_multistudent_routes_each_image_to_the_chosen_student(teacher, tmp_path):
    args = ["multistudent", "--teacher", teacher, "--students", "tutorial-student,keras-student",
            "--out", tmp_path, *FAST]
    done, resumed = run_cli(args, [*args, "--resume"])
    ok(done)
    text = (tmp_path / "multistudent.md").read_text()
    for row in ("| teacher | 0.", "| tutorial-student (distilled) | 0.",
                "| selector + students (routed) | 0.", "| keras-student + selector |",
                "| selector accuracy at naming the best student (test) |",
                "| oracle: some student is right"):
        assert row in text, row
    assert (tmp_path / "multistudent.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = read_json(tmp_path / "multistudent.json")
    routed = result["per_seed"][0]["routed"]

    # The routed system's accuracy, recomputed from the checkpoints it wrote.
    from pykd.data import load_dataset
    from pykd.train import load_model

    selector, state = load_model(tmp_path / "selector-seed0.pt")
    assert state["data"]["classes"] == ["tutorial-student", "keras-student"]
    mean, std = (torch.load(teacher, weights_only=True)["data"][k] for k in ("mean", "std"))
    splits = load_dataset("digits", data_seed=0, train_fraction=0.1, mean=mean, std=std)
    with torch.no_grad():
        chosen = selector.eval()(splits.test_x).argmax(-1)
        predictions = torch.stack([
            load_model(tmp_path / f"{s}-distilled-seed0.pt")[0].eval()(splits.test_x).argmax(-1)
            for s in ("tutorial-student", "keras-student")])
    right = predictions[chosen, torch.arange(len(chosen))] == splits.test_y
    assert routed["test"]["accuracy"] == pytest.approx(right.double().mean().item())
    assert routed["share"][1] == pytest.approx(chosen.double().mean().item())
    assert routed["oracle_accuracy"] >= routed["test"]["accuracy"]

    assert ok(resumed).stderr.count("resuming from epoch 1 of 1") == 3
    again = read_json(tmp_path / "multistudent.json")["per_seed"][0]["routed"]
    assert again["test"] == routed["test"]


def test_version_and_package_metadata():
    done = ok(pykd_cli("--version"))
    assert done.stdout == f"pykd {pykd.__version__}\n"
    meta = importlib.metadata.metadata("pykd")
    assert meta["Version"] == pykd.__version__
    assert meta["License-Expression"] == "MIT" and meta["Requires-Python"] == ">=3.10"
    assert "Programming Language :: Python :: 3.10" in meta.get_all("Classifier")
    # What requires-python claims: every file parses as Python 3.10 (setup.py's
    # glob(root_dir=...) is 3.10's too).
    root = os.path.dirname(TESTS_DIR)
    for folder in ("pykd", "tests", "build_backend", "."):
        for name in os.listdir(os.path.join(root, folder)):
            if name.endswith(".py"):
                with open(os.path.join(root, folder, name)) as f:
                    ast.parse(f.read(), name, feature_version=(3, 10))
    assert os.path.exists(os.path.join(root, "LICENSE"))


# A child in which the `train` extra is missing, as after a plain `pip install .`.
WITHOUT_EXTRAS = """
import runpy, sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"numpy", "sklearn", "matplotlib", "tqdm", "PIL"}:
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Missing())
sys.argv = ["pykd", *sys.argv[1:]]
runpy.run_module("pykd", run_name="__main__", alter_sys=True)
"""


def test_without_the_train_extra():
    assert "COMMAND" in ok(run_python(["-c", WITHOUT_EXTRAS, "--help"], timeout=300)).stdout
    for argv, missing in ((["train", *STUDENT], "numpy and scikit-learn"),
                          (["demo"], "numpy and scikit-learn and matplotlib")):
        done = run_python(["-c", WITHOUT_EXTRAS, *argv], timeout=300)
        lines = done.stderr.splitlines()
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert len(lines) == 1, done.stderr
        assert re.fullmatch(f"pykd {argv[0]}: error: needs {missing}, not installed here: "
                            r"pip install 'pykd\[train\]'", lines[0]), done.stderr


def readme_options():
    """{command: set of options} from the README's table of every command's options."""
    text = open(README).read()
    section = text.split("### Options of each command", 1)[1].split("\n#", 1)[0]
    return {m[1]: set(re.findall(r"`(--[a-z0-9-]+)", m[2]))
            for m in re.finditer(r"^\| `pykd ([\w-]+)` \|(.*)\|$", section, re.M)}


def test_readme_lists_every_option_of_every_command():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    documented = readme_options()
    assert set(documented) == {name for name, _, _ in cli.COMMANDS}
    for name, sub in subparsers.choices.items():
        options = {o for a in sub._actions for o in a.option_strings if o.startswith("--")}
        assert documented[name] == options - {"--help"}, name


def test_torchrun_two_processes(teacher, tmp_path):
    done = run_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pykd", "distill", "--teacher", teacher, "--student", "tutorial-student",
         "--out", tmp_path, "--epochs", "2", "--train-fraction", "0.2"],
        env={"OMP_NUM_THREADS": "1"}, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = read_json(tmp_path / "tutorial-student-distilled.json")
    single = read_json(teacher.parent / "teacher.json")
    # Each rank trained on its half; the reduced count covers the whole training split (the
    # sampler pads it to an even number), and every test image is counted exactly once.
    n = single["history"][0]["train_examples"]
    assert n <= metrics["history"][-1]["train_examples"] <= n + 1
    assert metrics["test"]["examples"] == single["test"]["examples"]
    assert sorted(os.listdir(tmp_path)) == ["tutorial-student-distilled.epochs.jsonl",
                                            "tutorial-student-distilled.json",
                                            "tutorial-student-distilled.pt"]
    assert done.stdout.count("tutorial-student-distilled: test accuracy") == 1  # rank 0 only
    assert done.stderr.count("tutorial-student-distilled: epoch 2/2:") == 1


def test_torchrun_multistudent(teacher, tmp_path):
    done = run_python(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "pykd", "multistudent", "--teacher", teacher, "--students",
         "tutorial-student,keras-student", "--out", tmp_path, *FAST],
        env={"OMP_NUM_THREADS": "1"}, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = read_json(tmp_path / "multistudent.json")
    assert result["per_seed"][0]["routed"]["test"]["examples"] == \
        read_json(teacher.parent / "teacher.json")["test"]["examples"]
    assert done.stdout.count("seed 0 routed system: test accuracy") == 1  # rank 0 only
    assert done.stderr.count("selector-seed0: epoch 1/1:") == 1


def test_bench_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--shapes", "64x10,2x4x300@0.25", "--dtypes", "float32",
            "--only", "eager_kl_div", "--repeats", "1", "--json", out]
    table = ok(*run_cli(args)).stdout
    assert "| 64x10 | float32 |" in table and "| 2x4x300@0.25 | float32 |" in table
    rows = read_json(out)["rows"]
    assert [r["shape"] for r in rows] == ["64x10", "2x4x300@0.25"]
    assert all(r["pykd_ms"] > 0 and r["eager_kl_div_ms"] > 0 and r["copy_gbps"] > 0 for r in rows)
    # pykd keeps one gradient for the backward (fp32: 4 bytes an element), F.kl_div more.
    assert all(r["pykd_saved_bytes"] == r["gradient_bytes"] for r in rows)
    assert all(r["eager_kl_div_saved_bytes"] > r["gradient_bytes"] for r in rows)
    header = [line for line in table.splitlines() if line.startswith("| shape |")]
    assert "pykd ms" in header[-1] and "eager_kl_div ms" in header[-1]
    # An existing result is kept unless --overwrite is given.
    before = out.read_bytes()
    (refused,) = run_cli(args)
    assert refused.returncode == 2 and "bench.json exists; pass --overwrite" in refused.stderr
    assert out.read_bytes() == before
    ok(*run_cli([*args, "--overwrite"]))
