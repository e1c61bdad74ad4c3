"""Activation matching (Re-Basin + REPAIR) and PLeaS through `dvc repro` on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_alignment_pipeline import tiny_params

from medmerge.testing import copy_repo, init_and_repro, stage_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

METHODS = {"rebasin_repair": {"method": "average", "align": "activation_matching", "repair": True},
           "pleas": {"method": "pleas", "options": {"images": 24}}}


def test_repro_runs_activation_matching_and_pleas(tmp_path: Path) -> None:
    from medmerge.merge.alignment import alignment_skeleton, load_permutations
    from medmerge.models import create_model, load_model_dir

    params = tiny_params("test_resnet", 32)
    params["methods"] = METHODS
    root = copy_repo(tmp_path, params)
    init_and_repro(root, stage_env(), "activation matching and pleas")
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    _, spec = alignment_skeleton("test_resnet")
    permutations = load_permutations(root / "models/merge/rebasin_repair/seed_0/permutations.safetensors")
    assert set(permutations) == {"scratch"} and set(permutations["scratch"]) == set(spec.spaces)
    info = json.loads((root / "models/merge/rebasin_repair/seed_0/merge.json").read_text())
    assert info["align"] == "activation_matching" and "correlation_after" in info["alignment"]["scratch"]
    pleas = json.loads((root / "models/merge/pleas/seed_0/merge.json").read_text())
    assert pleas["pleas"]["error_mean"] < pleas["pleas"]["start_error_mean"]
    for method in METHODS:
        state, card = load_model_dir(root / "models/merged" / method / "seed_0")
        create_model(card["arch"], num_classes=card["num_classes"]).load_state_dict(state, strict=True)
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
        assert 0.0 <= metrics[method]["f1_macro"] <= 1.0
