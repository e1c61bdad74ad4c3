"""Across machines with DVC's own tools: a DVC remote and a bare git remote carry the pipeline's results and
its experiments to a second clone, which then has nothing to reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_pipeline import tiny_params

from medmerge.testing import copy_repo, init_and_repro, run, stage_env

pytestmark = pytest.mark.integration


def tiniest_params() -> dict:
    """Twelve stages: one dataset (the target, also both sources' task, 16 training images), one seed, the FT
    baselines (the report's reference), one merge (average: nothing to learn but a probe), one epoch."""
    params = tiny_params()
    target = params["data"]["target"]
    params["data"]["datasets"] = {target: params["data"]["datasets"][target]}
    params["data"]["datasets"][target]["options"].update(n_train=16, n_val=8, n_test=8)
    for source in params["sources"].values():
        source["task"] = target
    params["merge"].update(finetune_epochs=0)
    params.update(seeds=[0], baselines=["ft"], methods={"average": {"method": "average"}})
    return params


def test_push_pull_and_experiments_through_local_remotes(tmp_path: Path) -> None:
    env = stage_env()
    (tmp_path / "first").mkdir()
    first = copy_repo(tmp_path / "first", tiniest_params())
    init_and_repro(first, env, "tiniest pipeline")
    storage, origin = tmp_path / "dvc-storage", tmp_path / "origin.git"
    run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path, env)
    run(["dvc", "remote", "add", "-d", "storage", str(storage)], first, env)
    run(["git", "add", "-A"], first, env)
    run(["git", "commit", "-qm", "results and the team's DVC remote"], first, env)
    run(["git", "remote", "add", "origin", str(origin)], first, env)
    run(["git", "push", "-q", "origin", "main"], first, env)
    run(["dvc", "push"], first, env)

    second = tmp_path / "second"
    run(["git", "clone", "-q", str(origin), str(second)], tmp_path, env)
    run(["dvc", "pull"], second, env)
    status = run(["dvc", "status"], second, env).stdout
    assert "up to date" in status, status  # the pulled outputs match dvc.lock: nothing to reproduce
    model = second / "models/merged_ft/average/seed_0"
    assert (model / "model.safetensors").read_bytes() == (first / model.relative_to(second) / "model.safetensors").read_bytes()

    run(["dvc", "exp", "run", "-n", "one-more-epoch", "-S", "merge.finetune_epochs=1"], first, env)
    run(["dvc", "exp", "push", "origin", "one-more-epoch"], first, env)  # the experiment's git ref and its cache
    run(["dvc", "exp", "pull", "origin", "one-more-epoch"], second, env)
    shown = json.dumps(json.loads(run(["dvc", "exp", "show", "--json"], second, env).stdout))
    assert "one-more-epoch" in shown
    run(["dvc", "exp", "apply", "one-more-epoch"], second, env)
    status = run(["dvc", "status"], second, env).stdout
    assert "up to date" in status, status  # the experiment's outputs came with it
    assert json.loads((second / "reports/metrics.json").read_text()) == json.loads(
        (first / "reports/metrics.json").read_text())  # the first clone's workspace holds the same experiment
