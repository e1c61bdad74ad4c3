"""The real medical example (examples/pneumoniamnist): its data is the file its README names, its params
are the default params.yaml's but for data, sources and methods, and its source task shares no training
image with its target."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from medmerge.config import load_params

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pneumoniamnist"


def test_the_shipped_file_is_the_one_its_readme_names() -> None:
    digest = hashlib.sha256((EXAMPLE / "pneumoniamnist.npz").read_bytes()).hexdigest()
    [named] = re.findall(r"sha256\s+([0-9a-f]{64})\s+pneumoniamnist\.npz", (EXAMPLE / "README.md").read_text())
    assert digest == named
    assert "CC BY 4.0" in (EXAMPLE / "README.md").read_text()


def test_example_params_are_the_defaults_but_for_data_sources_and_methods() -> None:
    example = yaml.safe_load((EXAMPLE / "params.yaml").read_text())
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(example) == set(default)
    # and the CPU kernels and depthwise gradients its committed run used (recorded in its run.json)
    recorded = json.loads((EXAMPLE / "reports/run.json").read_text())
    assert example["device"] == {**default["device"], "cpu_kernels": recorded["cpu_kernels"],
                                 "cpu_depthwise_grad": recorded["cpu_depthwise_grad"]}
    assert {key for key in default if key != "device" and example[key] != default[key]} == {"data", "sources",
                                                                                             "methods"}
    params = load_params(EXAMPLE / "params.yaml")
    target = params.data.datasets[params.data.target]
    assert any(task in params.data.datasets and params.data.datasets[task].train_subset == "rest"
               for task in (source.task for source in params.sources.values()))
    assert set(params.methods) >= set(yaml.safe_load((REPO / "configs/methods/all_methods.yaml").read_text())["methods"])
    assert target.train_subset == "kept" and target.train_fraction is not None


@pytest.mark.slow  # prepares 3,882 + 2 x 1,148 images
def test_the_source_task_and_the_target_share_no_training_image(tmp_path: Path) -> None:
    from medmerge.data.prepare import load_split, open_raw_dataset, prepare_dataset

    params = load_params(EXAMPLE / "params.yaml")
    raw = open_raw_dataset(EXAMPLE / "pneumoniamnist.npz", num_classes=2)
    rows = {}
    for name, dataset in params.data.datasets.items():
        meta = prepare_dataset(raw, params.data.image_size, tmp_path / name, class_names=dataset.classes,
                               train_fraction=dataset.train_fraction, subsample_seed=dataset.subsample_seed,
                               train_subset=dataset.train_subset)
        assert meta["train_subsample"]["subset"] == dataset.train_subset
        images, _ = load_split(tmp_path / name, "train")
        rows[name] = Counter(image[..., 0].tobytes() for image in images)  # gray, copied to 3 channels
    # every training image of the file is in exactly one of them (the file repeats some images: counted)
    assert rows[params.data.target] + rows["pneumonia_rest"] == Counter(i.tobytes() for i in raw.images["train"])
    target = rows[params.data.target].total()
    assert target == 312 and np.isclose(target / 3882, 0.08, atol=0.001)
