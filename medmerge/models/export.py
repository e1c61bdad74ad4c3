"""timm's pretrained layout for every model dir: ``config.json`` beside ``model.safetensors``.

``timm.create_model("local-dir:<dir>", pretrained=True)`` reads ``config.json`` (architecture, number of
classes, label names, and a ``pretrained_cfg`` with the preprocessing), builds the model with that head
and loads ``model.safetensors`` strictly; ``timm.models.push_to_hf_hub`` publishes the same layout. The
preprocessing recorded is the pipeline's own: the prepared image size, the resize policy, and the
normalisation :func:`medmerge.train.make_transform` applies (timm's data config of the architecture).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from timm.models import get_pretrained_cfg

from medmerge.models.factory import check_arch, data_config

__all__ = ["CONFIG_FILE", "RESIZE_TO_TIMM", "input_card", "timm_config"]

CONFIG_FILE = "config.json"

#: the pipeline's resize policy -> timm's eval transform that does the same (crop_pct 1.0: nothing cut
#: beyond what the policy cuts); images are area-averaged when shrunk (``box``), as in preparation
RESIZE_TO_TIMM: dict[str, dict[str, Any]] = {
    "squash": {"crop_mode": "squash", "crop_pct": 1.0, "interpolation": "box"},
    "center_crop": {"crop_mode": "center", "crop_pct": 1.0, "interpolation": "box"},
    "pad": {"crop_mode": "border", "crop_pct": 1.0, "interpolation": "box"},
}
#: card keys that config.json states in timm's own terms, so its ``medmerge`` section leaves them out
_TIMM_KEYS = ("arch", "num_classes", "classes", "input")
#: keys of the architecture's registered pretrained_cfg that describe the network, not the weights
_STRUCTURE_KEYS = ("first_conv", "classifier", "fixed_input_size")


def input_card(arch: str, image_size: int, resize: str = "squash") -> dict[str, Any]:
    """What a model trained on images prepared at ``image_size`` px by the ``resize`` policy expects:
    ``input_size`` [3, S, S], the resize policy and its timm equivalent, ``mean`` and ``std`` (0..1 scale)."""
    if resize not in RESIZE_TO_TIMM:
        raise ValueError(f"unknown resize policy {resize!r}; expected one of {sorted(RESIZE_TO_TIMM)}")
    config = data_config(arch)
    return {"input_size": [3, int(image_size), int(image_size)], "resize": resize, **RESIZE_TO_TIMM[resize],
            "mean": [float(v) for v in config["mean"]], "std": [float(v) for v in config["std"]]}


def _pretrained_cfg(arch: str, num_classes: int, model_input: Mapping[str, Any] | None) -> dict[str, Any]:
    registered = get_pretrained_cfg(arch)
    base = registered.to_dict() if registered is not None else {}
    cfg = {key: base[key] for key in _STRUCTURE_KEYS if key in base}
    if model_input is None:  # not trained here (a fetched source): the architecture's own preprocessing
        model_input = data_config(arch)
    cfg.update({key: list(value) if isinstance(value, tuple) else value for key, value in model_input.items()
                if key in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")})
    cfg["num_classes"] = int(num_classes)
    return cfg


def timm_config(card: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json`` for a model dir's ``card``: timm's keys (``architecture``, ``num_classes``,
    ``label_names``, ``pretrained_cfg``) and, under ``medmerge``, how the model was made (the rest of the card)."""
    arch = str(card["arch"])
    check_arch(arch)
    config: dict[str, Any] = {"architecture": arch.split(".", 1)[0], "num_classes": int(card["num_classes"])}
    if card.get("classes"):
        config["label_names"] = list(card["classes"])
    config["pretrained_cfg"] = _pretrained_cfg(arch, card["num_classes"], card.get("input"))
    config["medmerge"] = {key: value for key, value in card.items() if key not in _TIMM_KEYS}
    return config
