"""Aligned merges of a DenseNet-121 and of a ViT (also with one coefficient per attention head) through
`dvc repro`, on tiny synthetic data.

Written against the pipeline's outputs (models/merge/<method>/seed_<n>/, models/merged/<method>/seed_<n>/,
reports/metrics.json), not against stage names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medmerge.testing import REPO, copy_repo, init_and_repro, stage_env

pytestmark = pytest.mark.integration

METHODS = {
    "aligned": {"method": "medmerge", "align": "weight_matching"},
    "aligned_average_repair": {"method": "average", "align": "weight_matching", "repair": True},
}
#: transformers only: the learned merge with one coefficient per attention head
HEAD_METHODS = {"aligned_heads": {"method": "medmerge", "align": "weight_matching", "granularity": "head"}}


def methods_for(arch: str) -> dict:
    return {**METHODS, **(HEAD_METHODS if "vit" in arch else {})}


def tiny_params(arch: str, image_size: int) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["image_size"] = image_size
    for dataset in params["data"]["datasets"].values():
        dataset["options"].update(n_train=24, n_val=12, n_test=12, image_size=image_size)
    for seed, source in enumerate(params["sources"].values()):  # two independent random initialisations
        source.update(arch=arch, origin="random", options={"seed": seed})
    for section in ("pretrain", "finetune"):
        params[section].update(epochs=1, batch_size=12)
    params["merge"].update(epochs=1, batch_size=12, finetune_epochs=1)
    params["methods"] = methods_for(arch)
    params["seeds"] = [0]
    params["baselines"] = ["ft"]
    params["evaluate"]["batch_size"] = 32
    return params


def check_aligned_outputs(root: Path, arch: str) -> None:
    from medmerge.merge.alignment import alignment_skeleton, load_permutations
    from medmerge.models import create_model, load_model_dir

    _, spec = alignment_skeleton(arch)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    methods = methods_for(arch)
    for method in methods:
        permutations = load_permutations(root / "models/merge" / method / "seed_0" / "permutations.safetensors")
        assert set(permutations) == {"scratch"}  # the non-anchor source, mapped onto the anchor
        assert set(permutations["scratch"]) == set(spec.spaces)
        state, card = load_model_dir(root / "models/merged" / method / "seed_0")
        model = create_model(card["arch"], num_classes=card["num_classes"])
        model.load_state_dict(state, strict=True)
        assert card["align"] == "weight_matching" and card["repaired"] == methods[method].get("repair", False)
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
        assert 0.0 <= metrics[method]["f1_macro"] <= 1.0
    for method in set(methods) - set(METHODS):  # granularity head: one coefficient group per attention block
        coefficients = load_file(root / "models/merge" / method / "seed_0" / "coefficients.safetensors")
        heads = [key for key in coefficients if key.endswith(".heads")]
        assert len(heads) == len([m for m in create_model(arch, num_classes=2).modules() if hasattr(m, "num_heads")]) > 0


@pytest.mark.parametrize(("arch", "image_size"), [("densenet121", 32), ("test_vit", 32)])
def test_repro_aligns_and_merges(tmp_path: Path, arch: str, image_size: int) -> None:
    root = copy_repo(tmp_path, tiny_params(arch, image_size))
    init_and_repro(root, stage_env(), f"aligned {arch}")
    check_aligned_outputs(root, arch)
