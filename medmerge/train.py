"""One fit loop for every training stage: pretraining, fine-tuning, learning merge coefficients; and the
classifier training that pretraining and the FT / LP-FT baselines run (:func:`train_classifier`).

What differs between stages (which parameters learn, at which rate, and which forward runs) is passed
in as a module and parameter groups; the loop itself is the same.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from medmerge import distributed
from medmerge.data.loader import ArrayBatches, DeviceTransform
from medmerge.device import Runtime
from medmerge.metrics import macro_f1
from medmerge.models import create_model, data_config, load_backbone
from medmerge.resume import (
    ResumeDir,
    capture_rng,
    changed_tensors,
    fit_fingerprint,
    restore_rng,
    with_unchanged,
)

if TYPE_CHECKING:
    from medmerge.config import TrainSettings
    from medmerge.data.target import TargetData

log = logging.getLogger("medmerge.train")

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda groups, weight_decay: torch.optim.AdamW(groups, weight_decay=weight_decay),
    "sgd": lambda groups, weight_decay: torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay),
}


class Criterion(Protocol):
    """A training loss for :func:`fit` other than cross-entropy: ``(logits, labels, images, class_weights)``
    to a scalar, and a JSON-able ``fingerprint()`` of everything it depends on (for resuming)."""

    def __call__(self, logits: Tensor, labels: Tensor, images: Tensor, class_weights: Tensor | None) -> Tensor: ...

    def fingerprint(self) -> object: ...


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_f1_macro: float


@dataclass
class History:
    epochs: list[EpochResult] = field(default_factory=list)
    best_epoch: int | None = None

    @property
    def best_val_f1(self) -> float:
        return max((e.val_f1_macro for e in self.epochs), default=math.nan)


def build_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """``groups``: torch param groups with ``params`` and ``lr``; empty groups are dropped."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; expected one of {sorted(OPTIMIZERS)}")
    groups = [g for g in groups if g["params"]]
    return OPTIMIZERS[name](groups, weight_decay)


@torch.no_grad()
def map_batches(
    compute: Callable[[Tensor], Tensor], model: nn.Module, batches: ArrayBatches, transform: DeviceTransform
) -> tuple[np.ndarray, np.ndarray]:
    """``compute(x)`` for every batch in order, in eval mode and under the runtime's autocast, and the labels."""
    model.eval()
    outputs, labels = [], []
    for images, targets in batches:
        with transform.runtime.autocast():
            output = compute(transform(images))
        outputs.append(output.float().cpu().numpy())
        labels.append(targets.numpy())
    return np.concatenate(outputs), np.concatenate(labels)


def predict(model: nn.Module, batches: ArrayBatches, transform: DeviceTransform) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and labels for every sample, in order (eval mode)."""
    return map_batches(lambda x: torch.softmax(model(x).float(), dim=1), model, batches, transform)


def predict_logits(model: nn.Module, batches: ArrayBatches, transform: DeviceTransform
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every sample, in order (eval mode)."""
    return map_batches(lambda x: model(x).float(), model, batches, transform)


def evaluate_loss_f1(
    model: nn.Module, batches: ArrayBatches, transform: DeviceTransform, num_classes: int
) -> tuple[float, float]:
    probabilities, labels = predict(model, batches, transform)
    loss = float(nn.functional.nll_loss(torch.from_numpy(np.log(probabilities + 1e-12)), torch.from_numpy(labels)))
    return loss, macro_f1(labels, probabilities.argmax(axis=1), num_classes)


def warmup_fraction(total_steps: int, warmup: float = 0.1) -> float:
    """OneCycleLR's ``pct_start``: ``warmup``, except where that makes the warm-up exactly one step (10 steps in
    all at 0.1), which OneCycleLR divides by zero on; that warm-up is stretched to 1.5 steps."""
    return 1.5 / total_steps if math.isclose(warmup * total_steps, 1.0) else warmup


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: ArrayBatches,
    val: ArrayBatches,
    transform: DeviceTransform,
    *,
    epochs: int,
    num_classes: int,
    augment: bool = True,
    keep_best: bool = True,
    class_weights: Tensor | None = None,
    before_validation: Callable[[], None] | None = None,
    on_epoch: Callable[[EpochResult], None] | None = None,
    description: str = "train",
    resume: ResumeDir | None = None,
    criterion: Criterion | None = None,
) -> History:
    """Train ``model`` with cross-entropy (or ``criterion``); validate by macro F1 after each epoch.

    With ``keep_best`` the state of the epoch with the best validation macro F1 is restored at the end.
    ``before_validation`` runs before each validation (a merge recalibrates its BatchNorm statistics there);
    ``on_epoch`` receives each epoch's result (the stages log it to MLflow). ``criterion`` replaces the
    training loss: it is called, under the runtime's autocast, with the batch's float32 logits, labels, the
    (augmented) images the model saw and the class weights (distillation's teacher runs on those images);
    its ``fingerprint()`` (JSON-able) enters the resume fingerprint. Validation is unchanged.

    With ``resume`` a checkpoint of the whole loop state is written there after every epoch
    (``medmerge.resume``); a later call with the same inputs (same :func:`~medmerge.resume.fit_fingerprint`)
    continues after the last saved epoch, first passing the saved epochs' results to ``on_epoch`` again, and
    ends as an uninterrupted run would (bit-identical on the CPU). A fit that had finished does not train again.

    Under ``torchrun`` (an initialised process group, see ``medmerge.distributed``) the model is wrapped
    in DistributedDataParallel and each process trains on its shard of every global batch of ``train``;
    BatchNorm normalises with each process's own batch statistics. Validation runs on the whole ``val``
    split in every process (rank 0's result decides ``keep_best`` everywhere), and every process returns
    the same model; the reported train loss is the mean over processes. Rank 0 writes the resume checkpoints
    and every process resumes from them.
    """
    runtime = transform.runtime
    history = History()
    scaler = runtime.grad_scaler()
    fingerprint = None
    if resume is not None:  # before the schedule rewrites the learning rates and the loader is sharded
        fingerprint = fit_fingerprint(model, optimizer, (train, val), transform, {
            "epochs": epochs, "num_classes": num_classes, "augment": augment, "keep_best": keep_best,
            "class_weights": None if class_weights is None else class_weights.tolist(),
            "before_validation": before_validation is not None, "world_size": distributed.world_size(),
            **({} if criterion is None else {"criterion": criterion.fingerprint()})})
    rank, world = distributed.rank(), distributed.world_size()
    if distributed.is_distributed():
        train, transform = train.shard(rank, world), transform.shard(rank, world)
    trained = distributed.wrap(model, runtime.device)
    step = torch.compile(trained) if runtime.compile else trained
    weights = class_weights.to(runtime.device) if class_weights is not None else None
    best_state, best_f1 = None, -math.inf
    total_steps = epochs * len(train)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total_steps, 1),
        pct_start=warmup_fraction(total_steps),
    ) if total_steps else None
    resumable = {"optimizer": optimizer, "scaler": scaler, "train": train, "transform": transform}
    if scheduler is not None:
        resumable["scheduler"] = scheduler
    saved = resume.load(fingerprint) if resume is not None else None
    if saved is not None:
        best_state, best_f1 = _restore(saved, model, resumable, history, runtime.device)
        log.info("%s: resuming after epoch %d of %d from %s", description, len(history.epochs), epochs,
                 resume.file(fingerprint))
        if on_epoch is not None:
            for result in history.epochs:
                on_epoch(result)
    first = len(history.epochs) + 1
    quiet = {} if distributed.is_main() else {"disable": True}  # not disable=False: TQDM_DISABLE still applies
    with tqdm(total=total_steps, initial=(first - 1) * len(train), desc=description, unit="step",
              dynamic_ncols=True, mininterval=1.0, **quiet) as bar:
        for epoch in range(first, epochs + 1):
            trained.train()
            running, seen = 0.0, 0
            for images, labels in train:
                x, y = transform(images, augment=augment), labels.to(runtime.device)
                with runtime.autocast(), runtime.training_ops():
                    if criterion is None:
                        loss = nn.functional.cross_entropy(step(x).float(), y, weight=weights)
                    else:
                        loss = criterion(step(x).float(), y, x, weights)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                running += loss.detach().item() * len(y)
                seen += len(y)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{running / seen:.4f}")
            running, seen = distributed.all_reduce_sum([running, seen])
            distributed.broadcast_buffers(model)
            if before_validation is not None:
                before_validation()
            val_loss, val_f1 = distributed.broadcast_floats(evaluate_loss_f1(model, val, transform, num_classes))
            result = EpochResult(epoch, running / max(seen, 1), val_loss, val_f1)
            history.epochs.append(result)
            log.info("%s epoch %d: train loss %.4f, val loss %.4f, val macro F1 %.4f",
                     description, epoch, result.train_loss, val_loss, val_f1)
            if on_epoch is not None:
                on_epoch(result)
            if keep_best and val_f1 > best_f1:
                best_f1, history.best_epoch = val_f1, epoch
                best_state = copy.deepcopy(model.state_dict())
            if resume is not None and distributed.is_main():
                resume.save(fingerprint, _checkpoint(model, resumable, history, best_state, best_f1,
                                                     runtime.device))
    if keep_best and best_state is not None:
        model.load_state_dict(best_state)
        log.info("%s: restored epoch %d (best val macro F1 %.4f)", description, history.best_epoch, best_f1)
    return history


def _checkpoint(model: nn.Module, resumable: dict, history: History, best_state: dict | None, best_f1: float,
                device: torch.device) -> dict:
    """The loop's whole state after an epoch, as plain data for :meth:`ResumeDir.save`."""
    current = model.state_dict()
    return {
        "model": current,
        **{name: part.state_dict() for name, part in resumable.items()},
        "rng": capture_rng(device),
        "epochs": [dataclasses.asdict(e) for e in history.epochs],
        "best_epoch": history.best_epoch,
        "best_f1": best_f1,
        "best_state": None if best_state is None else changed_tensors(best_state, current),
    }


def _restore(saved: dict, model: nn.Module, resumable: dict, history: History, device: torch.device
             ) -> tuple[dict | None, float]:
    """Put the state of :func:`_checkpoint` back; returns the best epoch's state and score."""
    model.load_state_dict(saved["model"])
    for name, part in resumable.items():
        part.load_state_dict(saved[name])
    restore_rng(saved["rng"], device)
    history.epochs[:] = [EpochResult(**e) for e in saved["epochs"]]
    history.best_epoch = saved["best_epoch"]
    best = saved["best_state"]
    return (None if best is None else with_unchanged(best, model.state_dict())), saved["best_f1"]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: ArrayBatches, transform: DeviceTransform) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (a cumulative average).

    Returns the number of norm layers reset. Weights are untouched.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for images, _ in batches:
        with transform.runtime.autocast():
            model(transform(images))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return len(norms)


def extract_features(model: nn.Module, batches: ArrayBatches, transform: DeviceTransform) -> tuple[np.ndarray, np.ndarray]:
    """The pooled features a timm model's classifier sees (``forward_head(pre_logits=True)``), and labels."""
    return map_batches(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), model, batches,
                       transform)


def logistic_regression(features: np.ndarray, labels: np.ndarray, num_classes: int, class_weighted: bool = False,
                        c: float = 1.0, max_iter: int = 2000, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression with scikit-learn's defaults (L2 penalty ``1 / (2c)·‖W‖²``, the
    intercept unpenalised, L-BFGS until no gradient entry of the mean objective exceeds ``tol``), in float64:
    the weight ``(num_classes, features)`` and bias.

    It runs on torch, not scikit-learn, because its sums then run on the kernels ``device.cpu_kernels`` holds:
    scikit-learn's loss goes through NumPy's ``exp``/``log`` and OpenBLAS, whose code paths (and last bits)
    NumPy and OpenBLAS pick by instruction set. A class absent from ``labels`` gets a bias of -1e4.
    ``class_weighted`` weighs each sample by ``n / (k·count of its class)`` (scikit-learn's "balanced").
    """
    seen = np.unique(labels)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float64))
    index = torch.from_numpy(np.searchsorted(seen, labels).astype(np.int64))
    sample_weight = torch.ones(len(labels), dtype=torch.float64)
    if class_weighted:
        sample_weight = (len(labels) / (len(seen) * torch.bincount(index).double()))[index]
    weight = torch.zeros(len(seen), x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(seen), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                                  tolerance_change=0.0, history_size=10, line_search_fn="strong_wolfe")

    def objective() -> Tensor:  # scikit-learn's objective divided by the summed sample weights
        optimizer.zero_grad()
        losses = nn.functional.cross_entropy(x @ weight.T + bias, index, reduction="none")
        loss = ((losses * sample_weight).sum() + weight.square().sum() / (2 * c)) / sample_weight.sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    full_weight = np.zeros((num_classes, x.shape[1]), dtype=np.float32)
    full_bias = np.full(num_classes, -1e4, dtype=np.float32)  # a class absent from training is never predicted
    full_weight[seen], full_bias[seen] = weight.detach().numpy(), bias.detach().numpy()
    return full_weight, full_bias


def fit_linear_probe(
    model: nn.Module,
    train: ArrayBatches,
    transform: DeviceTransform,
    num_classes: int,
    class_weighted: bool = False,
) -> float:
    """Set ``model``'s classifier to a logistic regression fitted on its frozen features (the "LP" of LP-FT).

    L-BFGS on the features of every training image (no augmentation), as in Kumar et al. (2022)
    (:func:`logistic_regression`). Returns the probe's training accuracy. The backbone, including BatchNorm
    statistics, is untouched.
    """
    in_order = train.in_order(max(train.batch_size, 64))
    features, labels = extract_features(model, in_order, transform)
    weight, bias = logistic_regression(features, labels, num_classes, class_weighted)
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"a linear probe needs a Linear classifier, got {type(head).__name__}")
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).to(head.weight))
        head.bias.copy_(torch.from_numpy(bias).to(head.bias))
    logits = torch.from_numpy(features).double() @ torch.from_numpy(weight).double().T + torch.from_numpy(bias)
    return float((logits.argmax(dim=1).numpy() == labels).mean())


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
    criterion: Criterion | None = None,
) -> tuple[nn.Module, History]:
    """A timm model for ``data``'s classes from ``init_state``, fully trained.

    The head is replaced by a new one for ``data``'s classes unless ``keep_head`` (then the state must fit
    exactly, as a collapsed merged model does). With ``linear_probe`` the new head is first fitted on the
    frozen backbone's features, then everything is fine-tuned (LP-FT, Kumar et al. 2022). ``resume``: where
    the fine-tune keeps its per-epoch resume checkpoints; ``criterion``: its training loss, cross-entropy if
    None (see :func:`medmerge.train.fit`).
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
        criterion=criterion,
    )
    return model, history
