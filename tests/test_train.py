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
    fit(student(5), splits, config(epochs=4), checkpoint=path,
        meta={"model": "tutorial-student", "model_args": {"num_classes": 10}})
    return path


class Stop(Exception):
    pass


def stop_after(epoch):
    def callback(record):
        if record["epoch"] == epoch:
            raise Stop

    return callback


@pytest.mark.parametrize("distil", [False, True], ids=["train", "distill"])
def test_resume_is_bit_identical(splits, teacher_path, tmp_path, distil):
    kwargs = {}
    if distil:
        kwargs["teacher"] = train.load_model(teacher_path)[0]
    cfg = config(logit_weight=0.1 if distil else 0.0, nuclear_weight=1e-3)
    meta = {"model": "tutorial-student"}
    whole = student()
    fit(whole, splits, cfg, checkpoint=str(tmp_path / "whole.pt"), meta=meta, **kwargs)

    path = str(tmp_path / "split.pt")
    with pytest.raises(Stop):
        fit(student(), splits, cfg, checkpoint=path, meta=meta, on_epoch_end=stop_after(1),
            **kwargs)
    assert train.load_checkpoint(path)["epoch"] == 1
    torch.manual_seed(1234)  # the checkpoint, not the caller, must decide the RNG state
    resumed = student(seed=99)  # and its weights, not the fresh initialisation
    result = fit(resumed, splits, cfg, checkpoint=path, meta=meta, resume=True, **kwargs)

    assert [r["epoch"] for r in result["history"]] == [1, 2, 3]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    state = train.load_checkpoint(path)
    assert state["epoch"] == 3 and set(state) >= {"optimizer", "rng", "config", "state_dict"}


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
    assert train.load_checkpoint(path)["epoch"] == 1  # the last good one is intact
    assert os.listdir(tmp_path) == ["model.pt"]  # and no temporary file is left behind


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(train.CheckpointError, match="checkpoint not found"):
        train.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(train.CheckpointError, match="cannot read checkpoint"):
        train.load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(train.CheckpointError, match="not a pykd checkpoint"):
        train.load_checkpoint(str(tmp_path / "other.pt"))


def test_resume_refuses_another_model(splits, tmp_path):
    path = str(tmp_path / "net.pt")
    fit(student(), splits, config(epochs=1), checkpoint=path, meta={"model": "tutorial-student"})
    with pytest.raises(train.CheckpointError, match="holds model 'tutorial-student'"):
        fit(models.build_model("keras-student"), splits, config(epochs=2), checkpoint=path,
            meta={"model": "keras-student"}, resume=True)


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
    cost = report.model_cost(model, torch.randn(4, 3, 32, 32))
    # conv 16*16*64*27 + conv 8*8*256*(64*9) + dense 16384*10
    assert cost["macs"] == 442_368 + 9_437_184 + 163_840
    assert cost["parameters"] == 313_354 and cost["size_bytes"] == 313_354 * 4
    assert cost["inference_ms"] > 0
