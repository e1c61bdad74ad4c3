"""Permutations on disk: ``{source: {space: perm}}`` as one safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from medmerge.merge.alignment.spec import AlignmentError


def save_permutations(permutations: dict[str, dict[str, Tensor]], path: Path) -> None:
    """``{source: {space: perm}}`` as one safetensors file with keys ``<source>/<space>``."""
    flat = {f"{source}/{space}": perm.contiguous() for source, perms in permutations.items()
            for space, perm in perms.items()}
    save_file(flat, str(path))


def load_permutations(path: Path) -> dict[str, dict[str, Tensor]]:
    """The inverse of :func:`save_permutations`; loads tensors only (no code runs)."""
    nested: dict[str, dict[str, Tensor]] = {}
    for key, perm in load_file(str(path)).items():
        source, sep, space = key.partition("/")
        if not sep or perm.dtype != torch.int64 or perm.dim() != 1:
            raise AlignmentError(f"{path}: '{key}' is not a '<source>/<space>' int64 permutation")
        nested.setdefault(source, {})[space] = perm
    return nested
