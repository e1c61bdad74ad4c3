"""Create timm models and move backbones between them (classifier heads are always replaced)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from torch import Tensor, nn

from medmerge.errors import InputError

__all__ = [
    "LoadReport",
    "StateDictMismatchError",
    "backbone_state",
    "check_arch",
    "check_backbone",
    "create_model",
    "data_config",
    "head_keys",
    "head_prefixes",
    "load_backbone",
    "model_skeleton",
]

#: how many offending keys an error message lists
MAX_LISTED = 5


class StateDictMismatchError(ValueError, InputError):
    """A state dict does not fit a model: missing/unexpected backbone keys or wrong shapes."""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_backbone` did not load: ``missing`` = model head keys left at their fresh init,
    ``unexpected`` = head keys of the source state that were dropped."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _unknown_arch(arch: str) -> ValueError:
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean one of {close}?" if close else "; see timm.list_models()"
    return ValueError(f"unknown timm architecture {arch!r}{hint}")


def check_arch(arch: str) -> None:
    """Raise ValueError (suggesting close names) unless timm knows ``arch`` (an optional ``.tag`` is allowed)."""
    if not timm.is_model(arch):
        raise _unknown_arch(arch)


def create_model(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)``; never downloads."""
    check_arch(arch)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def model_skeleton(arch: str, **kwargs: Any) -> nn.Module:
    """The model for ``arch`` (default head) on the meta device: keys and shapes, no memory, no init cost.

    Falls back to a CPU model for the rare architecture whose init cannot run on the meta device."""
    check_arch(arch)
    try:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, NotImplementedError, ValueError):
        return timm.create_model(arch, pretrained=False, **kwargs)


def data_config(arch: str) -> dict[str, Any]:
    """Input preprocessing of ``arch``'s default pretrained weights (mean, std, input_size, interpolation,
    crop_pct, crop_mode), read from timm's registered pretrained_cfg without downloading anything."""
    check_arch(arch)
    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        raise ValueError(f"timm architecture {arch!r} has no registered pretrained_cfg to read a data config from")
    return resolve_data_config(pretrained_cfg=cfg.to_dict())


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head(s): ``pretrained_cfg['classifier']`` (e.g. ``"fc"``,
    ``"head.fc"``, or a tuple for distilled models), else the module returned by ``get_classifier()``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    classifier = cfg.get("classifier")
    if classifier:
        return (classifier,) if isinstance(classifier, str) else tuple(classifier)
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is not None:
        head = get_classifier()
        names = tuple(name for name, module in model.named_modules() if module is head and name)
        if names:
            return names
    raise ValueError(
        f"cannot tell the classifier head of {type(model).__name__}: no pretrained_cfg['classifier'] "
        "and no get_classifier()"
    )


def _is_head_key(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of ``model`` that belong to its classifier head."""
    prefixes = head_prefixes(model)
    return [k for k in model.state_dict() if _is_head_key(k, prefixes)]


def backbone_state(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``state`` without the keys of ``model``'s classifier head."""
    prefixes = head_prefixes(model)
    return {k: v for k, v in state.items() if not _is_head_key(k, prefixes)}


def _listed(keys: list[str]) -> str:
    more = f" … (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(repr(k) for k in keys[:MAX_LISTED]) + more


def check_backbone(model: nn.Module, state: dict[str, Tensor]) -> LoadReport:
    """Check that ``state`` fits ``model`` apart from the classifier head; raise StateDictMismatchError
    listing missing/unexpected backbone keys or naming a key whose shape differs."""
    prefixes = head_prefixes(model)
    target = model.state_dict()
    missing = [k for k in target if k not in state and not _is_head_key(k, prefixes)]
    unexpected = [k for k in state if k not in target and not _is_head_key(k, prefixes)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} backbone key(s): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_listed(unexpected)}")
    if problems:
        raise StateDictMismatchError(f"state dict does not fit {type(model).__name__}: " + "; ".join(problems))
    for key, value in state.items():
        if key in target and not _is_head_key(key, prefixes) and value.shape != target[key].shape:
            raise StateDictMismatchError(
                f"shape mismatch for {key!r}: state has {tuple(value.shape)}, "
                f"{type(model).__name__} expects {tuple(target[key].shape)}"
            )
    return LoadReport(
        missing=[k for k in target if _is_head_key(k, prefixes)],
        unexpected=[k for k in state if _is_head_key(k, prefixes)],
    )


def load_backbone(model: nn.Module, state: dict[str, Tensor]) -> LoadReport:
    """Load everything but the classifier head from ``state`` into ``model`` (whose head stays new).

    Strict for every non-head key: see :func:`check_backbone` for the errors raised.
    """
    report = check_backbone(model, state)
    model.load_state_dict(backbone_state(state, model), strict=False)
    return report
