"""Training and distillation: checkpoints, bit-identical resume, the loss terms, evaluation."""
import os

import pytest
import torch

import pykd
from pykd import models, report, train
from pykd.data import load_dataset
from pykd.train import TrainConfig, fit


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", train_fraction=0.15)  # ~180 training images


def student(seed=0):
    torch.manual_seed(seed)
    return models.build_model("tutorial-student")  # small, and has Dropout (uses the RNG)


def config(**kwargs):
    return TrainConfig(**{"epochs": 3, "batch_size": 32, "seed": 1, "progress": False, **kwargs})


@pytest.fixture(scope="module")
def teacher_path(splits, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    fit(student(5), splits, config(epochs=4), checkpoint=path, meta={"model": "tutorial-student"})
    return path


class Stop(Exception):
    pass


def stop_after(epoch):
    def callback(record):
        if record["epoch"] == epoch:
            raise Stop

    return callback


def cohort(seed=0):
    return train.Cohort([student(seed), student(seed + 1)])


@pytest.mark.parametrize("mode", ["train", "distill", "mutual"])
def test_resume_is_bit_identical(splits, teacher_path, tmp_path, mode):
    kwargs = {}
    if mode == "distill":
        kwargs["teacher"] = train.load_model(teacher_path)[0]
    cfg = config() if mode == "mutual" else config(
        logit_weight=0.1 if mode == "distill" else 0.0, nuclear_weight=1e-3)
    make = cohort if mode == "mutual" else student
    meta = {"model": "tutorial-student"}
    whole = make()
    fit(whole, splits, cfg, checkpoint=str(tmp_path / "whole.pt"), meta=meta, **kwargs)

    path = str(tmp_path / "split.pt")
    with pytest.raises(Stop):
        fit(make(), splits, cfg, checkpoint=path, meta=meta, on_epoch_end=stop_after(1),
            **kwargs)
    assert train.load_checkpoint(path)["epoch"] == 1
    torch.manual_seed(1234)  # the checkpoint, not the caller, must decide the RNG state
    resumed = make(seed=99)  # and its weights, not the fresh initialisation
    result = fit(resumed, splits, cfg, checkpoint=path, meta=meta, resume_from=path, **kwargs)

    assert [r["epoch"] for r in result["history"]] == [1, 2, 3]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    state = train.load_checkpoint(path)
    assert state["epoch"] == 3 and set(state) >= {"optimizer", "rng", "config", "state_dict"}
    if mode == "mutual":  # a value per student, for every per-student measure
        record = result["history"][-1]
        assert all(len(record[k]) == 2 for k in ("train_loss", "train_kd", "val_accuracy"))
        assert [m["examples"] for m in result["test"]] == [len(splits.test_y)] * 2


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pt")
    train.save_checkpoint(path, {"format": train.CHECKPOINT_FORMAT, "epoch": 1})

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        train.save_checkpoint(path, {"format": train.CHECKPOINT_FORMAT, "epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1  # the last good one is intact
    assert os.listdir(tmp_path) == ["model.pt"]  # and no temporary file is left behind


def test_load_checkpoint_errors(tmp_path, teacher_path):
    def fails(path, message):
        with pytest.raises(train.CheckpointError, match=message):
            train.load_checkpoint(str(path))

    fails(tmp_path / "missing.pt", "checkpoint not found")
    fails(tmp_path, "is a directory, not a checkpoint file")
    (tmp_path / "empty.pt").write_bytes(b"")
    fails(tmp_path / "empty.pt", r"is empty \(0 bytes\)")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    fails(tmp_path / "junk.pt", "is not a pykd checkpoint .not a file that torch.save wrote")
    (tmp_path / "text.pt").write_text("some text\n")
    fails(tmp_path / "text.pt", "is not a pykd checkpoint .not a file that torch.save wrote")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    fails(tmp_path / "other.pt", "not a pykd checkpoint$")
    state = torch.load(teacher_path, weights_only=True)
    torch.save({**state, "format": "pykd-checkpoint/1"}, tmp_path / "old.pt")
    fails(tmp_path / "old.pt", "is a pykd-checkpoint/1 checkpoint; this pykd reads")
    for field in ("run_id", "model_args", "optimizer"):
        torch.save({k: v for k, v in state.items() if k != field}, tmp_path / "part.pt")
        fails(tmp_path / "part.pt", f"not a complete pykd checkpoint: it has no '{field}'")
    torch.save({**state, "data": {**state["data"], "classes": "0123456789"}},
               tmp_path / "typed.pt")
    fails(tmp_path / "typed.pt", "'data.classes' is a str")


def test_changed_model_definition(tmp_path, teacher_path):
    state = torch.load(teacher_path, weights_only=True)
    torch.save({**state, "model": "keras-student"}, tmp_path / "changed.pt")
    with pytest.raises(train.CheckpointError,
                       match=r"do not fit the model as it is defined now \(missing .*; "
                             r"unexpected .*\): its definition changed"):
        train.load_model(str(tmp_path / "changed.pt"))


def test_resume_refuses_another_model(splits, tmp_path):
    path = str(tmp_path / "net.pt")
    fit(student(), splits, config(epochs=1), checkpoint=path, meta={"model": "tutorial-student"})
    with pytest.raises(train.CheckpointError,
                       match="started with model tutorial-student, not keras-student"):
        fit(models.build_model("keras-student"), splits, config(epochs=2), checkpoint=path,
            meta={"model": "keras-student"}, resume_from=path)


@pytest.fixture(scope="module")
def distilled_path(splits, teacher_path, tmp_path_factory):
    """A run of 2 epochs distilled from the teacher (that the tests below only read)."""
    path = str(tmp_path_factory.mktemp("distilled") / "net.pt")
    fit(student(), splits, config(epochs=2), teacher=train.load_model(teacher_path)[0],
        checkpoint=path)
    return path


@pytest.mark.parametrize("change, message", [
    ({"lr": 0.01}, "--lr 0.001, not 0.01"),
    ({"batch_size": 16}, "--batch-size 32, not 16"),
    ({"bf16": True}, "--bf16 off, not on"),
    ({"seed": 2}, "--seed 1, not 2"),
    ({"temperature": 2.0}, "--temperature 4.0, not 2.0"),
    ({"hard_weight": 0.0}, "--hard-weight 0.5, not 0.0"),
    ({"hint_weight": 1.0}, "--hint-weight 0.0, not 1.0"),
    ({"epochs": 1}, "with --epochs 1: it has already trained 2 epochs"),
])
def test_resume_refuses_changed_settings(splits, distilled_path, teacher_path, change,
                                         message):
    teacher, path = train.load_model(teacher_path)[0], distilled_path
    with pytest.raises(train.CheckpointError, match=f"cannot resume {path}.*{message}"):
        fit(student(), splits, config(**{"epochs": 3, **change}), teacher=teacher,
            checkpoint=path, resume_from=path)
    assert train.load_checkpoint(path)["epoch"] == 2


def test_ctrl_c_raises_interrupted_with_the_last_epoch(splits, tmp_path):
    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    path = str(tmp_path / "net.pt")
    with pytest.raises(train.Interrupted) as stopped:
        fit(student(), splits, config(epochs=5), checkpoint=path, on_epoch_end=interrupt)
    assert (stopped.value.checkpoint, stopped.value.epoch, stopped.value.epochs) == (path, 2, 5)
    with pytest.raises(train.Interrupted) as stopped:
        fit(student(), splits, config(epochs=5), on_epoch_end=interrupt)
    assert (stopped.value.checkpoint, stopped.value.epoch) == (None, 0)


@pytest.mark.parametrize("change, message", [
    ({"temperature": float("nan")}, r"--temperature must be a finite number > 0, got nan"),
    ({"temperature": float("inf")}, r"--temperature must be a finite number > 0, got inf"),
    ({"lr": 0.0}, r"--lr must be a finite number > 0, got 0.0"),
    ({"soft_weight": -1.0}, r"--soft-weight must be a finite number >= 0"),
    ({"epochs": 0}, r"--epochs must be an integer >= 1"),
    ({"soft_weight": 0.0, "hard_weight": 0.0}, "are all 0: the student would learn nothing"),
    ({"hint_weight": 1.0, "hint_layers": [("a", "t"), ("b", "t")]},
     "the teacher layer 't' is named twice"),
])
def test_config_check(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change).check(distilling=True)


def test_every_kd_loss_argument_is_explicit(splits, teacher_path, monkeypatch):
    """A change of pykd.KDLoss's defaults must not change what a run trains."""
    import inspect

    calls = []

    class Recording(train.KDLoss):
        def __init__(self, *args, **kwargs):
            calls.append((args, kwargs))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train, "KDLoss", Recording)
    teacher = train.load_model(teacher_path)[0]
    fit(student(), splits, config(epochs=1), teacher=teacher)
    parameters = set(inspect.signature(pykd.KDLoss).parameters)
    assert calls and calls[0][0] == () and set(calls[0][1]) == parameters


def test_check_out(tmp_path):
    files = train.run_files(tmp_path, "net")
    assert train.check_out(tmp_path, "net") is None
    assert train.check_out(tmp_path, "net", resume=True) is None
    (tmp_path / "net.json").write_text("{}")
    with pytest.raises(train.CheckpointError, match="net.json holds the results of an earlier"):
        train.check_out(tmp_path, "net")
    with pytest.raises(train.CheckpointError, match="its checkpoint .*net.pt is gone"):
        train.check_out(tmp_path, "net", resume=True)
    for name in ("checkpoint", "partial"):
        open(files[name], "w").close()
    with pytest.raises(train.CheckpointError, match="net.partial.pt holds a stopped run"):
        train.check_out(tmp_path, "net")
    assert train.check_out(tmp_path, "net", resume=True) == files["partial"]
    assert train.check_out(tmp_path, "net", overwrite=True) is None
    with pytest.raises(train.CheckpointError, match="contradict"):
        train.check_out(tmp_path, "net", resume=True, overwrite=True)


def test_check_classes():
    train.check_classes("x", ["a", "b"], "folder:d", ["a", "b"])
    with pytest.raises(train.CheckpointError, match="trained on 2 classes but --dataset d has 3"):
        train.check_classes("x", ["a", "b"], "d", ["a", "b", "c"])
    with pytest.raises(train.CheckpointError, match="class 1 is 'b' there but 'c' here"):
        train.check_classes("x", ["a", "b"], "d", ["a", "c"])


def test_distillation_learns_from_the_teacher_alone(splits, teacher_path):
    teacher, _ = train.load_model(teacher_path)
    teacher_acc = train.evaluate(teacher, splits.test_x, splits.test_y, 10)["accuracy"]
    assert teacher_acc > 0.7
    # No labels at all (hard_weight 0): whatever the student learns comes through kd_loss.
    result = fit(student(3), splits, config(epochs=4, soft_weight=1.0, hard_weight=0.0,
                                            temperature=2.0), teacher=teacher)
    assert result["test"]["accuracy"] > 0.6
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_nuclear_norm_penalty_shrinks_the_first_layer(splits):
    def nuclear(model):
        return torch.linalg.matrix_norm(model.features[0].weight.flatten(1), ord="nuc").item()

    plain, penalised = student(), student()
    fit(plain, splits, config(epochs=2))
    fit(penalised, splits, config(epochs=2, nuclear_weight=0.5))
    assert nuclear(penalised) < 0.93 * nuclear(plain)


def test_bf16_autocast(splits):
    result = fit(student(), splits, config(epochs=1, bf16=True))
    assert torch.isfinite(torch.tensor(result["history"][0]["train_loss"]))
    assert result["val"]["accuracy"] > 0.2


@pytest.mark.skipif(not hasattr(pykd, "hint_loss"),
                    reason="needs pykd.hint_loss, HintRegressor and FeatureCapture (hint branch)")
def test_feature_hints(splits, teacher_path, tmp_path):
    teacher, _ = train.load_model(teacher_path)
    path = str(tmp_path / "hinted.pt")
    model = models.build_model("keras-student")
    result = fit(model, splits, config(epochs=1, hint_weight=1.0), teacher=teacher,
                 checkpoint=path, meta={"model": "keras-student"})
    regressors = train.load_checkpoint(path)["regressors"]
    # keras-student's trunk gives 256 channels and the teacher's 16: a 1x1 conv 256 -> 16.
    weights = [v for k, v in regressors.items() if k.endswith("weight")]
    assert weights and weights[0].shape[:2] == (16, 256)
    assert result["history"][0]["train_loss"] > 0
    assert not [m for m in model.modules() if m._forward_hooks]  # captures removed


def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 5, (200,), generator=generator)
    predicted = torch.where(torch.rand(200, generator=generator) < 0.6, truth,
                            torch.randint(0, 4, (200,), generator=generator))  # 4: never predicted
    confusion = torch.bincount(truth * 5 + predicted, minlength=25).view(5, 5)
    ours = report.metrics_from_confusion(confusion)
    p, r, f, _ = precision_recall_fscore_support(truth, predicted, average="macro",
                                                 zero_division=0)
    assert ours["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f))


def test_model_cost():
    model = models.build_model("keras-student")
    cost = report.model_cost(model, torch.zeros(2, 3, 32, 32))
    # conv 16*16*64*27 + conv 8*8*256*(64*9) + dense 16384*10
    assert cost["macs"] == 442_368 + 9_437_184 + 163_840
    assert cost["parameters"] == 313_354 and cost["size_bytes"] == 313_354 * 4
    latency = report.latency_ms(model, torch.zeros(1, 3, 32, 32), repeats=5, warmup=1, threads=1)
    assert latency["ms"] > 0 and latency["threads"] == 1 and latency["repeats"] == 5
    assert torch.get_num_threads() >= 1 and model.training  # settings restored


def test_write_files_together(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "a.json")
    report.write_files([(a, lambda f: f.write(b"old"), True), (b, lambda f: f.write("old"), False)])

    def crash(f):
        f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        report.write_files([(a, lambda f: f.write(b"new"), True), (b, crash, False)])
    assert open(a, "rb").read() == b"old" and open(b).read() == "old"
    os.mkdir(tmp_path / "c.json")
    with pytest.raises(IsADirectoryError):
        report.write_files([(a, lambda f: f.write(b"new"), True),
                            (str(tmp_path / "c.json"), lambda f: f.write("x"), False)])
    assert open(a, "rb").read() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.pt", "c.json"]  # no temporary file


def test_curves_figure_plots_the_mean_over_seeds():
    def history(values, kd=None):
        return [{"epoch": e + 1, "train_cross_entropy": v, "val_accuracy": v / 10,
                 **({"train_kd": kd} if kd is not None else {})} for e, v in enumerate(values)]

    figure = report.curves_figure({
        "teacher": [history([3.0, 2.0, 1.0])],
        "distilled": [history([4.0, 2.0, 1.0], kd=0.5), history([2.0, 2.0, 3.0], kd=1.5)],
    })
    ce_ax, kd_ax, acc_ax = figure.axes[:3]
    # Losses of different objectives on different, labelled axes.
    assert ce_ax.get_ylabel() == "cross-entropy" and kd_ax.get_ylabel().startswith("T²")
    assert acc_ax.get_ylabel() == "accuracy"
    teacher, distilled = ce_ax.get_lines()
    assert list(distilled.get_ydata()) == [3.0, 2.0, 2.0]  # the mean of the two seeds
    assert "mean ± std of 2 seeds" in distilled.get_label()
    assert len(ce_ax.collections) == 1  # one band: only the group with several seeds has one
    assert [line.get_label() for line in kd_ax.get_lines()] == [distilled.get_label()]
    figure.canvas.draw()
    low, high = ce_ax.get_xlim()
    ticks = [t for t in ce_ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_comparison_table_has_no_latency():
    row = {"accuracy": 0.9, "f1": 0.8, "precision": 0.7, "recall": 0.6}
    table = report.comparison_table([("student", [row, {**row, "accuracy": 0.8}],
                                      {"parameters": 10, "size_bytes": 2048, "macs": 3e6})])
    assert "| student | 0.8500 ± 0.0707 | 0.8000 ± 0.0000 |" in table
    assert "ms" not in table


def test_a_diverged_run_stops(splits, tmp_path):
    class Diverging(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            return self.linear(x.flatten(1)) * float("nan")

    path = str(tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="the training loss became nan in epoch 1: the run "
                       "diverged .*nothing was saved"):
        fit(Diverging(), splits, config(epochs=2), checkpoint=path)
    assert not os.path.exists(path)


def test_tensorboard_missing_is_one_error(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
        train.EpochLog("net", tensorboard_dir=str(tmp_path))


def test_peer_loss_is_each_students_kd_loss_towards_its_detached_peers():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (6,))
    T, soft, hard = 2.0, 0.7, 0.4
    kd = pykd.KDLoss(temperature=T, soft_weight=soft, hard_weight=hard)
    losses = train.peer_loss(kd, logits, labels)
    log_p = (logits.detach() / T).log_softmax(-1)
    for k in range(3):
        kl = [(log_p[l].exp() * (log_p[l] - (logits[k] / T).log_softmax(-1))).sum(-1).mean()
              for l in range(3) if l != k]
        expected = hard * torch.nn.functional.cross_entropy(logits[k], labels) \
            + soft * T ** 2 * sum(kl) / 2
        torch.testing.assert_close(losses[k], expected)
        # The peers are targets only: student k's loss moves student k alone.
        with pykd.ops.functional_backward():  # one backward per student through one graph
            (grad,) = torch.autograd.grad(losses[k], logits, retain_graph=True)
        assert grad[k].abs().sum() > 0
        assert all(torch.all(grad[l] == 0) for l in range(3) if l != k)


def test_cohort_needs_two_students_and_no_teacher(splits, teacher_path):
    with pytest.raises(ValueError, match="at least 2 students"):
        train.Cohort([student()])
    with pytest.raises(ValueError, match="no teacher, logit, hint or nuclear-norm term"):
        fit(cohort(), splits, config(epochs=1), teacher=train.load_model(teacher_path)[0])


def test_teacher_ensemble_feeds_each_teacher_its_own_inputs(splits, teacher_path):
    """Each teacher of an ensemble sees the images normalised with its own training statistics,
    whatever normalisation the student's inputs have."""
    teacher, state = train.load_model(teacher_path)
    teacher.eval()  # no dropout
    own = state["data"]
    other = load_dataset("digits", train_fraction=0.5)  # other statistics
    assert other.mean != own["mean"]
    ensemble = train.TeacherEnsemble([teacher, teacher], other.mean, other.std,
                                     [(own["mean"], own["std"]), (other.mean, other.std)])
    own_inputs = load_dataset("digits", train_fraction=0.5, mean=own["mean"], std=own["std"])
    with torch.no_grad():
        logits = ensemble(other.test_x[:64])
        torch.testing.assert_close(logits[0], teacher(own_inputs.test_x[:64]))
        torch.testing.assert_close(logits[1], teacher(other.test_x[:64]))
    with pytest.raises(ValueError, match="at least 2 teachers"):
        train.TeacherEnsemble([teacher], own["mean"], own["std"], [(own["mean"], own["std"])])


def test_several_teachers_use_the_multi_teacher_loss(splits, teacher_path, monkeypatch):
    """The ensemble's loss is hard_weight * CE + soft_weight * multi_teacher_kd_loss with the
    weights in the teachers' order; with weights 1, 0 the run learns as from the first teacher
    alone; the settings that need one teacher are refused."""
    teacher, state = train.load_model(teacher_path)
    stats = [(state["data"]["mean"], state["data"]["std"])] * 2
    calls = []
    multi = pykd.multi_teacher_kd_loss

    def spy(student_logits, teacher_logits, weights, temperature, *args, **kwargs):
        calls.append((tuple(teacher_logits.shape), weights, temperature))
        return multi(student_logits, teacher_logits, weights, temperature, *args, **kwargs)

    monkeypatch.setattr(pykd, "multi_teacher_kd_loss", spy)
    other = train.load_model(teacher_path)[0]
    torch.manual_seed(0)
    for p in other.parameters():  # a second teacher that disagrees with the first
        p.data = torch.randn_like(p)
    ensemble = train.TeacherEnsemble([teacher, other], state["data"]["mean"],
                                     state["data"]["std"], stats)
    settings = dict(epochs=2, temperature=2.0, teacher_weights=[1.0, 0.0])
    both = fit(student(), splits, config(**settings), teacher=ensemble)
    alone = fit(student(), splits, config(epochs=2, temperature=2.0), teacher=teacher)
    assert calls and all(c[0][:1] == (2,) and c[1] == [1.0, 0.0] and c[2] == 2.0 for c in calls)
    for a, b in zip(both["history"], alone["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["train_kd"] == pytest.approx(b["train_kd"], rel=1e-4)
    assert both["test"]["accuracy"] == pytest.approx(alone["test"]["accuracy"], abs=0.02)

    for change, message in (({"hint_weight": 1.0}, "--hint-weight need a single --teacher"),
                            ({"teacher_weights": [1.0]}, "1 weight\\(s\\) for 2 teacher")):
        with pytest.raises(ValueError, match=message):
            fit(student(), splits, config(**{**settings, **change}), teacher=ensemble)
    with pytest.raises(ValueError, match="1 weight\\(s\\) for 1 teacher"):
        fit(student(), splits, config(teacher_weights=[1.0]), teacher=teacher)
    with pytest.raises(ValueError, match="--teacher-weights must be finite numbers >= 0"):
        config(teacher_weights=[0.0, 0.0]).check(True)
