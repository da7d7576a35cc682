"""pykd.lm: the byte-level language-model distillation (data, masks, the run end to end)."""
import re

import pytest
import torch

import pykd
from pykd import lm, models
from testing import run_python


def test_held_out_files_are_disjoint_and_fixed():
    files = lm.stdlib_files()
    splits = lm.split_files(files)
    assert files == sorted(files) and len(files) > 50
    assert splits["test"][0] == files[0] and splits["val"][0] == files[5]
    names = [set(map(str, paths)) for paths in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(map(len, names)) == len(files)


def test_windows_are_next_bytes_with_padding_masked(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_bytes(b"abcdefg")  # 6 targets: one window of 4 and a padded one
    b.write_bytes(b"xyz")
    x, y = lm.windows([a, b], context=4, max_bytes=100)
    assert x.tolist() == [list(b"abcd"), [ord("e"), ord("f"), 0, 0], [ord("x"), ord("y"), 0, 0]]
    assert y.tolist() == [list(b"bcde"), [ord("f"), ord("g"), -100, -100],
                          [ord("y"), ord("z"), -100, -100]]
    x, y = lm.windows([a, b], context=4, max_bytes=5)  # the first 5 bytes only
    assert y.tolist() == [list(b"bcde")]


def test_fused_linear_loss_on_the_models_equals_kdloss_on_their_logits():
    torch.manual_seed(0)
    teacher, student = models.byte_lm_teacher(16), models.byte_lm_student(16)
    x = torch.randint(0, 256, (3, 16))
    y = torch.roll(x, -1, dims=1)
    y[:, -3:] = -100
    fused = pykd.FusedLinearKDLoss(temperature=2.0, soft_weight=0.5, hard_weight=0.5)(
        student.hidden(x), student.head.weight, teacher.hidden(x).detach(),
        teacher.head.weight.detach(), y, student_bias=student.head.bias,
        teacher_bias=teacher.head.bias.detach())
    plain = pykd.KDLoss(temperature=2.0, soft_weight=0.5, hard_weight=0.5)(
        student(x), teacher(x).detach(), y)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    causal = student(x)
    changed = x.clone()
    changed[:, 10:] = 0  # a later byte never changes an earlier position's logits
    torch.testing.assert_close(student(changed)[:, :10], causal[:, :10])
    assert not torch.allclose(student(changed)[:, 10:], causal[:, 10:])


def test_end_to_end_run_reports_every_model():
    done = run_python(["-m", "pykd.lm", "--teacher-steps", "3", "--student-steps", "2",
                       "--batch-size", "4", "--context", "32", "--train-bytes", "20000",
                       "--eval-bytes", "3000", "--seeds", "0,1"], timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| teacher", "| student alone",
                                                      "| student distilled"]
    params = sum(p.numel() for p in models.byte_lm_student(32).parameters())
    assert re.search(rf"\| student distilled \| {params:,} \| \d\.\d{{4}} ± \d\.\d{{4}} \|",
                     done.stdout)
    assert "student distilled, seed 1" in done.stderr


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "1,1"], "argument --seeds: '1,1' repeats a value"),
    (["--seeds", "-1"], "argument --seeds: -1: must be an integer in [0, 4294967295], got -1"),
    (["--teacher-steps", "0"], "argument --teacher-steps: must be an integer >= 1, got 0"),
    (["--soft-weight", "0", "--hard-weight", "0"], "--soft-weight and --hard-weight are both 0"),
])
def test_bad_input_is_one_line(argv, message):
    done = run_python(["-m", "pykd.lm", *argv])  # refused before any data is read
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and message in done.stderr, done.stderr
