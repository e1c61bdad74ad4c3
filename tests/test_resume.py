"""Resume checkpoints of the fit loop: an interrupted fit, rerun, ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medmerge.data.loader import ArrayBatches, DeviceTransform
from medmerge.device import resolve_runtime
from medmerge.resume import ResumeDir, fit_fingerprint
from medmerge.train import History, build_optimizer, fit

EPOCHS = 4


class Interrupted(Exception):
    """Stands in for a kill: nothing after it runs."""


def toy_data(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 3
    images = (rng.integers(0, 90, size=(n, 8, 8, 3)) + (labels * 80)[:, None, None, None]).astype(np.uint8)
    return images, labels


def make_fit(lr: float = 0.05, seed: int = 0, labels_edit: int | None = None) -> dict:
    """Everything one fit call takes, built from scratch the same way every time (as a rerun would)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    images, labels = toy_data()
    if labels_edit is not None:
        labels = labels.copy()
        labels[labels_edit] = (labels[labels_edit] + 1) % 3
    runtime = resolve_runtime("cpu", "none", "off")
    return {
        "model": model,
        "optimizer": build_optimizer("adamw", [{"params": list(model.parameters()), "lr": lr}], 1e-4),
        "train": ArrayBatches(images, labels, 8, shuffle=True, seed=seed, drop_last=True),
        "val": ArrayBatches(images, labels, 64),
        "transform": DeviceTransform([0.5] * 3, [0.5] * 3, runtime, seed=seed),
    }


def run_fit(parts: dict, resume: ResumeDir | None, on_epoch=None) -> History:
    return fit(parts["model"], parts["optimizer"], parts["train"], parts["val"], parts["transform"],
               epochs=EPOCHS, num_classes=3, augment=True, keep_best=True,
               class_weights=torch.tensor([1.0, 2.0, 1.0]), on_epoch=on_epoch, resume=resume)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("stop_after", [1, 3])
def test_an_interrupted_fit_resumes_and_ends_bit_identical(tmp_path: Path, stop_after: int) -> None:
    reference = make_fit()
    expected = run_fit(reference, resume=None)

    resume = ResumeDir(tmp_path / "resume")

    def stop(result) -> None:
        if result.epoch == stop_after + 1:  # the checkpoint of epoch `stop_after` is on disk, not this one's
            raise Interrupted

    with pytest.raises(Interrupted):
        run_fit(make_fit(), resume, on_epoch=stop)
    assert len(list(resume.path.glob("fit-*.pt"))) == 1

    rerun, seen, steps = make_fit(), [], []
    rerun["model"].register_forward_hook(lambda module, args, out: steps.append(1) if module.training else None)
    resumed = run_fit(rerun, resume, on_epoch=seen.append)

    assert [e.epoch for e in seen] == list(range(1, EPOCHS + 1))  # saved epochs are reported again
    assert len(steps) == (EPOCHS - stop_after) * len(reference["train"])  # only the missing epochs trained
    assert resumed.epochs == expected.epochs and resumed.best_epoch == expected.best_epoch
    assert_same_state(rerun["model"].state_dict(), reference["model"].state_dict())
    for ours, theirs in zip(rerun["optimizer"].state.values(), reference["optimizer"].state.values(), strict=True):
        assert_same_state(ours, theirs)
    assert torch.equal(rerun["transform"].generator.get_state(), reference["transform"].generator.get_state())


def test_a_finished_fit_is_not_trained_again(tmp_path: Path) -> None:
    resume = ResumeDir(tmp_path / "resume")
    first = make_fit()
    history = run_fit(first, resume)
    again, steps = make_fit(), []
    again["model"].register_forward_hook(lambda module, args, out: steps.append(1) if module.training else None)
    assert run_fit(again, resume).epochs == history.epochs
    assert not steps
    assert_same_state(again["model"].state_dict(), first["model"].state_dict())


def fingerprint(parts: dict, epochs: int = EPOCHS) -> str:
    return fit_fingerprint(parts["model"], parts["optimizer"], (parts["train"], parts["val"]), parts["transform"],
                           {"epochs": epochs})


def test_the_fingerprint_changes_with_every_input() -> None:
    base = fingerprint(make_fit())
    assert fingerprint(make_fit()) == base
    changed = {
        "lr": fingerprint(make_fit(lr=0.01)),
        "seed (weights, shuffle, flips)": fingerprint(make_fit(seed=1)),
        "one label": fingerprint(make_fit(labels_edit=5)),
        "epochs": fingerprint(make_fit(), epochs=EPOCHS + 1),
    }
    parts = make_fit()
    parts["train"] = ArrayBatches(parts["train"].images, parts["train"].labels, 4, shuffle=True, drop_last=True)
    changed["batch size"] = fingerprint(parts)
    parts = make_fit()
    parts["model"][-1].weight.requires_grad_(False)
    changed["what trains"] = fingerprint(parts)
    assert all(value != base for value in changed.values()), changed
    assert len(set(changed.values())) == len(changed)


def test_an_unreadable_checkpoint_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reference = make_fit()
    run_fit(reference, resume=None)
    resume = ResumeDir(tmp_path / "resume")
    parts = make_fit()
    resume.path.mkdir()
    resume.file(fingerprint_of_run(parts)).write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="medmerge.resume"):
        run_fit(parts, resume)
    assert "ignoring unreadable resume checkpoint" in caplog.text
    assert_same_state(parts["model"].state_dict(), reference["model"].state_dict())


def fingerprint_of_run(parts: dict) -> str:
    """The fingerprint ``run_fit`` computes (fit adds its own settings to the hash)."""
    return fit_fingerprint(parts["model"], parts["optimizer"], (parts["train"], parts["val"]), parts["transform"], {
        "epochs": EPOCHS, "num_classes": 3, "augment": True, "keep_best": True, "class_weights": [1.0, 2.0, 1.0],
        "before_validation": False, "world_size": 1})


# ---------------------------------------------------------------- the stage glue (medmerge/stage/)


@pytest.fixture
def stage_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from medmerge import stage
    from medmerge.config import load_params

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return stage, load_params(Path(__file__).resolve().parents[1] / "params.yaml")


def test_a_stage_keeps_checkpoints_under_the_root_by_stage_and_params(stage_env, tmp_path, monkeypatch) -> None:
    stage, params = stage_env
    monkeypatch.setenv("DVC_STAGE", "baseline@ft-imagenet")
    directory = stage.stage_resume(params).path
    assert directory.parent == tmp_path.resolve() / ".medmerge" / "resume"
    assert directory.name.startswith("baseline@ft-imagenet-")
    assert stage.stage_resume(params).path == directory
    other = params.model_copy(update={"seeds": [7]})
    assert stage.stage_resume(other).path != directory
    monkeypatch.delenv("DVC_STAGE")
    monkeypatch.setattr("sys.argv", ["/repo/stages/train.py", "ft", "imagenet", "--seed", "0"])
    assert stage.outputs.stage_identity() == "train_ft_imagenet_--seed_0"


def test_run_removes_checkpoints_only_when_the_stage_succeeds(stage_env) -> None:
    from medmerge.config import ConfigError

    stage, params = stage_env

    def failing() -> None:
        ResumeDir.save(stage.stage_resume(params), "f" * 64, {"epoch": 1})
        raise ConfigError("bad input")

    with pytest.raises(SystemExit) as stopped:
        stage.run(failing)
    assert stopped.value.code == 1
    [kept] = stage.stage_resume(params).path.glob("fit-*.pt")
    stage.run(lambda: stage.stage_resume(params))
    assert not kept.exists() and not kept.parent.exists()
