"""Resume checkpoints of the fit loop: a killed training run continues from its last finished epoch.

:func:`medmerge.train.fit` given a :class:`ResumeDir` writes, after every epoch, one checkpoint file holding
everything the loop carries into the next epoch: the model, the optimiser, the learning-rate schedule, the
gradient scaler, the random states of Python, NumPy and torch (and of the device), the loader's epoch (its
shuffle order), the augmentation stream of the :class:`~medmerge.data.loader.DeviceTransform`, the epochs
so far and the best-epoch bookkeeping of ``keep_best``. A rerun of the same fit loads it and continues, so on
the CPU it ends bit-identical to a run that was never interrupted.

A checkpoint belongs to exactly one fit: its file is named by the fit's :func:`fit_fingerprint`, a hash of
everything the fit starts from (the model's initial tensors and structure, the optimiser's settings and
which parameters it trains, the data, the loader and augmentation seeds, the runtime and the loop's own
arguments). A fit whose inputs changed finds no checkpoint and starts from epoch 0. Files are written
atomically with ``torch.save`` and read with ``torch.load(weights_only=True)``: plain tensors, numbers and
strings only, nothing that executes code. Corrupt or foreign files are ignored with a warning (resuming is
an optimisation, never a reason to fail).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medmerge.io import atomic_file

log = logging.getLogger("medmerge.resume")

FORMAT_VERSION = 1
#: images hashed per split for the fingerprint (evenly spaced; labels are hashed in full)
SAMPLED_IMAGES = 64


@dataclass(frozen=True)
class ResumeDir:
    """A directory of resume checkpoints, one file per fit (``fit-<fingerprint>.pt``)."""

    path: Path

    def file(self, fingerprint: str) -> Path:
        return self.path / f"fit-{fingerprint[:24]}.pt"

    def load(self, fingerprint: str) -> dict[str, Any] | None:
        """The checkpoint of the fit with ``fingerprint``, or None (none yet, or unreadable: then ignored)."""
        path = self.file(fingerprint)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a corrupt or foreign file: start again rather than fail
            log.warning("ignoring unreadable resume checkpoint %s (%s: %s)", path, type(error).__name__,
                        str(error).strip().splitlines()[0][:200] if str(error).strip() else "")
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION \
                or state.get("fingerprint") != fingerprint:
            log.warning("ignoring resume checkpoint %s: written for another fit or format", path)
            return None
        return state

    def save(self, fingerprint: str, state: Mapping[str, Any]) -> None:
        """Write ``state`` as this fit's checkpoint, atomically (a kill mid-write leaves the previous one)."""
        with atomic_file(self.file(fingerprint)) as temp:
            torch.save({"format": FORMAT_VERSION, "fingerprint": fingerprint, **state}, temp)

    def clear(self) -> None:
        """Remove every checkpoint (the stage that owns the directory succeeded)."""
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------- random states


def capture_rng(device: torch.device) -> dict[str, Any]:
    """The global random states of Python, NumPy and torch (and of ``device`` if it is a GPU), as plain data."""
    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device) -> None:
    """Set the global random states that :func:`capture_rng` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------- best-epoch state


def changed_tensors(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``state`` that differ from ``reference`` (the best epoch's state stored as a delta
    against the current one: frozen tensors, such as a merge's sources, are not stored twice)."""
    return {k: v for k, v in state.items()
            if k not in reference or v.shape != reference[k].shape or not torch.equal(v, reference[k])}


def with_unchanged(delta: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Undo :func:`changed_tensors`: ``reference`` (cloned) with ``delta`` applied, on ``reference``'s devices."""
    return {k: (delta[k].to(v.device) if k in delta else v.clone()) for k, v in reference.items()}


# ---------------------------------------------------------------- fingerprint of a fit


class _Digest:
    """sha256 over JSON-able values, tensors and arrays, each framed so that no two inputs collide."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def value(self, value: Any) -> None:
        self._frame(json.dumps(value, sort_keys=True, default=repr).encode())

    def array(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.value([str(array.dtype), list(array.shape)])
        self._frame(memoryview(array).cast("B"))

    def tensor(self, tensor: Tensor) -> None:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.value([str(tensor.dtype), list(tensor.shape)])
        self._frame(memoryview(flat.view(torch.uint8).numpy()))

    def _frame(self, data: bytes | memoryview) -> None:
        self._hash.update(len(data).to_bytes(8, "little"))
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def state_digest(states: Iterable[Mapping[str, Tensor]]) -> str:
    """A hash of some models' tensors (names, dtypes, shapes and values), for a fit whose loss depends on
    other models (distillation's teachers) to put in its fingerprint."""
    digest = _Digest()
    for state in states:
        for name, tensor in state.items():
            digest.value(name)
            digest.tensor(tensor)
    return digest.hexdigest()


def _digest_batches(digest: _Digest, batches: Any) -> None:
    """A split as the loop sees it: labels in full, a spread sample of images, and the batching settings."""
    images, labels = batches.images, batches.labels
    picks = np.unique(np.linspace(0, len(images) - 1, min(len(images), SAMPLED_IMAGES)).astype(np.int64))
    digest.value({"images": [str(images.dtype), list(images.shape)], "batch_size": batches.batch_size,
                  "shuffle": batches.shuffle, "seed": batches.seed, "drop_last": batches.drop_last,
                  "state": batches.state_dict()})
    digest.array(np.asarray(labels))
    if len(images):
        digest.array(np.asarray(images[picks]))


def fit_fingerprint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    splits: Iterable[Any],
    transform: Any,
    settings: Mapping[str, Any],
) -> str:
    """A hash of everything a fit starts from; two fits with the same fingerprint run the same epochs.

    ``splits``: the ``ArrayBatches`` the loop iterates (train, val); ``transform``: its ``DeviceTransform``;
    ``settings``: the loop's other arguments (epochs, augmentation, class weights...) as JSON-able values.
    Cost: one pass over the model's tensors plus :data:`SAMPLED_IMAGES` images per split.
    """
    digest = _Digest()
    runtime = transform.runtime
    digest.value({"settings": settings, "model": type(model).__qualname__, "structure": repr(model),
                  "runtime": [runtime.device.type, str(runtime.amp_dtype), runtime.channels_last, runtime.compile,
                              runtime.depthwise_taps],
                  "optimizer": type(optimizer).__qualname__})
    names = {id(p): name for name, p in model.named_parameters()}
    digest.value([{**{k: v for k, v in group.items() if k != "params"},
                   "params": [names.get(id(p), "?") for p in group["params"]]} for group in optimizer.param_groups])
    digest.value({name: p.requires_grad for name, p in model.named_parameters()})
    for name, tensor in model.state_dict().items():
        digest.value(name)
        digest.tensor(tensor)
    for batches in splits:
        _digest_batches(digest, batches)
    for tensor in (transform.mean, transform.std, *transform.state_dict().values()):
        digest.tensor(tensor)
    return digest.hexdigest()
