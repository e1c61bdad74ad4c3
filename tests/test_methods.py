"""The merge methods behind one interface (average, interpolate, medmerge), the linear probe of LP-FT,
alignment inside the pipeline, and the mean ± std report."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medmerge.config import ConfigError, MergeSettings, TrainSettings, parse_params
from medmerge.data.loader import ArrayBatches
from medmerge.data.target import TargetData
from medmerge.device import Runtime
from medmerge.merge.alignment import align_sources, apply_saved_permutations
from medmerge.merge.collapse import collapse, merge_state_to_save, restore_merge_state
from medmerge.methods import MERGE_METHODS, MergeInputs, get_method, rebuild_merge, run_merge_method
from medmerge.models import create_model, head_keys, load_backbone
from medmerge.report import comparison_markdown, layerwise, summarize
from medmerge.train import fit_linear_probe, make_transform, predict, train_classifier

REPO = Path(__file__).resolve().parents[1]
ARCH = "test_efficientnet"
NAMES = ["a", "b"]
CPU = Runtime(torch.device("cpu"))


def tiny_task(num_classes: int = 3, size: int = 32) -> TargetData:
    """Images whose brightness encodes the class, so a probe can learn them."""
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.arange(n) % num_classes
        images = np.clip(rng.normal(40 + 80 * labels[:, None, None, None], 20, (n, size, size, 3)), 0, 255)
        return images.astype(np.uint8), labels

    train, val = split(48), split(24)
    return TargetData(
        train=ArrayBatches(*train, batch_size=16, shuffle=True, seed=0, drop_last=True),
        val=ArrayBatches(*val, batch_size=64),
        test=ArrayBatches(*val, batch_size=64),
        classes=[f"c{i}" for i in range(num_classes)],
    )


def sources(count: int = 2, num_classes: int = 5) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in range(count):
        torch.manual_seed(10 + seed)
        states.append(create_model(ARCH, num_classes=num_classes).state_dict())
    return states


def inputs(method: str, states=None, names=NAMES, **settings) -> MergeInputs:
    merge_settings = MergeSettings(**{"method": method, "anchor": names[0], "epochs": 1, "batch_size": 16, "lr": 0.05,
                                      **settings})
    return MergeInputs(ARCH, states or sources(len(names)), names, tiny_task(), merge_settings, CPU, seed=0)


def backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    heads = set(head_keys(create_model(ARCH, num_classes=3)))
    return {k: v for k, v in state.items() if k not in heads and v.is_floating_point() and "running" not in k}


def test_methods_are_chosen_by_name() -> None:
    assert {"average", "interpolate", "medmerge"} <= set(MERGE_METHODS)
    unknown = MergeSettings.model_construct(method="sum", anchor="a")  # past validation, as a library caller could
    with pytest.raises(ValueError, match="unknown merge method 'sum'"):
        run_merge_method(MergeInputs(ARCH, sources(2), NAMES, tiny_task(), unknown, CPU))


def test_an_unknown_method_is_named_in_one_line_with_the_known_ones() -> None:
    with pytest.raises(ValueError) as error:
        get_method("sum")
    assert str(error.value) == f"unknown merge method 'sum'; expected one of {sorted(MERGE_METHODS)}"


def test_the_methods_say_what_they_are_and_whether_they_learn() -> None:
    assert [get_method(name).describe(MergeSettings(method=name, anchor="a", granularity="layer"))
            for name in ("average", "interpolate", "medmerge")] == ["average", "interpolate", "medmerge (layer)"]
    assert [name for name, method in MERGE_METHODS.items() if method.learns_coefficients] == ["medmerge"]  # of all


def test_a_method_name_is_taken_once() -> None:
    from medmerge.methods import register_method
    from medmerge.methods.fixed import FixedWeightMethod

    class Impostor(FixedWeightMethod):
        name = "average"

        def run(self, inputs: MergeInputs):
            raise AssertionError("never registered")

    with pytest.raises(ValueError, match=r"merge method 'average' is registered twice: by medmerge\.methods\.average"):
        register_method(Impostor)
    assert type(get_method("average")).__module__ == "medmerge.methods.average"


def readme_method() -> str:
    """The one file that README's "Adding a merge method" shows."""
    section = (REPO / "README.md").read_text().split("### Adding a merge method", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0] + "\n"


@pytest.fixture
def weighted(tmp_path):
    """README's example method, imported from a file of its own; the registry is restored afterwards."""
    path = tmp_path / "weighted_method.py"
    path.write_text(readme_method())
    spec = importlib.util.spec_from_file_location("weighted_method", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    yield get_method("weighted")
    MERGE_METHODS.remove("weighted")


def test_a_method_in_a_new_file_is_registered_by_name_and_runs(weighted) -> None:
    assert weighted.name == "weighted" and "weighted" in MERGE_METHODS and not weighted.learns_coefficients
    states = sources(2)
    result = run_merge_method(inputs("weighted", states, options={"weights": [3.0, 1.0]}, bn_recalibration=False))
    assert result.merge.source_means() == pytest.approx({"a": 0.75, "b": 0.25})
    for key, value in backbone(result.merge.collapsed_state_dict()).items():
        torch.testing.assert_close(value, 0.75 * states[0][key] + 0.25 * states[1][key], rtol=0, atol=1e-6, msg=key)
    rebuilt = rebuild_merge(ARCH, states, NAMES, 3, MergeSettings(method="weighted", anchor="a"))
    restore_merge_state(rebuilt, merge_state_to_save(result.merge))
    assert all(torch.equal(v, result.merge.collapsed_state_dict()[k]) for k, v in rebuilt.collapsed_state_dict().items())
    with pytest.raises(ValueError, match=r"^weighted needs one weight per source \(2\)$"):
        run_merge_method(inputs("weighted", states, options={"weights": [1.0]}))
    with pytest.raises(ValueError, match=r"options\.weights\.0: Input should be a valid number"):
        run_merge_method(inputs("weighted", states, options={"weights": ["x", 1.0]}))


def test_the_config_checks_a_new_method_with_its_own_settings(weighted) -> None:
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["methods"]["w"] = {"method": "weighted", "options": {"weights": [0.7, 0.3]}}
    assert parse_params(raw).method("w").options == {"weights": [0.7, 0.3]}
    for options, message in [({"weights": [1.0]}, r"methods\.w: method 'weighted' needs one weight per source"),
                             ({"weights": ["x", 1]}, r"methods\.w\.options\.weights\.0: Input should be a valid"),
                             ({}, r"methods\.w\.options\.weights: required by method 'weighted'"),
                             ({"weights": [1, 1], "scale": 2},
                              r"methods\.w\.options\.scale: unknown key \(method 'weighted' takes \['weights'\]\)")]:
        raw["methods"]["w"]["options"] = options
        with pytest.raises(ConfigError, match=message):
            parse_params(raw)


def test_adding_a_method_is_adding_one_file_and_reading_it_needs_no_torch(tmp_path) -> None:
    """A file dropped into medmerge/methods/ registers on import of the package, and neither the package nor
    a method's settings check imports torch (the config runs them when params are read)."""
    shutil.copytree(REPO / "medmerge", tmp_path / "medmerge", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "medmerge" / "methods" / "weighted.py").write_text(readme_method())
    code = ("import sys; from medmerge.config import MergeSettings; from medmerge.methods import MERGE_METHODS\n"
            "settings = MergeSettings(method='weighted', anchor='a', options={'weights': [1, 2]})\n"
            "MERGE_METHODS['weighted'].validate(settings, ['a', 'b'])\n"
            "print(sorted(MERGE_METHODS), 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    names, torch_loaded = done.stdout.strip().rsplit(" ", 1)
    assert {"average", "interpolate", "medmerge", "weighted"} <= set(eval(names)) and torch_loaded == "False"


def test_average_is_the_exact_uniform_parameter_average() -> None:
    states = sources(3)
    result = run_merge_method(inputs("average", states, ["a", "b", "c"], bn_recalibration=False))
    merged = result.merge.collapsed_state_dict()
    for key, value in backbone(merged).items():
        expected = (states[0][key] + states[1][key] + states[2][key]) / 3
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=key)
    assert result.merge.source_means() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_interpolate_is_exact_and_keeps_the_alpha_best_on_validation() -> None:
    states = sources(2)
    result = run_merge_method(inputs("interpolate", states, alphas=[0.0, 0.3, 1.0]))
    scores = result.details["val_f1_by_alpha"]
    assert set(scores) == {"0.0", "0.3", "1.0"}
    alpha = result.details["alpha"]
    assert scores[str(alpha)] == max(scores.values()) == result.val_f1
    merged = result.merge.collapsed_state_dict()
    for key, value in backbone(merged).items():
        torch.testing.assert_close(value, alpha * states[0][key] + (1 - alpha) * states[1][key], rtol=0,
                                   atol=1e-6, msg=key)


def test_interpolate_weighs_the_anchor_with_alpha() -> None:
    states = sources(2)
    result = run_merge_method(inputs("interpolate", states, ["a", "b"], alphas=[0.3], anchor="b"))
    assert result.merge.source_means() == pytest.approx({"a": 0.7, "b": 0.3})


def test_interpolate_needs_two_sources() -> None:
    with pytest.raises(ValueError, match="interpolate needs exactly two sources"):
        run_merge_method(inputs("interpolate", sources(3), ["a", "b", "c"]))


def test_medmerge_learns_kernel_coefficients_and_reports_validation() -> None:
    result = run_merge_method(inputs("medmerge", granularity="kernel"))
    assert result.details["best_epoch"] == 1 and 0.0 <= result.val_f1 <= 1.0
    assert result.merge.logits["conv_stem__weight"].shape == (1, 24, 1, 1, 1)  # sigmoid: a logit per out channel
    weights = result.merge.coefficient_tensors()
    assert weights["conv_stem.weight"].shape == (2, 24, 1, 1, 1)  # a weight per source and output channel
    assert not torch.allclose(weights["conv_stem.weight"], weights["conv_stem.weight"].flatten()[0])


@pytest.mark.parametrize("method", ["average", "interpolate"])
def test_fixed_weight_merge_round_trips_through_the_saved_state(method: str) -> None:
    """collapse rebuilds the merge from merge_state alone and gets the same collapsed model."""
    states = sources(2)
    result = run_merge_method(inputs(method, states, alphas=[0.25, 0.75]))
    rebuilt = rebuild_merge(ARCH, states, NAMES, 3, MergeSettings(method=method, anchor="a"))
    restore_merge_state(rebuilt, merge_state_to_save(result.merge))
    original, restored = result.merge.collapsed_state_dict(), rebuilt.collapsed_state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        torch.testing.assert_close(restored[key], original[key], rtol=0, atol=0, msg=key)


def test_fixed_weight_merge_head_is_a_fitted_probe_and_bn_is_recalibrated() -> None:
    states = sources(2)
    data = tiny_task()
    result = run_merge_method(inputs("average", states))
    model = create_model(ARCH, num_classes=3)
    model.load_state_dict(result.merge.collapsed_state_dict())  # the merge's own buffers: recalibrated
    probabilities, labels = predict(model, data.train, make_transform(ARCH, CPU))
    assert (probabilities.argmax(1) == labels).mean() > 0.9  # brightness classes: the probe separates them
    blended = {k: (states[0][k] + states[1][k]) / 2 for k in states[0] if k.endswith("running_mean")}
    assert any(not torch.allclose(model.state_dict()[k], v) for k, v in blended.items())


def test_linear_probe_sets_the_head_from_frozen_features_only() -> None:
    data = tiny_task()
    model = create_model(ARCH, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy = fit_linear_probe(model, data.train, make_transform(ARCH, CPU), 3)
    assert accuracy > 0.9
    heads = set(head_keys(model))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) != (key in heads), key  # the head changed, nothing else


def test_lpft_starts_fine_tuning_from_the_probe() -> None:
    """With no fine-tune epochs, LP-FT's model is the source backbone under the fitted probe."""
    data = tiny_task()
    init = create_model(ARCH, num_classes=5).state_dict()
    settings = TrainSettings(epochs=0, lr=1e-3, batch_size=16)
    probed, _ = train_classifier(ARCH, init, data, settings, CPU, epochs=0, linear_probe=True)
    plain, _ = train_classifier(ARCH, init, data, settings, CPU, epochs=0)
    reference = create_model(ARCH, num_classes=3)
    load_backbone(reference, init)
    fit_linear_probe(reference, data.train, make_transform(ARCH, CPU), 3)
    for key in head_keys(reference):
        torch.testing.assert_close(probed.state_dict()[key], reference.state_dict()[key], msg=key)
        assert not torch.allclose(plain.state_dict()[key], reference.state_dict()[key]), key


def test_alignment_in_the_pipeline_preserves_each_source_and_round_trips() -> None:
    states = sources(3, num_classes=5)
    names = ["a", "b", "c"]
    aligned, permutations, report = align_sources(ARCH, states, names, anchor="a")
    assert set(permutations) == {"b", "c"} and set(report) == {"b", "c"}
    assert all(r["similarity_after"] >= r["similarity_before"] for r in report.values())
    x = torch.rand(2, 3, 32, 32)
    for name, state, new in zip(names, states, aligned, strict=True):
        original, permuted = create_model(ARCH, num_classes=5).eval(), create_model(ARCH, num_classes=5).eval()
        original.load_state_dict(state)
        permuted.load_state_dict({**state, **new})  # the aligned backbone under the source's own head
        features = [m.forward_head(m.forward_features(x), pre_logits=True) for m in (original, permuted)]
        # the final feature channels come out in the aligned order (the anchor's: unchanged); values equal
        order = permutations.get(name, {}).get("conv_head", torch.arange(features[0].shape[1]))
        torch.testing.assert_close(features[1], features[0][:, order], rtol=1e-4, atol=1e-5)
        changed = [k for k in new if not torch.equal(new[k], state[k])]
        assert bool(changed) == (name != "a"), name
    again = apply_saved_permutations(ARCH, states, names, permutations)
    for first, second in zip(aligned, again, strict=True):
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_summary_gives_mean_and_sample_std_per_method() -> None:
    per_seed = pd.DataFrame({
        "method": ["ft", "ft", "ft", "merge", "merge", "merge"], "kind": ["FT"] * 3 + ["merge"] * 3,
        "seed": [0, 1, 2] * 2, "f1_macro": [0.5, 0.6, 0.7, 0.8, 0.8, 0.8],
        "accuracy": [0.1] * 6, "balanced_accuracy": [0.2] * 6, "auroc_macro": [0.3] * 6,
    })
    summary = summarize(per_seed).set_index("method")
    assert summary.loc["ft", "f1_macro_mean"] == pytest.approx(0.6)
    assert summary.loc["ft", "f1_macro_std"] == pytest.approx(0.1)  # ddof=1: sqrt(0.02 / 2)
    assert summary.loc["merge", "f1_macro_std"] == pytest.approx(0.0, abs=1e-12) and summary.loc["ft", "seeds"] == 3
    table = comparison_markdown(summary.reset_index())
    assert "| ft | FT | 3 | 0.600 ± 0.100 |" in table and "**0.800 ± 0.000**" in table


def test_layerwise_averages_each_layer_over_seeds_in_network_order() -> None:
    def layers(offset: float) -> pd.DataFrame:
        return pd.DataFrame({"layer": ["stem", "stem", "block", "head_norm"], "a": [0.2, 0.4, 0.6 + offset, 0.9],
                             "b": [0.8, 0.6, 0.4 - offset, 0.1], "a_std": [0.1, 0.3, 0.2, 0.0],
                             "b_std": [0.1, 0.3, 0.2, 0.0]})

    result = layerwise({0: layers(0.0), 1: layers(0.2)}, ["a", "b"])
    assert list(result["layer"]) == ["stem", "block", "head_norm"]
    assert result["a_mean"].tolist() == pytest.approx([0.3, 0.7, 0.9])
    assert result["a_seed_std"].tolist() == pytest.approx([0.0, np.std([0.6, 0.8], ddof=1), 0.0])
    assert result["b_kernel_std"].tolist() == pytest.approx([0.2, 0.2, 0.0])  # spread within the layer


def test_layer_summary_gives_the_spread_across_kernels() -> None:
    result = run_merge_method(inputs("medmerge"))
    summary = result.merge.layer_summary().set_index("parameter")
    weights = result.merge.coefficient_tensors()["conv_stem.weight"]
    assert summary.loc["conv_stem.weight", "a"] == pytest.approx(float(weights[0].mean()))
    assert summary.loc["conv_stem.weight", "a_std"] == pytest.approx(float(weights[0].std()))
    assert summary.loc["conv_stem.weight", "a_std"] > 0  # one epoch moved the kernels apart


def test_channels_last_prepares_a_merge_with_per_kernel_coefficients() -> None:
    """A lent H100 (torch 2.11) refused ``Module.to(memory_format=channels_last)`` on the merge's 5-D
    per-kernel coefficients; only the 4-D tensors (conv kernels) change layout now."""
    from medmerge.methods.medmerge import build_learned_merge

    merge = build_learned_merge(ARCH, sources(2), NAMES, 3, MergeSettings(anchor="a"))
    x = torch.rand(2, 3, 32, 32)
    expected = merge(x)
    prepared = Runtime(torch.device("cpu"), channels_last=True).prepare(merge)
    assert prepared.sources[0]["conv_stem__weight"].is_contiguous(memory_format=torch.channels_last)
    assert prepared.logits["conv_stem__weight"].dim() == 5
    # the same function; channels_last convolutions sum in another order
    torch.testing.assert_close(prepared(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-3,
                               atol=1e-3)


def test_without_recalibration_bn_statistics_are_blended_like_their_layer() -> None:
    """bn_recalibration: false gives the sources' running statistics blended per channel by the learned
    coefficients of the norm's weight; with it, statistics recomputed on the target training split."""
    from medmerge.methods.medmerge import build_learned_merge

    states = sources(2)
    for state, shift in zip(states, (0.0, 1.0), strict=True):  # distinct statistics per source
        for key in state:
            if key.endswith("running_mean"):
                state[key] = torch.randn(state[key].shape) + shift
    merge = build_learned_merge(ARCH, states, NAMES, 3, MergeSettings(anchor="a"))
    with torch.no_grad():
        for logits in merge.logits.values():
            logits.normal_()  # a different weight per channel
    key = "bn1.running_mean"
    w = merge.group_weights()["bn1.weight"].detach()
    expected = w[0] * states[0][key] + w[1] * states[1][key]
    blended = collapse(merge, ARCH, 3, None, CPU).state_dict()[key]
    torch.testing.assert_close(blended, expected)
    recalibrated = collapse(merge, ARCH, 3, tiny_task(), CPU).state_dict()[key]
    assert not torch.allclose(recalibrated, blended)


def test_an_interrupted_medmerge_resumes_to_the_same_coefficients(tmp_path) -> None:
    import dataclasses

    from medmerge.resume import ResumeDir

    reference = run_merge_method(inputs("medmerge", epochs=3))
    resume = ResumeDir(tmp_path / "resume")

    def stop(result) -> None:
        if result.epoch == 2:
            raise KeyboardInterrupt  # what Ctrl-C does to a stage: the checkpoint of epoch 1 remains

    with pytest.raises(KeyboardInterrupt):
        run_merge_method(dataclasses.replace(inputs("medmerge", epochs=3), on_epoch=stop, resume=resume))
    seen = []
    resumed = run_merge_method(dataclasses.replace(inputs("medmerge", epochs=3), on_epoch=seen.append, resume=resume))
    assert [e.epoch for e in seen] == [1, 2, 3]
    assert resumed.val_f1 == reference.val_f1 and resumed.details == reference.details
    ours, theirs = resumed.merge.state_dict(), reference.merge.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    other = dataclasses.replace(inputs("medmerge", epochs=3, granularity="layer"), resume=resume, on_epoch=stop)
    with pytest.raises(KeyboardInterrupt):  # another merge of the same sources does not take this checkpoint
        run_merge_method(other)
    assert len(list(resume.path.glob("fit-*.pt"))) == 2


def test_logistic_regression_reaches_scikit_learns_optimum() -> None:
    """The linear probe's solver minimises scikit-learn's LogisticRegression objective (multinomial, C = 1,
    intercept unpenalised, "balanced" class weights) at least as well as scikit-learn does, and gives a class
    absent from training a bias that keeps it from ever being predicted."""
    from sklearn.linear_model import LogisticRegression

    from medmerge.train import logistic_regression

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 3], [30, 10, 20])  # class 2 absent, classes unbalanced
    centers = rng.normal(size=(4, 40))
    features = np.abs(centers[labels] + rng.normal(size=(len(labels), 40))).astype(np.float32)

    def objective(weight, bias, sample_weight):
        logits = features.astype(np.float64) @ weight.T + bias
        log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
        picked = log_p[np.arange(len(labels)), np.searchsorted([0, 1, 3], labels)]
        return (-(picked * sample_weight).sum() + 0.5 * np.square(weight).sum()) / sample_weight.sum()

    for balanced in (False, True):
        weight, bias = logistic_regression(features, labels, 4, class_weighted=balanced)
        assert bias[2] == -1e4 and not weight[2].any()
        reference = LogisticRegression(max_iter=2000, class_weight="balanced" if balanced else None).fit(features, labels)
        counts = np.bincount(labels)[labels]
        sample_weight = len(labels) / (3 * counts) if balanced else np.ones(len(labels))
        ours = objective(weight[[0, 1, 3]].astype(np.float64), bias[[0, 1, 3]], sample_weight)
        theirs = objective(reference.coef_, reference.intercept_, sample_weight)
        assert ours <= theirs + 1e-6, (balanced, ours, theirs)
        predicted = (features @ weight.T + bias).argmax(1)
        np.testing.assert_array_equal(predicted, reference.predict(features))
