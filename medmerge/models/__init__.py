"""Create, load and save timm models; weight origins; key remapping; safe checkpoint loading.

The names below are imported from their submodules on first use (PEP 562), so that importing
``medmerge.models.origins`` (the configuration's check of weight origins) does not import torch or timm.
"""

from __future__ import annotations

from medmerge.lazy import lazy_exports

#: public name -> the submodule that defines it
_EXPORTS = {
    "CheckpointError": "checkpoint",
    "load_model_dir": "checkpoint",
    "load_state_dict_file": "checkpoint",
    "model_state_cpu": "checkpoint",
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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
