"""Which keys of ``merge`` each step of a merge reads (``step_settings``): what decides which DVC stages a
sweep reruns, so every key must belong to a step and a method's learning must not see another's keys."""

from __future__ import annotations

import pytest

from medmerge.config import MergeSettings
from medmerge.methods import MERGE_METHODS, STEPS, step_settings
from medmerge.methods.base import COLLAPSE_KEYS, FINETUNE_KEYS, LEARN_KEYS

ANCHOR = "imagenet"


def settings(**values) -> MergeSettings:
    return MergeSettings(anchor=ANCHOR, **values)


def own_keys(method: str) -> set[str]:
    model = MERGE_METHODS.get(method).settings
    return set(model.model_fields) if model.keys_in_merge else set()


def test_every_key_of_merge_belongs_to_a_step_or_a_method() -> None:
    """A key added to ``merge`` without saying which step reads it would be read by no stage's dependency."""
    declared = set(LEARN_KEYS) | set(COLLAPSE_KEYS) | set(FINETUNE_KEYS)
    declared |= {key for name in MERGE_METHODS for key in own_keys(name)}
    assert set(MergeSettings.model_fields) == declared


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_a_methods_learning_reads_its_own_keys_and_no_others(method: str) -> None:
    steps = step_settings(settings(method=method))
    assert list(steps) == list(STEPS)
    learn = set(steps["learn"])
    assert own_keys(method) <= learn and set(LEARN_KEYS) <= learn
    others = {key for name in MERGE_METHODS if name != method for key in own_keys(name)} - own_keys(method)
    assert not learn & others, learn & others
    assert "finetune_epochs" not in learn
    assert steps["finetune"] == {"finetune_epochs": 8}


def test_a_learning_rate_reaches_the_learned_merges_only() -> None:
    """``-S merge.lr``: medmerge's learn file changes; average's and interpolate's stay byte for byte."""
    for method, changes in (("medmerge", True), ("average", False), ("interpolate", False), ("pleas", False)):
        before, after = step_settings(settings(method=method)), step_settings(settings(method=method, lr=0.003))
        assert (before["learn"] != after["learn"]) is changes, method
        assert before["collapse"] == after["collapse"] and before["finetune"] == after["finetune"]


def test_the_finetune_epochs_reach_the_finetune_only() -> None:
    for method in MERGE_METHODS:
        before, after = step_settings(settings(method=method)), step_settings(settings(method=method, finetune_epochs=2))
        assert before["learn"] == after["learn"] and before["collapse"] == after["collapse"]
        assert after["finetune"] == {"finetune_epochs": 2}


def test_collapse_keys_reach_learning_only_where_the_method_collapses_while_learning() -> None:
    """BatchNorm recalibration is part of a fixed-weight merge's learning (its probe sees the collapsed model),
    not of MedMerge's, which learns on the sources' statistics."""
    assert step_settings(settings(method="medmerge"))["learn"].keys().isdisjoint(COLLAPSE_KEYS)
    assert set(COLLAPSE_KEYS) <= set(step_settings(settings(method="average"))["learn"])
    plain, off = (step_settings(settings(method="medmerge", bn_recalibration=flag)) for flag in (True, False))
    assert plain["learn"] == off["learn"] and plain["collapse"] != off["collapse"]


def test_a_distilled_student_started_from_a_merge_reads_that_merges_keys() -> None:
    from_source = step_settings(settings(method="distill"))["learn"]
    from_medmerge = step_settings(settings(method="distill", options={"student_init": "medmerge"}))["learn"]
    assert "lr" not in from_source and {"lr", "granularity", "epochs"} <= set(from_medmerge)
