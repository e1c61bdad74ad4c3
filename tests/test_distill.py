"""``distill``: a student trained to match the FT ensemble (medmerge/methods/distill.py)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medmerge.config import ConfigError, MergeSettings, TrainSettings, parse_params
from medmerge.data.loader import ArrayBatches
from medmerge.data.target import TargetData
from medmerge.device import Runtime
from medmerge.merge.distillation import EnsembleTeacher, agreement
from medmerge.methods import MERGE_METHODS, MergeInputs, get_method, run_merge_method
from medmerge.models import create_model
from medmerge.train import make_transform, predict_logits, train_classifier

REPO = Path(__file__).resolve().parents[1]
ARCH = "test_resnet"
CPU = Runtime(torch.device("cpu"))
NAMES = ["a", "b", "c"]
K = 4


def ambiguous_task(seed: int = 0, n: int = 64) -> TargetData:
    """Brightness encodes the class, blurred by a random offset per image: the classes overlap, so models
    trained from different starts disagree on some images (and with their ensemble)."""
    rng = np.random.default_rng(seed)

    def split(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(count) % K
        centre = 60 + 40 * labels + rng.normal(0, 25, count)
        images = rng.normal(centre[:, None, None, None], 30, (count, 32, 32, 3))
        return np.clip(images, 0, 255).astype(np.uint8), labels

    train, val = split(n), split(32)
    return TargetData(ArrayBatches(*train, batch_size=16, shuffle=True, seed=0, drop_last=True),
                      ArrayBatches(*val, batch_size=64), ArrayBatches(*val, batch_size=64),
                      [f"c{i}" for i in range(K)])


def sources(count: int = 3) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in range(count):
        torch.manual_seed(10 + seed)
        states.append(create_model(ARCH, num_classes=5).state_dict())
    return states


def fine_tuned(states, data: TargetData) -> list[torch.nn.Module]:
    """The FT baselines: each source fine-tuned on the target."""
    recipe = TrainSettings(epochs=6, lr=1e-2, batch_size=16)
    return [train_classifier(ARCH, state, data, recipe, CPU, seed=i)[0] for i, state in enumerate(states)]


def distill_inputs(states, data, teachers, names=NAMES, **options) -> MergeInputs:
    settings = MergeSettings(method="distill", anchor=names[0], batch_size=16, epochs=1, options=options)
    return MergeInputs(ARCH, states, names, data, settings, CPU, seed=0,
                       teachers=None if teachers is None else [t.state_dict() for t in teachers])


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_distilled_student_agrees_with_the_ensemble_more_than_any_ft_baseline(one_thread) -> None:
    """On the training images, the student matches the ensemble's predictions more often than each of its
    members does; a student trained on the labels alone (hard_label_weight 1) does not."""
    data, states = ambiguous_task(), sources()
    teachers = fine_tuned(states, data)
    ensemble, transform = EnsembleTeacher(teachers), make_transform(ARCH, CPU)
    train = data.train.in_order(64)
    members = [agreement(teacher, ensemble, train, transform) for teacher in teachers]
    assert max(members) < 1.0  # the members disagree with their ensemble somewhere
    # the best epoch is the one that agrees best with the ensemble on the training images, for both students
    labelled = ArrayBatches(data.train.images, predict_logits(ensemble, train, transform)[0].argmax(axis=1),
                            batch_size=64)
    data = replace(data, val=labelled)
    options = {"distill_epochs": 20, "distill_lr": 1e-2, "temperature": 2.0}
    student = run_merge_method(distill_inputs(states, data, teachers, hard_label_weight=0.0, **options))
    labels_only = run_merge_method(distill_inputs(states, data, teachers, hard_label_weight=1.0, **options))
    assert student.merge is None and student.details["student_init"] == "source"
    assert student.details["teacher_agreement_train"] == agreement(student.model, ensemble, train, transform)
    assert student.details["teacher_agreement_train"] > max(members), members
    assert labels_only.details["teacher_agreement_train"] <= max(members), members


def test_the_teacher_averages_logits_as_the_reports_ensemble_does() -> None:
    data = ambiguous_task(n=16)
    torch.manual_seed(0)
    models = [create_model(ARCH, num_classes=K).eval() for _ in range(2)]
    transform, batches = make_transform(ARCH, CPU), data.train.in_order(16)
    logits = [predict_logits(m, batches, transform)[0] for m in models]
    ensemble = predict_logits(EnsembleTeacher(models), batches, transform)[0]
    np.testing.assert_allclose(ensemble, np.mean(logits, axis=0), rtol=1e-5, atol=1e-6)
    teacher = EnsembleTeacher(models)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_student_can_start_from_another_merge_of_the_sources(one_thread) -> None:
    data = ambiguous_task(n=32)
    states = sources(2)
    teachers = [create_model(ARCH, num_classes=K) for _ in range(2)]
    result = run_merge_method(distill_inputs(states, data, teachers, names=["a", "b"], student_init="average",
                                             distill_epochs=1))
    assert result.details["student_init"] == "average" and 0.0 <= result.details["student_init_val_f1"] <= 1.0
    assert result.details["student_init_mean_coefficient"] == {"a": 0.5, "b": 0.5}
    assert result.model.get_classifier().out_features == K and result.details["best_epoch"] == 1


def test_distill_needs_its_teachers_and_names_one_that_does_not_fit() -> None:
    data, states = ambiguous_task(n=16), sources(2)
    with pytest.raises(ValueError, match="distill needs the FT baselines as teachers"):
        run_merge_method(distill_inputs(states, data, None, names=["a", "b"]))
    wrong = [create_model(ARCH, num_classes=K), create_model(ARCH, num_classes=K + 1)]
    with pytest.raises(ValueError, match=r"teacher 'b' does not fit test_resnet with 4 classes at layer fc\.weight"):
        run_merge_method(distill_inputs(states, data, wrong, names=["a", "b"]))


def test_only_distill_makes_the_stage_load_teachers() -> None:
    assert get_method("distill").needs_teachers
    assert not any(get_method(name).needs_teachers for name in ("average", "interpolate", "medmerge"))


def raw_params() -> dict:
    with (REPO / "params.yaml").open() as handle:
        return yaml.safe_load(handle)


def test_the_distillation_budget_defaults_to_the_baselines_fine_tune() -> None:
    raw = raw_params()
    own = get_method("distill").settings()
    assert own.distill_epochs == raw["finetune"]["epochs"] and own.distill_lr == raw["finetune"]["lr"]


def with_distill(entry: dict | None = None, **top) -> dict:
    raw = copy.deepcopy(raw_params())
    raw["methods"]["distill"] = entry or {"method": "distill"}
    raw.update(top)
    return raw


def test_the_config_takes_distill_and_refuses_it_without_the_ft_baselines() -> None:
    params = parse_params(with_distill())
    assert params.method("distill").method == "distill"
    assert get_method("distill").describe(params.method("distill")) == "distill (from anchor source, T=4, alpha=0.1)"
    with pytest.raises(ConfigError, match=r"methods\.distill: method 'distill' learns from the FT baselines: "
                                          r"baselines must include ft, got \['lpft'\]"):
        parse_params(with_distill(baselines=["lpft"]))


@pytest.mark.parametrize(("options", "message"), [
    ({"student_init": "mystery"}, r"methods\.distill\.options\.student_init: .*'mystery' is neither 'source'"),
    ({"student_init": "distill"}, r"options\.student_init: .*'distill' is neither"),
    ({"temperature": 0}, r"methods\.distill\.options\.temperature: Input should be greater than 0"),
    ({"hard_label_weight": 1.5}, r"options\.hard_label_weight: Input should be less than or equal to 1"),
    ({"epochs": 3}, r"options\.epochs: unknown key \(method 'distill' takes \['distill_epochs'"),
])
def test_bad_distill_settings_are_named_when_params_load(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_params(with_distill({"method": "distill", "options": options}))


def test_a_starting_merge_that_cannot_run_is_refused_when_params_load() -> None:
    raw = with_distill({"method": "distill", "options": {"student_init": "interpolate"}})
    raw["sources"]["third"] = copy.deepcopy(raw["sources"]["scratch"])
    raw["methods"] = {"distill": raw["methods"]["distill"]}
    with pytest.raises(ConfigError, match=r"methods\.distill: method 'distill' student_init 'interpolate' "
                                          r"needs exactly two sources"):
        parse_params(raw)


def test_the_ready_snippet_of_methods_loads_with_params() -> None:
    raw = raw_params()
    snippet = yaml.safe_load((REPO / "configs" / "methods" / "all_methods.yaml").read_text())["methods"]
    params = parse_params({**raw, "methods": {**raw["methods"], **snippet}})
    assert params.method("distill").method == "distill" and set(snippet) <= set(params.methods)
    assert {params.method(name).method for name in snippet} <= set(MERGE_METHODS)
