"""The field's merges through `dvc repro` of a tiny pipeline, on a ResNet and on a non-ResNet backbone:
activation matching (Re-Basin + REPAIR), PLeaS, ZipIt! and distillation from the FT ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_alignment_pipeline import tiny_params

from medmerge.testing import copy_repo, init_and_repro, stage_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

METHODS = {"rebasin_repair": {"method": "average", "align": "activation_matching", "repair": True},
           "pleas": {"method": "pleas", "options": {"images": 24}},
           "zipit": {"method": "zipit", "options": {"images": 24}},
           "distill": {"method": "distill", "options": {"distill_epochs": 1}}}


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])
def test_repro_runs_each_competitor_of_medmerge(tmp_path: Path, arch: str) -> None:
    from medmerge.merge.alignment import alignment_skeleton, load_permutations
    from medmerge.models import create_model, load_model_dir

    params = tiny_params(arch, 32)
    params["methods"] = METHODS
    root = copy_repo(tmp_path, params)
    init_and_repro(root, stage_env(), f"the competitors on {arch}")
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    report = (root / "reports" / "comparison.md").read_text()

    _, spec = alignment_skeleton(arch)
    permutations = load_permutations(root / "models/merge/rebasin_repair/seed_0/permutations.safetensors")
    assert set(permutations) == {"scratch"} and set(permutations["scratch"]) == set(spec.spaces)
    info = json.loads((root / "models/merge/rebasin_repair/seed_0/merge.json").read_text())
    assert info["align"] == "activation_matching" and "correlation_after" in info["alignment"]["scratch"]
    pleas = json.loads((root / "models/merge/pleas/seed_0/merge.json").read_text())
    assert pleas["pleas"]["error_mean"] < pleas["pleas"]["start_error_mean"]
    zipit = json.loads((root / "models/merge/zipit/seed_0/merge.json").read_text())
    assert zipit["zipit"]["seconds"] > 0
    distill = json.loads((root / "models/merge/distill/seed_0/merge.json").read_text())
    assert 0.0 <= distill["teacher_agreement_train"] <= 1.0 and distill["student_init"] == "source"

    for method in METHODS:  # one ordinary timm model, then the baselines' fine-tune, both in the report
        for stage in ("merged", "merged_ft"):
            state, card = load_model_dir(root / "models" / stage / method / "seed_0")
            create_model(card["arch"], num_classes=card["num_classes"]).load_state_dict(state, strict=True)
            assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
        for row in (method, f"{method}_collapsed"):
            assert 0.0 <= metrics[row]["f1_macro"] <= 1.0
            assert f"| {row} |" in report
