"""Create, load and save timm models; weight origins; key remapping; safe checkpoint loading."""

from .checkpoint import (
    CheckpointError,
    load_model_dir,
    load_state_dict_file,
    save_model_dir,
    sha256_file,
    write_pointer_dir,
)
from .efficientnet_lite import remap_lukemelas_to_timm
from .export import input_card, timm_config
from .factory import (
    LoadReport,
    StateDictMismatchError,
    backbone_state,
    check_backbone,
    create_model,
    data_config,
    head_keys,
    load_backbone,
    model_skeleton,
)
from .origins import WEIGHT_ORIGINS, OriginError, WeightsUnavailableError, fetch_weights

__all__ = [
    "WEIGHT_ORIGINS",
    "CheckpointError",
    "LoadReport",
    "OriginError",
    "StateDictMismatchError",
    "WeightsUnavailableError",
    "backbone_state",
    "check_backbone",
    "create_model",
    "data_config",
    "fetch_weights",
    "head_keys",
    "input_card",
    "load_backbone",
    "load_model_dir",
    "load_state_dict_file",
    "model_skeleton",
    "remap_lukemelas_to_timm",
    "save_model_dir",
    "sha256_file",
    "write_pointer_dir",
    "timm_config",
]
