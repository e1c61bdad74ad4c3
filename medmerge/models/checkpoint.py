"""Safe checkpoint I/O: untrusted files never execute code; model dirs are safetensors + JSON, written atomically.

A model dir is in timm's pretrained layout: ``model.safetensors`` (the one weights file), ``config.json``
(what ``timm.create_model("local-dir:<dir>", pretrained=True)`` reads, see :mod:`medmerge.models.export`)
and ``card.json`` (the pipeline's card: the caller's keys plus ``sha256`` of the weights file and
``num_parameters``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from medmerge.errors import InputError
from medmerge.io import atomic_directory
from medmerge.models.export import CONFIG_FILE, timm_config

__all__ = [
    "CALLER_CARD_KEYS",
    "CARD_FILE",
    "CONFIG_FILE",
    "REQUIRED_CARD_KEYS",
    "STATE_DICT_LOADERS",
    "WEIGHTS_FILE",
    "CheckpointError",
    "count_parameters",
    "load_model_dir",
    "load_state_dict_file",
    "save_model_dir",
    "sha256_file",
    "unwrap_state_dict",
]

WEIGHTS_FILE = "model.safetensors"  # the name timm's local-dir and Hugging Face Hub loaders look for
CARD_FILE = "card.json"
#: keys the caller's card must hold (``sha256`` and ``num_parameters`` are added on save)
CALLER_CARD_KEYS = ("arch", "num_classes")
REQUIRED_CARD_KEYS = (*CALLER_CARD_KEYS, "sha256")

#: keys under which training checkpoints commonly nest the model's tensors, in order of preference
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema", "model_ema",
                "state_dict_ema")
#: key prefixes added by DistributedDataParallel / DataParallel and torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: BatchNorm buffers, not counted by :func:`count_parameters`
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


class CheckpointError(ValueError, InputError):
    """A checkpoint or model dir is unsafe, corrupt, or not what was expected."""


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _load_safetensors(path: Path) -> Any:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


#: how a file saved by ``torch.save`` begins: a zip archive (torch >= 1.6) or a pickle (protocol 2-5)
TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
EXPECTED_FORMATS = "expected a safetensors file or a torch state dict saved with torch.save"


def _looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file begins with the 8-byte little-endian length of its JSON header, then ``{``."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _load_torch(path: Path) -> Any:
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):  # a safetensors file under a torch suffix: still safe to read
        return _load_safetensors(path)
    if not head.startswith(TORCH_SAVE_MAGIC):
        start = f"starts with bytes {head[:8].hex(' ')}" if head else "is empty"
        raise CheckpointError(f"cannot read {path}: {EXPECTED_FORMATS}, but the file {start} (is it corrupt "
                              "or truncated?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: not plain tensors (the pickle needs globals outside torch's "
            f"weights_only allowlist; convert it to safetensors where it is trusted). Details: {str(e)[:300]}"
        ) from e
    except Exception as e:  # a truncated zip or pickle: RuntimeError, EOFError, IndexError...
        raise CheckpointError(
            f"cannot read {path}: {EXPECTED_FORMATS}; it starts like a torch.save file but does not load "
            f"({type(e).__name__}: {str(e)[:200]}; is it corrupt or truncated?)"
        ) from e


#: file suffix -> loader returning the raw (possibly wrapped) checkpoint object
STATE_DICT_LOADERS: dict[str, Callable[[Path], Any]] = {
    ".safetensors": _load_safetensors,
    ".pt": _load_torch,
    ".pth": _load_torch,
    ".bin": _load_torch,
    ".ckpt": _load_torch,
}


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return _strip_prefix({k[len(prefix):]: v for k, v in state.items()})
    return state


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """Find the state dict in a loaded checkpoint: descend through wrapper keys (``state_dict``, ``model``,
    ``ema``…) and strip a ``module.``/``_orig_mod.`` prefix. Every value must then be a Tensor."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"refusing to load {source}: holds a {type(obj).__name__}, not a dict of tensors")
    while not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    state = _strip_prefix(dict(obj))
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"refusing to load {source}: not plain tensors; key {key!r} holds a {type(value).__name__}"
            )
    if not state:
        raise CheckpointError(f"{source} holds no tensors")
    return state


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load a state dict from ``.safetensors`` or a weights-only torch pickle (``.pt``/``.pth``/``.bin``/
    ``.ckpt``) on the CPU, unwrapping common checkpoint wrappers. Never executes code from the file."""
    path = Path(path)
    loader = STATE_DICT_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise CheckpointError(f"unsupported checkpoint suffix {path.suffix!r} of {path}; expected one of "
                              f"{sorted(STATE_DICT_LOADERS)}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return unwrap_state_dict(loader(path), source=str(path))


def count_parameters(state: Mapping[str, Tensor]) -> int:
    """Number of elements in ``state``, BatchNorm running statistics excluded (what ``model.parameters()``
    counts for typical CNNs)."""
    return sum(v.numel() for k, v in state.items() if not k.endswith(BUFFER_SUFFIXES))


def _plain_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies that share no storage (safetensors refuses shared tensors)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_dir(tmp: Path, state: Mapping[str, Tensor], card: Mapping[str, Any]) -> None:
    weights = tmp / WEIGHTS_FILE
    safetensors.torch.save_file(_plain_tensors(state), str(weights))
    full_card = {**card, "sha256": sha256_file(weights), "num_parameters": count_parameters(state)}
    _write_json(tmp / CARD_FILE, full_card)
    _write_json(tmp / CONFIG_FILE, timm_config(full_card))


def model_state_cpu(model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``model``'s state on the CPU, contiguous: what a model directory saves."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model_dir(out_dir: str | os.PathLike[str], state: Mapping[str, Tensor], card: Mapping[str, Any]) -> None:
    """Write ``model.safetensors`` + ``card.json`` + ``config.json`` to ``out_dir`` atomically.

    ``card`` must hold ``arch`` and ``num_classes``; ``classes`` (label names) and ``input`` (the
    preprocessing, :func:`medmerge.models.export.input_card`) go into ``config.json`` in timm's terms.

    Everything is written to a sibling temp dir ``.{name}.tmp-*`` first; the old dir (if any) is moved
    aside, the new one renamed into place, then the old one deleted. A failure leaves the old dir intact.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"cannot write model dir {out_dir}: a file of that name exists")
    missing = [k for k in CALLER_CARD_KEYS if k not in card]
    if missing:
        raise CheckpointError(f"card for {out_dir} lacks required key(s) {missing}")
    with atomic_directory(out_dir) as tmp:
        _write_dir(tmp, state, card)


def write_pointer_dir(out_dir: str | os.PathLike[str], target_dir: str | os.PathLike[str],
                      extra: Mapping[str, Any] | None = None) -> None:
    """A model directory holding only a card that points at ``target_dir``'s weights (checked by sha256)."""
    card = {**_read_card(Path(target_dir) / CARD_FILE), **(extra or {}), "weights_from": str(target_dir)}
    with atomic_directory(out_dir) as tmp:
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def _read_card(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"model card not found: {path}")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"model card {path} is not valid JSON: {e}") from e
    if not isinstance(card, dict):
        raise CheckpointError(f"model card {path} must hold a JSON object, got {type(card).__name__}")
    missing = [k for k in REQUIRED_CARD_KEYS if k not in card]
    if missing:
        raise CheckpointError(f"model card {path} lacks required key(s) {missing}")
    return card


def load_model_dir(model_dir: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state, card)`` from a dir written by :func:`save_model_dir`, after checking the card's sha256.

    A card with ``weights_from`` (a directory, relative to the working directory) points at another model
    directory's weights instead of holding its own (a source used as given: see :func:`write_pointer_dir`).
    """
    model_dir = Path(model_dir)
    card = _read_card(model_dir / CARD_FILE)
    weights = Path(card.get("weights_from", model_dir)) / WEIGHTS_FILE  # a pointer dir: weights live there
    if not weights.is_file():
        raise CheckpointError(f"weights file not found: {weights}")
    actual = sha256_file(weights)
    if actual != card["sha256"]:
        raise CheckpointError(
            f"sha256 mismatch for {weights}: card.json records {card['sha256']}, the file has {actual}"
        )
    return _load_safetensors(weights), card
