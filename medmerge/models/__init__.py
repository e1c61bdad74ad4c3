"""Create, load and save timm models; weight origins; key remapping; safe checkpoint loading.

The names below are imported from their submodules on first use (PEP 562), so that importing
``medmerge.models.origins`` (the configuration's check of weight origins) does not import torch or timm.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the submodule that defines it
_EXPORTS = {
    "CheckpointError": "checkpoint",
    "load_model_dir": "checkpoint",
    "load_state_dict_file": "checkpoint",
    "save_model_dir": "checkpoint",
    "sha256_file": "checkpoint",
    "write_pointer_dir": "checkpoint",
    "remap_lukemelas_to_timm": "efficientnet_lite",
    "input_card": "export",
    "timm_config": "export",
    "LoadReport": "factory",
    "StateDictMismatchError": "factory",
    "backbone_state": "factory",
    "check_backbone": "factory",
    "create_model": "factory",
    "data_config": "factory",
    "head_keys": "factory",
    "load_backbone": "factory",
    "model_skeleton": "factory",
    "WEIGHT_ORIGINS": "origins",
    "OriginError": "origins",
    "WeightsUnavailableError": "origins",
    "fetch_weights": "origins",
}

__all__ = sorted(_EXPORTS)

def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
