"""Typed, validated settings: the one reader of ``params.yaml``.

Every section is a pydantic model that forbids unknown keys, so a typo such as ``merge.lrr`` stops the
pipeline before any work is done, with a message that names the file, the key and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from medmerge.errors import InputError

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError, InputError):
    """A params file that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _registered(kind: str, name: str, registry: dict) -> str:
    if name not in registry:
        raise ValueError(f"unknown {kind} '{name}'; expected one of {sorted(registry)}")
    return name


def _default_workers() -> int:
    from medmerge.data.prepare import default_workers

    return default_workers()


class DatasetSettings(_Section):
    """Where one dataset comes from (``origin`` picks a fetcher in ``medmerge.data.fetch.DATA_ORIGINS``) and
    how it is prepared (docs/data_sources.md)."""

    origin: str
    options: dict[str, Any] = Field(default_factory=dict)
    classes: list[str] | None = None
    resize: Literal["squash", "pad", "center_crop"] = "squash"  # aspect ratio: stretch | letterbox | crop
    ordinal: bool = False  # graded labels (e.g. retinopathy 0-4): ordinal metrics apply
    allow_missing_classes: bool = False  # a train split without some class: error unless true
    train_fraction: float | None = Field(None, gt=0, le=1)  # keep this fraction of every training class
    n_train_per_class: int | None = Field(None, ge=1)  # or this many training images per class
    subsample_seed: int = 0

    @model_validator(mode="after")
    def _one_subsample(self) -> DatasetSettings:
        if self.train_fraction is not None and self.n_train_per_class is not None:
            raise ValueError("give train_fraction or n_train_per_class, not both")
        return self

    @field_validator("origin")
    @classmethod
    def _known_origin(cls, origin: str) -> str:
        from medmerge.data.fetch import DATA_ORIGINS  # imported late: the data package imports config

        return _registered("dataset origin", origin, DATA_ORIGINS)


class DataSettings(_Section):
    image_size: int = Field(64, ge=16, le=1024)
    loader_workers: int = Field(0, ge=0, le=64)  # background threads gathering batches
    workers: int = Field(default_factory=_default_workers, ge=1, le=256)  # processes decoding images (prepare)
    pin_memory: Literal["auto", "on", "off"] = "auto"  # auto: on when training on a GPU
    # a GPU holds a prepared split (uint8) when all held fit in this fraction of its free memory; 0: never
    device_cache_fraction: float = Field(0.5, ge=0.0, le=1.0)
    target: str
    datasets: dict[str, DatasetSettings]

    @model_validator(mode="after")
    def _target_exists(self) -> DataSettings:
        if self.target not in self.datasets:
            raise ValueError(f"data.target '{self.target}' is not one of data.datasets: {sorted(self.datasets)}")
        return self


class SourceSettings(_Section):
    """One source model: its architecture, its starting weights, and the source task it is pretrained on.

    Without ``task`` (or ``task: null``) the source is used as fetched: nothing pretrains it and no seed
    changes it. ``pretrain`` overrides keys of the shared ``pretrain`` settings for this source alone.
    """

    arch: str
    origin: str
    options: dict[str, Any] = Field(default_factory=dict)
    task: str | None = None
    pretrain: dict[str, Any] = Field(default_factory=dict)

    @field_validator("origin")
    @classmethod
    def _known_origin(cls, origin: str) -> str:
        from medmerge.models.origins import WEIGHT_ORIGINS

        return _registered("weight origin", origin, WEIGHT_ORIGINS)


class TrainSettings(_Section):
    epochs: int = Field(ge=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    augment: bool = True
    keep_best: bool = True
    class_weighted: bool = False  # cross-entropy weighted by inverse class frequency (imbalanced data)


#: the single-source baselines (``baselines``; models/<baseline>/seed_<n>/<source>): full fine-tuning, linear
#: probe then fine-tuning; each with its name in the report
BASELINES = {"ft": "FT", "lpft": "LP-FT"}


class MergeSettings(_Section):
    """One merge: ``method`` and its settings. ``merge`` holds the shared defaults; each entry of ``methods``
    overrides some of them for one compared merge.

    A key commented with a method's name is that built-in method's own: its default is here, and the values it
    accepts are checked by the method (its settings model in ``medmerge/methods/<method>.py``) when
    ``methods.<name>`` is validated. The other keys are every method's. A method added beside the built-ins
    reads its own keys from ``options``.
    """

    method: str = "medmerge"  # a method of medmerge.methods.MERGE_METHODS
    sources_from: Literal[("pretrained", *BASELINES)] = "pretrained"
    align: Literal["none", "weight_matching"] = "none"  # permute non-anchor sources onto the anchor first
    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # interpolate: its grid
    lr: float = 0.01  # medmerge: of the coefficient logits
    head_lr: float = 1e-3  # medmerge
    epochs: int = 10  # medmerge
    batch_size: int = Field(32, ge=1)
    granularity: str = "kernel"  # medmerge
    normalization: str = "auto"  # medmerge
    anchor: str
    train_sources: bool = False  # medmerge
    source_lr: float = 1e-4  # medmerge
    init_coefficient: float = 0.5  # medmerge
    finetune_epochs: int = Field(5, ge=0)
    bn_recalibration: bool = True
    repair: bool = False  # REPAIR after collapsing: each merged layer's output statistics -> the sources' interpolation
    class_weighted: bool = False
    options: dict[str, Any] = Field(default_factory=dict)  # the own keys of a method added beside the built-ins

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        from medmerge.methods import MERGE_METHODS  # imported late: a method may import config

        if method not in MERGE_METHODS:
            names = [repr(name) for name in sorted(MERGE_METHODS)]
            expected = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return method


class EvaluateSettings(_Section):
    batch_size: int = Field(256, ge=1)
    # the metric of the paired comparisons and verdicts (kappa_quadratic for ordinal grading tasks)
    metric: Literal["f1_macro", "accuracy", "balanced_accuracy", "kappa_quadratic"] = "f1_macro"
    confidence: float = Field(0.95, gt=0.5, lt=1)  # of both intervals of a paired difference
    bootstrap: int = Field(2000, ge=100)  # resamples of the test images for the paired bootstrap
    bootstrap_seed: int = 0


class MlflowSettings(_Section):
    experiment: str = "medmerge"
    tracking_uri: str | None = None
    # the Model Registry name under which evaluate registers the best merged model (null: not registered)
    registered_model: str | None = Field("medmerge", min_length=1)


class DeviceSettings(_Section):
    type: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "none", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    # on the CPU: portable (PyTorch, oneDNN and MKL held to AVX2: every x86-64 CPU with AVX2 trains the same
    # bits) or native (each library's fastest code path for this CPU; results differ between CPUs)
    cpu_kernels: Literal["portable", "native"] = "portable"
    cpu_threads: int = Field(2, ge=0, le=4096)  # torch threads on the CPU (the sums' order); 0: one per core
    # > 1: the training stages run as that many DDP processes under torchrun (one per GPU on CUDA, gloo
    # on the CPU); the batch size stays the global batch (docs/multi_gpu.md)
    processes: int = Field(1, ge=1, le=1024)  # per node
    # > 1: every node runs the stage; torchrun's c10d rendezvous at rdzv_endpoint ("host:port") joins them
    nodes: int = Field(1, ge=1, le=4096)
    rdzv_endpoint: str = ""
    rdzv_id: str = Field("medmerge", pattern=r"^[A-Za-z0-9_.-]+$")  # one per concurrent multi-node run

    @field_validator("channels_last", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted ``on`` / ``off`` as a boolean; take it as the word that was written."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _rendezvous(self) -> DeviceSettings:
        if self.nodes > 1 and not re.fullmatch(r"\[?[A-Za-z0-9_.:-]+\]?:[0-9]{1,5}", self.rdzv_endpoint):
            raise ValueError(f"device.rdzv_endpoint must be 'host:port' (the rendezvous of the {self.nodes} "
                             f"nodes), got {self.rdzv_endpoint!r}")
        return self


class Params(_Section):
    data: DataSettings
    sources: dict[str, SourceSettings]
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    # at least one: the best of them (on validation) is the reference of every paired comparison
    baselines: list[Literal[tuple(BASELINES)]] = Field(default_factory=lambda: ["ft"], min_length=1)
    pretrain: TrainSettings
    finetune: TrainSettings
    merge: MergeSettings
    methods: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"medmerge": {"method": "medmerge"}})
    evaluate: EvaluateSettings = EvaluateSettings()
    mlflow: MlflowSettings = MlflowSettings()
    device: DeviceSettings = DeviceSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if len(self.sources) < 2:
            raise ValueError(f"sources: merging needs at least two sources, got {sorted(self.sources)}")
        archs = {name: s.arch for name, s in self.sources.items()}
        first_name, first_arch = next(iter(archs.items()))
        for name, arch in archs.items():
            if arch != first_arch:
                raise ValueError(
                    f"sources.{name}.arch is '{arch}' but sources.{first_name}.arch is '{first_arch}': "
                    "every source must share one architecture to be merged"
                )
        for name, source in self.sources.items():
            if source.task is not None and source.task not in self.data.datasets:
                raise ValueError(
                    f"sources.{name}.task '{source.task}' is not one of data.datasets: {sorted(self.data.datasets)}"
                )
            self.pretrain_settings(name)  # a bad per-source override fails here, naming the key
        if self.merge.anchor not in self.sources:
            raise ValueError(f"merge.anchor '{self.merge.anchor}' is not one of sources: {sorted(self.sources)}")
        if self.merge.normalization == "sigmoid" and len(self.sources) != 2:
            raise ValueError(f"merge.normalization 'sigmoid' needs exactly two sources, got {len(self.sources)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: each seed once, got {self.seeds}")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines: each baseline once, got {self.baselines}")
        if not self.methods:
            raise ValueError("methods: name at least one merge to run, e.g. {medmerge: {method: medmerge}}")
        for name in self.methods:
            self._check_method(name, self.method(name))
        if self.merge.sources_from != "pretrained" and self.merge.sources_from not in self.baselines:
            raise ValueError(f"merge.sources_from '{self.merge.sources_from}' is not one of baselines {self.baselines}")
        return self

    def _check_method(self, name: str, settings: MergeSettings) -> None:
        from medmerge.methods import MethodSettingsError, get_method

        where = f"methods.{name}"
        if settings.anchor not in self.sources:
            raise ValueError(f"{where}: anchor '{settings.anchor}' is not one of sources: {sorted(self.sources)}")
        try:  # the method's own keys and checks; a bad value inherited from merge is named there
            get_method(settings.method).validate(settings, self.source_names)
        except MethodSettingsError as error:
            overridden = self.methods[name]
            raise ValueError("; ".join(f"{where if key.split('.')[0] in overridden else 'merge'}.{key}: {message}"
                                       for key, message in error.errors)) from None
        except ValueError as error:
            raise ValueError(f"{where}: method '{settings.method}' {error}") from None
        if settings.sources_from != self.merge.sources_from:
            raise ValueError(f"{where}: sources_from must be set in merge (shared by every method)")

    def pretrain_settings(self, source: str) -> TrainSettings:
        """``pretrain`` with ``sources.<source>.pretrain``'s overrides."""
        overrides = self.sources[source].pretrain
        try:
            return TrainSettings.model_validate({**self.pretrain.model_dump(), **overrides})
        except ValidationError as error:
            raise ValueError(_override_error(f"sources.{source}.pretrain", "pretrain", error)) from None

    def method(self, name: str) -> MergeSettings:
        """The settings of the compared merge ``methods.<name>``: ``merge`` with the entry's overrides."""
        if name not in self.methods:
            raise ConfigError(f"unknown merge '{name}'; params.yaml methods are {sorted(self.methods)}")
        overrides = self.methods[name]
        try:
            return MergeSettings.model_validate({**self.merge.model_dump(), **overrides})
        except ValidationError as error:
            raise ValueError(_override_error(f"methods.{name}", "merge", error)) from None

    @property
    def arch(self) -> str:
        return next(iter(self.sources.values())).arch

    @property
    def source_names(self) -> list[str]:
        return list(self.sources)


def _override_error(where: str, section: str, error: ValidationError) -> str:
    """One line naming the first bad key of an entry that overrides ``section``."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{where}.{key}: unknown key (any key of {section} may be overridden)"
    return f"{where}.{key}: {first['msg']} (got {first.get('input')!r})"


def _format_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: invalid params"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<top level>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; see the defaults in params.yaml)")
        elif item["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        elif not item["loc"]:  # a check across sections: its message names the keys
            lines.append(f"  {key}: {item['msg']}")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], path: str | Path = PARAMS_FILE) -> Params:
    """Validate an already-loaded params mapping."""
    path = Path(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_error(path, error)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml``; raise :class:`ConfigError` naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    with path.open() as handle:
        try:
            raw = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_params(raw, path)


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested settings into the dotted names used by ``params.yaml`` and ``dvc exp run -S``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
