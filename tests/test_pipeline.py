"""End to end: the repository copied into a temporary git repo with tiny params; real `dvc` subprocesses."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from medmerge.testing import REPO, copy_repo, init_repo, run, stage_env

pytestmark = pytest.mark.integration


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["image_size"] = 32
    sizes = {"n_train": 32, "n_val": 16, "n_test": 24, "image_size": 32}
    for dataset in params["data"]["datasets"].values():
        dataset["options"].update(sizes)
    for section in ("pretrain", "finetune"):
        params[section].update(epochs=1, batch_size=16)
    params["merge"].update(epochs=1, batch_size=16, finetune_epochs=1, alphas=[0.0, 0.5, 1.0])
    params["seeds"] = [0, 1]
    params["evaluate"]["batch_size"] = 64
    return params


MERGES = ("average", "interpolate", "medmerge", "medmerge_aligned")
BASELINES = ("ft_imagenet", "ft_scratch", "lpft_imagenet", "lpft_scratch")
AUDIT_LOG = "opened.jsonl"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The tiny pipeline reproduced from a fresh repository by `dvc repro evaluate` alone (so evaluate's
    declared dependencies must pull in every stage), with every stage's file opens recorded."""
    root = copy_repo(tmp_path_factory.mktemp("pipeline"), tiny_params())
    env = stage_env()
    init_repo(root, env, "tiny pipeline")
    audit_log = root.parent / AUDIT_LOG
    run(["dvc", "repro", "evaluate"], root, {**env, "MEDMERGE_AUDIT_OPENS": str(audit_log)})
    return root, env


def mlflow_client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def runs(root: Path) -> list:
    client = mlflow_client(root)
    experiment = client.get_experiment_by_name("medmerge")
    assert experiment is not None, "no MLflow experiment 'medmerge' in the repository's mlflow.db"
    return client.search_runs([experiment.experiment_id], max_results=500)


def test_repro_writes_the_comparison_of_every_method_over_seeds(repo) -> None:
    import pandas as pd

    root, _ = repo
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert set(metrics) == {*BASELINES, "ensemble_ft", *MERGES, *(f"{m}_collapsed" for m in MERGES)}
    for method, values in metrics.items():
        assert 0.0 <= values["f1_macro"] <= 1.0, method
        assert {"accuracy", "balanced_accuracy", "auroc_macro", "f1_macro_std"} <= set(values)
    per_seed = pd.read_csv(root / "reports/per_seed.csv")
    assert sorted(per_seed["seed"].unique()) == [0, 1] and len(per_seed) == 2 * len(metrics)
    table = pd.read_csv(root / "reports/comparison.csv").set_index("method")
    for method in metrics:  # the table's mean and std are those of the per-seed results
        values = per_seed.loc[per_seed["method"] == method, "f1_macro"]
        assert table.loc[method, "f1_macro_mean"] == pytest.approx(values.mean())
        assert table.loc[method, "f1_macro_std"] == pytest.approx(values.std(ddof=1))
        assert table.loc[method, "seeds"] == 2
    markdown = (root / "reports/comparison.md").read_text()
    assert all(f"| {method} |" in markdown for method in metrics) and " ± " in markdown
    for png in ["reports/comparison.png", "reports/layerwise.png", "reports/confusion/medmerge.png",
                "models/merge/medmerge/seed_1/layers.png"]:
        assert (root / png).read_bytes()[:4] == b"\x89PNG", png
    layerwise = pd.read_csv(root / "reports/layerwise.csv")
    assert set(layerwise["method"]) == {"medmerge", "medmerge_aligned"}  # the learned merges
    card = json.loads((root / "models/merged/medmerge/seed_0/card.json").read_text())
    assert card["arch"] == "tf_efficientnet_lite0" and card["bn_recalibrated"] is True
    # what trained it (the harness runs one thread per stage), and the report says so
    assert re.fullmatch(r"portable CPU kernels \(AVX2\), 1 thread, small-map depthwise weight gradients by taps",
                     card["compute"]), card["compute"]
    assert f"Every model was trained with {card['compute']}: the same CPU model" in markdown
    interpolate = json.loads((root / "models/merge/interpolate/seed_0/merge.json").read_text())
    scores = interpolate["val_f1_by_alpha"]
    assert set(scores) == {"0.0", "0.5", "1.0"} and scores[str(interpolate["alpha"])] == max(scores.values())
    aligned = json.loads((root / "models/merge/medmerge_aligned/seed_0/merge.json").read_text())
    assert aligned["align"] == "weight_matching" and set(aligned["alignment"]) == {"scratch"}
    assert (root / "models/merge/medmerge_aligned/seed_0/permutations.safetensors").is_file()
    assert not (root / "models/merge/medmerge/seed_0/permutations.safetensors").exists()


def test_report_compares_every_method_with_the_best_validated_baseline(repo) -> None:
    import pandas as pd

    root, _ = repo
    per_seed = pd.read_csv(root / "reports/per_seed.csv")
    validation = per_seed.groupby("method")["val_f1_macro"].mean()
    reference = validation[list(BASELINES)].idxmax()
    table = pd.read_csv(root / "reports/comparison.csv").set_index("method")
    assert table.loc[reference, "verdict"] == "reference"
    assert set(table["verdict"]) <= {"reference", "better", "worse", "no detectable difference"}
    metrics = json.loads((root / "reports/metrics.json").read_text())
    test = per_seed.pivot(index="seed", columns="method", values="f1_macro")
    for method in ("medmerge", "ensemble_ft", "ft_scratch"):  # the paired difference, per seed then averaged
        assert metrics[method]["f1_macro_diff"] == pytest.approx((test[method] - test[reference]).mean())
        low, high = metrics[method]["f1_macro_ci_low"], metrics[method]["f1_macro_ci_high"]
        assert low <= metrics[method]["f1_macro_diff"] <= high
        assert metrics[method]["f1_macro_boot_low"] <= metrics[method]["f1_macro_boot_high"]
        assert metrics[method]["verdict"] == table.loc[method, "verdict"]
    markdown = (root / "reports/comparison.md").read_text()
    assert f"Reference: `{reference}`" in markdown and "bootstrap 95%" in markdown and "| verdict |" in markdown
    assert (root / "reports/differences.png").read_bytes()[:4] == b"\x89PNG"
    ensemble = per_seed[per_seed["method"] == "ensemble_ft"]
    assert len(ensemble) == 2 and ensemble["f1_macro"].between(0, 1).all()


def test_every_file_a_stage_opens_is_declared(repo) -> None:
    """The audit hook's record of every stage's opens (its imports included), against its deps and outs in
    dvc.lock. Paths gone after the run (temporary directories, probes that found nothing) and directories
    read no file."""
    root, _ = repo
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    # params; tracking; git metadata; resume checkpoints (kept outside the outs on purpose)
    allowed_everywhere = ("params.yaml", "mlflow.db", "mlartifacts/", ".git/", ".medmerge/")
    opened = [json.loads(line) for line in (root.parent / AUDIT_LOG).read_text().splitlines()]
    assert {entry["stage"] for entry in opened} >= {"evaluate", "pretrain@imagenet-0", "merge_settings@medmerge",
                                                    "teachers@medmerge-1", "learn@medmerge-1", "collapse@medmerge-1",
                                                    "finetune_merged@medmerge-1"}
    assert any(entry["path"] == "medmerge/config.py" for entry in opened)  # imports are recorded too
    within = lambda path, roots: any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)  # noqa: E731
    undeclared = []
    for entry in opened:
        path, stage = entry["path"], lock[entry["stage"]]
        if path.startswith(allowed_everywhere) or not (root / path).is_file():  # gone, or a directory listing
            continue
        outs = [o["path"] for o in stage.get("outs", [])]
        declared = [d["path"] for d in stage.get("deps", [])] + outs
        if not within(path, declared) or (entry["mode"] == "w" and not within(path, outs)):
            undeclared.append(f"{entry['stage']}: {entry['mode']} {path}")
    assert not undeclared, "stages open files that dvc.yaml does not declare:\n" + "\n".join(sorted(undeclared))


def test_dag_puts_every_stage_upstream_of_the_report(repo) -> None:
    root, env = repo
    stages = run(["dvc", "stage", "list", "--name-only"], root, env).stdout.split()
    upstream = run(["dvc", "dag", "--md", "evaluate"], root, env).stdout
    missing = [name for name in stages if name not in upstream]
    assert not missing, f"dvc dag evaluate lacks {missing}"
    assert set(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == set(stages)


def test_a_new_seed_runs_only_that_seeds_stages(repo) -> None:
    """With one more seed, exactly that seed's stages and the report are out of date (what `dvc exp run -S
    'seeds=[0,1,2]'` would then run); every stage of seeds 0 and 1 stays as it is."""
    root, env = repo
    params_file = root / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["seeds"] = [0, 1, 2]
    try:
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        changed = sorted(json.loads(run(["dvc", "status", "--json"], root, env).stdout))
    finally:
        params_file.write_text(original)
    assert changed and all(name == "evaluate" or name.endswith("-2") for name in changed), changed
    assert {"pretrain@imagenet-2", "baseline@lpft-scratch-2", "teachers@medmerge-2", "learn@medmerge-2",
            "collapse@medmerge-2", "finetune_merged@medmerge-2", "evaluate"} <= set(changed)


def test_collapsed_checkpoints_load_strictly_into_timm_and_predict_what_the_pipeline_recorded(repo) -> None:
    """Each merged model loads into a plain ``timm.create_model`` (strict) and, with timm's own data config,
    gives the test logits its stage wrote to predictions.csv."""
    import numpy as np
    import pandas as pd
    import timm
    import torch
    from safetensors.torch import load_file

    root, _ = repo
    images = np.load(root / "data/processed/lesions/test_images.npy")[:8]
    for method in MERGES:
        for stage in ("merged", "merged_ft"):
            model_dir = root / f"models/{stage}/{method}/seed_1"
            card = json.loads((model_dir / "card.json").read_text())
            model = timm.create_model(card["arch"], num_classes=card["num_classes"])
            model.load_state_dict(load_file(model_dir / "model.safetensors"), strict=True)
            config = timm.data.resolve_data_config({}, model=model)
            mean, std = (torch.tensor(config[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
            x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
            with torch.no_grad():
                logits = model.eval()(x).numpy()
            recorded = pd.read_csv(model_dir / "predictions.csv")
            recorded = recorded[recorded["split"] == "test"].sort_values("index").filter(like="logit.")
            np.testing.assert_allclose(logits, recorded.to_numpy()[:8], rtol=0, atol=1e-3,
                                       err_msg=f"{stage}/{method}")


def test_mlflow_holds_every_method_with_f1_and_coefficients(repo) -> None:
    root, _ = repo
    client = mlflow_client(root)
    by_stage: dict[str, list] = {}
    for item in runs(root):
        by_stage.setdefault(item.data.tags.get("stage"), []).append(item)
    assert {"pretrain", "ft", "lpft", "learn_weights", "finetune_merged", "evaluate"} <= set(by_stage)
    evaluate = by_stage["evaluate"][0]
    assert "medmerge.f1_macro" in evaluate.data.metrics and "ft_imagenet.f1_macro_std" in evaluate.data.metrics
    assert evaluate.data.params["merge.lr"] == str(tiny_params()["merge"]["lr"])
    assert evaluate.data.tags["dvc_exp_name"] == "workspace"
    assert len(evaluate.data.tags["git_commit"]) == 40
    reports = {a.path for a in client.list_artifacts(evaluate.info.run_id, "reports")}
    assert {"reports/comparison.md", "reports/comparison.csv", "reports/layerwise.png"} <= reports
    children = {r.data.tags["method"]: r for r in by_stage["evaluate_method"]
                if r.data.tags.get("mlflow.parentRunId") == evaluate.info.run_id}
    assert set(children) == set(json.loads((root / "reports/metrics.json").read_text()))
    seeds = client.get_metric_history(children["medmerge"].info.run_id, "f1_macro")
    assert sorted(m.step for m in seeds) == [0, 1]  # one test F1 per seed, the seed as the step
    learned = {(r.data.tags["method"], r.data.tags["seed"]): r for r in by_stage["learn_weights"]}
    assert set(learned) == {(m, s) for m in MERGES for s in ("0", "1")}
    for method in ("medmerge", "medmerge_aligned", "average"):
        run_ = learned[(method, "0")]
        assert "coef_mean.imagenet" in run_.data.metrics and "best_val_f1_macro" in run_.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run_.info.run_id, "coefficients")}
        assert "coefficients/coefficients.safetensors" in artifacts and "coefficients/layers.csv" in artifacts
    assert "alpha" in learned[("interpolate", "0")].data.metrics
    assert "align.scratch.similarity_after" in learned[("medmerge_aligned", "1")].data.metrics
    history = client.get_metric_history(by_stage["ft"][0].info.run_id, "val_f1_macro")
    assert [m.step for m in history] == [1]


def test_second_repro_does_nothing(repo) -> None:
    root, env = repo
    result = run(["dvc", "status"], root, env)
    assert "up to date" in result.stdout, result.stdout


def ran_stages(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_dag_learns_collapses_finetunes_then_evaluates(repo) -> None:
    """`dvc dag` shows each merge's steps as stages in order: learn -> collapse -> finetune_merged -> evaluate,
    with the merge's settings and teachers before learning."""
    root, env = repo
    dot = run(["dvc", "dag", "--dot"], root, env).stdout
    edges = {tuple(part.strip().strip('"') for part in line.rstrip(";").split("->"))
             for line in dot.splitlines() if "->" in line}
    for method in MERGES:
        for seed in (0, 1):
            chain = [f"merge_settings@{method}", f"learn@{method}-{seed}", f"collapse@{method}-{seed}",
                     f"finetune_merged@{method}-{seed}", "evaluate"]
            for before, after in itertools.pairwise(chain):
                assert (before, after) in edges, (before, after)
            assert (f"teachers@{method}-{seed}", f"learn@{method}-{seed}") in edges


def test_lr_sweep_relearns_only_the_learned_merges_and_logs_the_new_lr(repo) -> None:
    """`dvc exp run -S merge.lr=...`: the merges that learn with that rate (medmerge, aligned or not) rerun from
    learning on; the fixed-weight merges (average, interpolate), which do not read it, run no stage."""
    root, env = repo
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "lock", "--allow-empty"], root, env)
    result = run(["dvc", "exp", "run", "--temp", "-n", "lr-sweep", "-S", "merge.lr=0.003"], root, env)
    ran = ran_stages(result.stdout + result.stderr)
    for seed in (0, 1):
        for method in ("medmerge", "medmerge_aligned"):
            assert {f"learn@{method}-{seed}", f"collapse@{method}-{seed}", f"finetune_merged@{method}-{seed}"} <= ran
        for method in ("average", "interpolate"):
            assert not {f"learn@{method}-{seed}", f"collapse@{method}-{seed}", f"finetune_merged@{method}-{seed}"} & ran
    assert not {stage for stage in ran if stage.split("@")[0] in ("pretrain", "baseline", "prepare", "fetch_data")}
    evaluate = [r for r in runs(root) if r.data.tags.get("stage") == "evaluate" and r.data.params["merge.lr"] == "0.003"]
    assert len(evaluate) == 1, "the temporary experiment's evaluate run did not reach the repository's store"
    assert evaluate[0].data.tags["dvc_exp_name"] == "lr-sweep"
    assert "medmerge.f1_macro" in evaluate[0].data.metrics
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout)
    assert "lr-sweep" in json.dumps(shown)


def test_finetune_sweeps_relearn_and_recollapse_nothing(repo) -> None:
    """`-S merge.finetune_epochs=... -S finetune.lr=...`: every fine-tune reruns (the baselines' and the merged
    models'), no merge is learned or collapsed again, although the FT baselines changed."""
    root, env = repo
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "lock", "--allow-empty"], root, env)
    result = run(["dvc", "exp", "run", "--temp", "-n", "finetune-sweep", "-S", "merge.finetune_epochs=2",
                  "-S", "finetune.lr=0.002"], root, env)
    ran = ran_stages(result.stdout + result.stderr)
    assert {f"finetune_merged@{method}-{seed}" for method in MERGES for seed in (0, 1)} <= ran
    assert {"baseline@ft-imagenet-0", "baseline@lpft-scratch-1", "evaluate"} <= ran
    assert not {stage for stage in ran if stage.split("@")[0] in ("learn", "collapse", "pretrain")}, sorted(ran)


def test_bad_params_key_stops_the_stage_with_a_clear_message(repo) -> None:
    root, env = repo
    bad = root / "bad"
    bad.mkdir()
    params = tiny_params()
    params["merge"]["lrr"] = 0.1
    (bad / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(root / "stages", bad / "stages")
    shutil.copytree(root / "medmerge", bad / "medmerge")
    result = run([sys.executable, "-m", "stages.learn", "medmerge", "--seed", "0"], bad, env, check=False)
    assert result.returncode == 1
    assert "params.yaml" in result.stderr and "merge.lrr: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_queued_experiments_run_in_parallel_into_one_store(repo) -> None:
    """`dvc exp run --queue` twice, then `dvc queue start -j 2`: both experiments' runs land in the store.

    The sweep sets one compared merge's own learning rate (``methods.medmerge.lr``), the per-method override."""
    root, env = repo
    for lr in ("0.02", "0.04"):
        run(["dvc", "exp", "run", "--queue", "-n", f"queued-{lr}", "-S", f"+methods.medmerge.lr={lr}"], root, env)
    run(["dvc", "queue", "start", "-j", "2"], root, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], root, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Failed" not in status, status + run(["dvc", "queue", "logs", "queued-0.02"], root, env, check=False).stdout
    evaluated = {r.data.params.get("methods.medmerge.lr"): r for r in runs(root)
                 if r.data.tags.get("stage") == "evaluate"}
    for lr in ("0.02", "0.04"):
        assert lr in evaluated, f"queued experiment methods.medmerge.lr={lr} has no evaluate run in the store: {status}"
        assert evaluated[lr].data.tags["dvc_exp_name"] == f"queued-{lr}"
        assert "medmerge.f1_macro" in evaluated[lr].data.metrics
    learned = [r for r in runs(root) if r.data.tags.get("stage") == "learn_weights"
               and r.data.tags.get("dvc_exp_name") == "queued-0.02"]
    assert {r.data.tags["method"] for r in learned} == {"medmerge"}, "only the swept merge should rerun"
