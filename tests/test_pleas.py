"""PLeaS: the least-squares layers beat the permutation-only merge on their own images, reproduce a permuted
copy exactly, and the method runs on a tiny task; bad settings and layers are named in one line."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from test_activations import batches, permuted_twins
from test_methods import inputs
from torch import nn

from medmerge.config import MergeSettings
from medmerge.merge.alignment import activation_matching, apply_permutations, feature_statistics
from medmerge.merge.least_squares import layer_plan, least_squares_merge
from medmerge.methods import get_method, run_merge_method


def _average(models: list[nn.Module]) -> nn.Module:
    merged = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    merged.load_state_dict({k: sum(s[k] for s in states) / len(states) if v.is_floating_point() else v
                            for k, v in states[0].items()})
    return merged.eval()


def test_least_squares_beats_the_permutation_only_merge_on_its_images() -> None:
    model, _, spec, _ = permuted_twins(size=32)
    torch.manual_seed(7)
    other = copy.deepcopy(model)
    other.load_state_dict(timm.create_model("test_resnet", num_classes=3).state_dict())  # another init
    xs = batches(32, 2)
    perms = activation_matching(spec, feature_statistics([model, other], spec, xs))
    aligned = copy.deepcopy(other)
    aligned.load_state_dict(apply_permutations(spec, perms, other.state_dict()))
    merged = _average([model, aligned])  # the permutation-only merge
    fits = least_squares_merge(merged, [model, aligned.eval()], lambda: iter(xs), [0.5, 0.5], skip=("fc",))
    assert [f.name for f in fits] == [n for n, _ in layer_plan(model, xs[0][:1], ("fc",))]
    assert len(fits) == 15
    # each layer, on the merged model's inputs: strictly smaller error than the averaged layer there
    assert all(f.error < f.start_error for f in fits), [(f.name, f.error, f.start_error) for f in fits]
    assert sum(f.error for f in fits) < 0.5 * sum(f.start_error for f in fits)


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])
def test_least_squares_of_a_permuted_copy_is_the_network(arch: str) -> None:
    model, twin, spec, _ = permuted_twins(arch, size=32)
    xs = batches(32, 2)
    perms = activation_matching(spec, feature_statistics([model, twin], spec, xs), anchor=0, other=1)
    aligned = copy.deepcopy(twin)
    aligned.load_state_dict(apply_permutations(spec, perms, twin.state_dict()))
    merged = _average([model, aligned])
    head = ("fc",) if arch == "test_resnet" else ("classifier",)
    fits = least_squares_merge(merged, [model, aligned.eval()], lambda: iter(xs), [0.5, 0.5], ridge=1e-9,
                               skip=head)
    assert max(f.error for f in fits) < 1e-6
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(merged(x), model(x), atol=1e-3, rtol=1e-3)
    # every layer's output, not only the logits: the same features on the fitted images (a weight on an input
    # that is 0 on them, e.g. a dead ReLU, is not determined by the data, so the weights are compared there)
    plan = layer_plan(model, xs[0][:1], head)
    for (ours, theirs) in zip(_layer_outputs(merged, plan, xs), _layer_outputs(model, plan, xs), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-3)


def _layer_outputs(model: nn.Module, plan, xs) -> list[torch.Tensor]:
    """The output of each planned layer with its BatchNorm (the norm's output where it has one)."""
    modules, outputs = dict(model.named_modules()), []
    handles = [modules[bn or name].register_forward_hook(lambda m, a, out: outputs.append(out.clone()))
               for name, bn in plan]
    with torch.no_grad():
        for x in xs:
            model(x)
    for handle in handles:
        handle.remove()
    return outputs


def test_pleas_runs_on_a_tiny_task_and_names_bad_settings() -> None:
    result = run_merge_method(inputs("pleas", options={"images": 32}))
    assert result.merge is None and result.model is not None and 0 <= result.val_f1 <= 1
    assert result.details["pleas"]["error_mean"] < result.details["pleas"]["start_error_mean"]
    assert result.model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    method = get_method("pleas")
    with pytest.raises(ValueError, match="options.budget: .*only budget 1.0"):
        method.validate(MergeSettings(method="pleas", anchor="a", options={"budget": 1.5}), ["a", "b"])
    with pytest.raises(ValueError, match="options.ratio must be one non-negative weight per source"):
        method.validate(MergeSettings(method="pleas", anchor="a", options={"ratio": [1.0]}), ["a", "b"])


def test_unsupported_layers_are_named() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"^pleas: layer '1' \(GroupNorm\) is not supported"):
        layer_plan(net, torch.zeros(1, 3, 8, 8))
    pre = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"^pleas: layer '0' \(BatchNorm2d\) does not directly follow"):
        layer_plan(pre.eval(), torch.zeros(1, 3, 8, 8))
