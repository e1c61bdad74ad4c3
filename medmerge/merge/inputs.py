"""What a merge of one seed reads from the pipeline's model directories: its sources (aligned onto the
anchor if asked), the FT baselines a method that learns from their ensemble needs, and the learned merge
itself, reopened and collapsed into one model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from medmerge import layout
from medmerge.io import read_json
from medmerge.models import load_model_dir

if TYPE_CHECKING:
    from torch import Tensor, nn

    from medmerge.config import MergeSettings
    from medmerge.data.target import TargetData
    from medmerge.device import Runtime
    from medmerge.merge.functional import KernelMerge

# in the learn stage's output of a coefficient merge
MERGE_STATE = "merge_state.safetensors"  # logits, head, BN buffers: with the sources, the whole merge
PERMUTATIONS = "permutations.safetensors"  # when aligned: each non-anchor source's permutations
MODEL = "model"  # instead, the merged model of a method that builds it itself (a model dir, timm layout)


def load_sources(arch: str, names: list[str], sources_from: str, seed: int, anchor: str, align: str,
                 data: TargetData | None = None, runtime: Runtime | None = None) -> tuple:
    """Seed ``seed``'s sources (``models/<sources_from>/seed_<n>/<source>``), aligned onto ``anchor`` if asked:
    ``(sources, permutations, alignment report)``. Activation matching reads the sources' features on
    ``data``'s training images (unaugmented)."""
    from medmerge.merge.alignment import align_sources, align_sources_by_activations

    sources = [load_model_dir(layout.source_dir(sources_from, name, seed))[0] for name in names]
    if align == "weight_matching":
        return align_sources(arch, sources, names, anchor)
    if align == "activation_matching":
        return align_sources_by_activations(arch, sources, names, anchor, target_inputs(arch, data, runtime, seed),
                                            runtime.device)
    return sources, {}, {}


def target_inputs(arch: str, data: TargetData, runtime: Runtime, seed: int,
                  batch_size: int = 16) -> Callable[[], Iterator[Tensor]]:
    """A fresh iterator over the target training images, in order, normalised as the sources saw them."""
    from medmerge.train import make_transform

    transform = make_transform(arch, runtime, seed)
    return lambda: (transform(images) for images, _ in data.train.in_order(batch_size))


def load_teachers(method: str, names: list[str], seed: int) -> list[dict]:
    """Seed ``seed``'s FT baselines of every source, for merge ``method`` whose method learns from their
    ensemble (``needs_teachers``): as ``teachers@<method>-<seed>`` copied them from models/ft/seed_<n>."""
    return [load_model_dir(layout.seed_dir(layout.TEACHERS / method, seed) / name)[0] for name in names]


def reopen_merge(merge_dir: Path, settings: MergeSettings, seed: int) -> tuple[KernelMerge, dict]:
    """The coefficient merge the learn stage saved in ``merge_dir`` (its merge state, over seed ``seed``'s
    sources re-aligned with its saved permutations), and its merge.json."""
    from safetensors.torch import load_file

    from medmerge.merge.alignment import apply_saved_permutations, load_permutations
    from medmerge.merge.collapse import restore_merge_state
    from medmerge.methods import rebuild_merge

    info = read_json(merge_dir / "merge.json")
    names, arch = info["sources"], info["arch"]
    sources = [load_model_dir(layout.source_dir(info["sources_from"], name, seed))[0] for name in names]
    if (merge_dir / PERMUTATIONS).is_file():
        sources = apply_saved_permutations(arch, sources, names, load_permutations(merge_dir / PERMUTATIONS))
    merge = rebuild_merge(arch, sources, names, info["num_classes"], settings)
    restore_merge_state(merge, load_file(merge_dir / MERGE_STATE))
    return merge, info


def collapse_learned(merge_dir: Path, settings: MergeSettings, data: TargetData, runtime: Runtime,
                     seed: int) -> tuple[nn.Module, dict]:
    """The merge the learn stage saved in ``merge_dir`` as one ordinary model, in eval mode, and what it
    merged (merge.json, or the merged model's card): a coefficient merge collapsed once, a merged model the
    method built itself (``MODEL``) taken as it is; BatchNorm recalibrated on ``data`` when
    ``settings.bn_recalibration``, REPAIR first when ``settings.repair`` (coefficient merges)."""
    from medmerge.merge.collapse import collapse, recalibrate_on_target
    from medmerge.models import create_model

    recalibrate_on = data if settings.bn_recalibration else None
    if not (merge_dir / MODEL).is_dir():
        merge, info = reopen_merge(merge_dir, settings, seed)
        return collapse(merge, info["arch"], info["num_classes"], recalibrate_on, runtime, seed=seed,
                        repair_data=data if settings.repair else None), info
    state, info = load_model_dir(merge_dir / MODEL)
    model = create_model(info["arch"], num_classes=info["num_classes"])
    model.load_state_dict(state)
    model = runtime.prepare(model)
    if recalibrate_on is not None:
        recalibrate_on_target(model, info["arch"], recalibrate_on, runtime, seed)
    return model.eval(), info
