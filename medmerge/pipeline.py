"""The work of each training stage as plain functions over arrays, state dicts and settings.

Nothing here knows about DVC or MLflow: the stage scripts read params, call these and log the results.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from medmerge.config import MergeSettings, TrainSettings
from medmerge.data.loader import ArrayBatches, DeviceTransform, place_on_device
from medmerge.data.prepare import load_split, read_meta
from medmerge.device import Runtime
from medmerge.merge.alignment import (
    PermutationSpec,
    alignment_similarity,
    apply_permutations,
    permutation_spec,
    weight_matching,
)
from medmerge.merge.coefficients import NORMALIZERS, initial_weights, resolve_normalizer
from medmerge.merge.functional import KernelMerge
from medmerge.merge.repair import activation_statistics, interpolated_statistics, repair, repairable_layers
from medmerge.metrics import classification_metrics
from medmerge.models import backbone_state, create_model, data_config, head_keys, load_backbone
from medmerge.predictions import SPLITS, SplitPredictions
from medmerge.resume import ResumeDir
from medmerge.train import (
    EpochResult,
    History,
    build_optimizer,
    evaluate_loss_f1,
    fit,
    fit_linear_probe,
    inverse_frequency_weights,
    predict,
    predict_logits,
    recalibrate_batchnorm,
)

log = logging.getLogger("medmerge.pipeline")


@dataclass
class TargetData:
    """A prepared dataset's splits as batch iterators plus its class names."""

    train: ArrayBatches
    val: ArrayBatches
    test: ArrayBatches
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_weights(self) -> Tensor:
        """Inverse-frequency loss weights from the training split."""
        return inverse_frequency_weights(self.train.labels, self.num_classes)

    def with_train_batch_size(self, batch_size: int) -> TargetData:
        """The same splits (device copies included), the training split in batches of ``batch_size``, from
        its first epoch: what :func:`open_dataset` with that batch size gives, without opening it again."""
        train = replace(self.train, batch_size=batch_size, drop_last=_drops_last(len(self.train.labels), batch_size))
        return replace(self, train=train)


def _drops_last(count: int, batch_size: int) -> bool:
    """A training split of ``count`` samples, larger than one batch, drops its last partial batch each epoch."""
    return count > batch_size


def open_dataset(
    prepared_dir: Path,
    batch_size: int,
    eval_batch_size: int = 256,
    seed: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    device: torch.device | None = None,
    device_cache_fraction: float = 0.0,
) -> TargetData:
    """Memory-map a prepared dataset; the training split is shuffled every epoch. With ``device`` the splits
    that fit in ``device_cache_fraction`` of its free memory are held there (``place_on_device``)."""
    meta = read_meta(prepared_dir)
    splits = {name: load_split(prepared_dir, name) for name in ("train", "val", "test")}
    io = {"workers": workers, "pin_memory": pin_memory}
    batches = [
        ArrayBatches(*splits["train"], batch_size=batch_size, shuffle=True, seed=seed,
                     drop_last=_drops_last(len(splits["train"][1]), batch_size), **io),
        ArrayBatches(*splits["val"], batch_size=eval_batch_size, **io),
        ArrayBatches(*splits["test"], batch_size=eval_batch_size, **io),
    ]
    if device is not None:
        batches = place_on_device(batches, device, device_cache_fraction)
        held = [name for name, b in zip(("train", "val", "test"), batches, strict=True) if b.device_images is not None]
        if held:
            log.info("holding the %s split(s) of %s on %s", "/".join(held), prepared_dir.name, device)
    return TargetData(*batches, classes=list(meta["classes"]))


def make_transform(arch: str, runtime: Runtime, seed: int = 0) -> DeviceTransform:
    """Normalisation from the architecture's timm config (mean = std = 0.5 for the tf_ EfficientNets)."""
    config = data_config(arch)
    return DeviceTransform(config["mean"], config["std"], runtime, seed=seed)


def train_classifier(
    arch: str,
    init_state: dict[str, Tensor],
    data: TargetData,
    settings: TrainSettings,
    runtime: Runtime,
    *,
    epochs: int | None = None,
    seed: int = 0,
    keep_head: bool = False,
    linear_probe: bool = False,
    on_epoch: Callable[[EpochResult], None] | None = None,
    description: str = "train",
    resume: ResumeDir | None = None,
) -> tuple[nn.Module, History]:
    """A timm model for ``data``'s classes from ``init_state``, fully trained.

    The head is replaced by a new one for ``data``'s classes unless ``keep_head`` (then the state must fit
    exactly, as a collapsed merged model does). With ``linear_probe`` the new head is first fitted on the
    frozen backbone's features, then everything is fine-tuned (LP-FT, Kumar et al. 2022). ``resume``: where
    the fine-tune keeps its per-epoch resume checkpoints (see :func:`medmerge.train.fit`).
    """
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=data.num_classes)
    if keep_head:
        model.load_state_dict(init_state, strict=True)
    else:
        report = load_backbone(model, init_state)
        log.info("%s: loaded backbone, new head %s", description, report.missing)
    model = runtime.prepare(model)
    transform = make_transform(arch, runtime, seed)
    if linear_probe:
        accuracy = fit_linear_probe(model, data.train, transform, data.num_classes, settings.class_weighted)
        log.info("%s: linear probe fitted (train accuracy %.4f)", description, accuracy)
    optimizer = build_optimizer(
        settings.optimizer, [{"params": list(model.parameters()), "lr": settings.lr}], settings.weight_decay
    )
    history = fit(
        model, optimizer, data.train, data.val, transform,
        epochs=settings.epochs if epochs is None else epochs, num_classes=data.num_classes,
        augment=settings.augment, keep_best=settings.keep_best, on_epoch=on_epoch, description=description,
        class_weights=data.class_weights() if settings.class_weighted else None, resume=resume,
    )
    return model, history


def build_kernel_merge(
    arch: str,
    sources: Sequence[dict[str, Tensor]],
    source_names: Sequence[str],
    num_classes: int,
    settings: MergeSettings,
    seed: int = 0,
    fixed_weights: Sequence[float] | None = None,
) -> KernelMerge:
    """The functional merged model for ``settings`` (granularity, normalisation, anchor, initial weight).

    With ``fixed_weights`` (one per source, summing to one) the merge is a plain weighted average: one
    frozen coefficient per source (``average``, ``interpolate``). Without them it is MedMerge's learnable
    blend, starting with ``settings.init_coefficient`` on the anchor.
    """
    torch.manual_seed(seed)
    skeleton = create_model(arch, num_classes=num_classes)
    anchor = list(source_names).index(settings.anchor)
    if fixed_weights is not None:
        weights = torch.tensor(list(fixed_weights), dtype=torch.float32)
        if len(weights) != len(sources) or abs(float(weights.sum()) - 1.0) > 1e-6 or bool((weights < 0).any()):
            raise ValueError(f"fixed merge weights must be one non-negative weight per source summing to 1, "
                             f"got {list(fixed_weights)}")
        merge = KernelMerge(skeleton, sources, source_names, head_keys(skeleton), "model", NORMALIZERS["softmax"],
                            weights)
        merge.logits.requires_grad_(False)
        return merge
    trainable = [settings.train_sources and i != anchor for i in range(len(sources))]
    return KernelMerge(
        skeleton,
        sources,
        source_names,
        head_keys(skeleton),
        settings.granularity,
        resolve_normalizer(settings.normalization, len(sources)),
        initial_weights(len(sources), anchor, settings.init_coefficient),
        trainable,
    )


def learn_kernel_weights(
    merge: KernelMerge,
    arch: str,
    data: TargetData,
    settings: MergeSettings,
    runtime: Runtime,
    *,
    seed: int = 0,
    on_epoch: Callable[[EpochResult], None] | None = None,
    resume: ResumeDir | None = None,
) -> History:
    """Learn the coefficients (and the new head; and non-anchor sources if ``train_sources``); ``resume`` as
    in :func:`medmerge.train.fit`."""
    merge = runtime.prepare(merge)
    groups = merge.learnable_groups()
    optimizer = build_optimizer(
        "adamw",
        [
            {"params": groups["coefficients"], "lr": settings.lr, "weight_decay": 0.0},
            {"params": groups["head"], "lr": settings.head_lr},
            {"params": groups["sources"], "lr": settings.source_lr},
        ],
        weight_decay=1e-4,
    )
    transform = make_transform(arch, runtime, seed)
    # The merged weights change every step, so BatchNorm running statistics lag behind them; validate
    # with statistics recomputed on the training split, exactly as collapse will.
    train_in_order = data.train.in_order(data.val.batch_size)
    return fit(
        merge, optimizer, data.train, data.val, transform,
        epochs=settings.epochs, num_classes=data.num_classes, augment=True, keep_best=True,
        before_validation=lambda: recalibrate_batchnorm(merge, train_in_order, transform),
        class_weights=data.class_weights() if settings.class_weighted else None,
        on_epoch=on_epoch, description="learn kernel weights", resume=resume,
    )


def merge_state_to_save(merge: KernelMerge) -> dict[str, Tensor]:
    """What collapse needs besides the sources: logits, head, BN buffers and any trained source weights."""
    frozen = {name for name, p in merge.named_parameters() if name.startswith("sources.") and not p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in merge.state_dict().items() if k not in frozen}


def restore_merge_state(merge: KernelMerge, state: dict[str, Tensor]) -> None:
    """Load ``merge_state_to_save`` output; anything else missing or unexpected is an error."""
    result = merge.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("sources.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"merge state does not fit the sources: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def collapse(
    merge: KernelMerge, arch: str, num_classes: int, data: TargetData | None, runtime: Runtime, seed: int = 0,
    repair_data: TargetData | None = None,
) -> nn.Module:
    """Apply the coefficients once: an ordinary timm model.

    With ``repair_data``, REPAIR (``medmerge.merge.repair``) first gives every merged conv/linear layer with
    a bias the per-channel output statistics of the sources, interpolated by the layer's coefficients, on
    ``repair_data.train``. BatchNorm statistics are then recalibrated on ``data.train`` if given; without
    ``data`` they are the sources' statistics blended by the same coefficients as their layer's weights
    (what a merge without recalibration has).
    """
    model = create_model(arch, num_classes=num_classes)
    model.load_state_dict(merge.collapsed_state_dict(blend_buffers=data is None), strict=True)
    model = runtime.prepare(model)
    if repair_data is not None:
        count = repair_merged(model, merge, repair_data.train, make_transform(arch, runtime, seed))
        log.info("REPAIR corrected %d layers on %d target training images", count, len(repair_data.train.images))
    if data is not None:
        count = recalibrate_batchnorm(model, data.train, make_transform(arch, runtime, seed))
        log.info("recalibrated %d BatchNorm layers on %d target training images", count, len(data.train.images))
    return model.eval()


def repair_merged(model: nn.Module, merge: KernelMerge, batches: ArrayBatches, transform: DeviceTransform) -> int:
    """REPAIR ``model`` (the collapse of ``merge``): measure each source under the same skeleton, interpolate
    their statistics with the merge's per-channel weights, fold the correction into ``model``'s layers."""
    layers = repairable_layers(model, merge.merged_keys)
    if not layers:
        return 0

    def inputs():
        return (transform(images) for images, _ in batches)

    per_source = []
    probe = copy.deepcopy(model)
    for index in range(len(merge.sources)):
        probe.load_state_dict(merge.source_state(index), strict=True)
        per_source.append(activation_statistics(probe, layers, inputs))
    del probe
    weights = merge.group_weights()
    targets = interpolated_statistics(per_source, lambda name, channels: merge.channel_weights(name, channels, weights))
    return repair(model, targets, inputs)


def test_metrics(model: nn.Module, arch: str, data: TargetData, runtime: Runtime) -> dict:
    """Every reported metric on the test split, plus the confusion matrix."""
    probabilities, labels = predict(runtime.prepare(model), data.test, make_transform(arch, runtime))
    return classification_metrics(labels, probabilities, data.classes)


def split_predictions(model: nn.Module, arch: str, data: TargetData, runtime: Runtime) -> dict[str, SplitPredictions]:
    """The model's logits on the validation and test splits (what ``evaluate`` compares)."""
    model, transform = runtime.prepare(model), make_transform(arch, runtime)
    return {split: SplitPredictions(*predict_logits(model, getattr(data, split), transform)) for split in SPLITS}


def model_state_cpu(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def validation_f1(model: nn.Module, arch: str, data: TargetData, runtime: Runtime) -> float:
    """Macro F1 on the validation split."""
    return evaluate_loss_f1(model, data.val, make_transform(arch, runtime), data.num_classes)[1]


@functools.lru_cache(maxsize=4)
def alignment_skeleton(arch: str) -> tuple[nn.Module, PermutationSpec]:
    """A model of ``arch`` (to tell its head from its backbone) and its permutation spec, traced once per
    process and shared by :func:`align_sources` and :func:`apply_saved_permutations`."""
    skeleton = create_model(arch, num_classes=2)
    return skeleton, permutation_spec(skeleton)


def align_sources(
    arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str], anchor: str, seed: int = 0
) -> tuple[list[dict[str, Tensor]], dict[str, dict[str, Tensor]], dict[str, dict[str, float]]]:
    """Permute every non-anchor source's hidden units onto the anchor's (weight matching, Git Re-Basin).

    The permutation structure comes from tracing the architecture (``medmerge.merge.alignment``); the
    sources' own heads are left out (they classify different source tasks). Returns the aligned backbones,
    the permutations per source (space -> index tensor) and, per source, the weight similarity to the anchor
    before and after.
    """
    skeleton, spec = alignment_skeleton(arch)
    backbones = [backbone_state(state, skeleton) for state in sources]
    reference = backbones[list(source_names).index(anchor)]
    aligned, permutations, report = [], {}, {}
    for name, state in zip(source_names, backbones, strict=True):
        if name == anchor:
            aligned.append(state)
            continue
        perms = weight_matching(spec, reference, state, seed=seed)
        aligned.append(apply_permutations(spec, perms, state))
        permutations[name] = perms
        report[name] = {"similarity_before": alignment_similarity(spec, reference, state),
                        "similarity_after": alignment_similarity(spec, reference, aligned[-1])}
        log.info("aligned %s to %s: weight similarity %.4g -> %.4g", name, anchor,
                 report[name]["similarity_before"], report[name]["similarity_after"])
    return aligned, permutations, report


def apply_saved_permutations(
    arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str], permutations: dict[str, dict]
) -> list[dict[str, Tensor]]:
    """Re-apply permutations that :func:`align_sources` found (``collapse`` rebuilds the aligned sources)."""
    skeleton, spec = alignment_skeleton(arch)
    return [apply_permutations(spec, permutations[name], backbone_state(state, skeleton))
            if name in permutations else backbone_state(state, skeleton)
            for name, state in zip(source_names, sources, strict=True)]
