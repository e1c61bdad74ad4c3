"""Typed, validated settings: the one reader of ``params.yaml``.

Every section is a pydantic model that forbids unknown keys, so a typo such as ``merge.lrr`` stops the
pipeline before any work is done, with a message that names the file, the key and what was expected. A
default here is the value params.yaml gives (tests/test_config.py checks), or the key is required.
Names and options of the pluggable things (data and weight origins, merge methods, granularities) are
checked with their registries; ``merge``'s model is built from the merge methods' settings models.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from medmerge.data.fetch import DATA_ORIGINS, dataset_options
from medmerge.errors import InputError
from medmerge.methods import MERGE_METHODS, MethodSettingsError, get_method
from medmerge.models.origins import WEIGHT_ORIGINS
from medmerge.registry import OptionsError

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError, InputError):
    """A params file that cannot be used; the message names the file and the key."""


class _KeyErrors(ValueError):
    """Raised by a section's validator for keys below the section: (dotted key from it, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{key}: {message}" for key, message in errors))
        self.errors = errors


def _options_errors(error: OptionsError) -> _KeyErrors:
    return _KeyErrors([(f"options.{key}", message) for key, message in error.errors])


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _default_workers() -> int:
    from medmerge.data.prepare import default_workers

    return default_workers()


class DatasetSettings(_Section):
    """Where one dataset comes from (``origin`` picks a fetcher in ``medmerge.data.fetch.DATA_ORIGINS``, whose
    options model checks ``options``) and how it is prepared (docs/data_sources.md)."""

    origin: Annotated[str, AfterValidator(DATA_ORIGINS.check)]
    options: dict[str, Any] = Field(default_factory=dict)
    classes: list[str] | None = None
    resize: Literal["squash", "pad", "center_crop"] = "squash"  # aspect ratio: stretch | letterbox | crop
    ordinal: bool = False  # graded labels (e.g. retinopathy 0-4): ordinal metrics apply
    allow_missing_classes: bool = False  # a train split without some class: error unless true
    train_fraction: float | None = Field(None, gt=0, le=1)  # keep this fraction of every training class
    n_train_per_class: int | None = Field(None, ge=1)  # or this many training images per class
    subsample_seed: int = 0
    # kept: the subsample's training images | rest: every training image it leaves out (a disjoint source task
    # from the same file as a target that keeps the subsample)
    train_subset: Literal["kept", "rest"] = "kept"

    @model_validator(mode="after")
    def _one_subsample(self) -> DatasetSettings:
        if self.train_fraction is not None and self.n_train_per_class is not None:
            raise ValueError("give train_fraction or n_train_per_class, not both")
        if self.train_subset == "rest" and self.train_fraction is None and self.n_train_per_class is None:
            raise ValueError("train_subset: rest needs the subsample it leaves out (train_fraction or "
                             "n_train_per_class)")
        return self

    @model_validator(mode="after")
    def _origin_options(self) -> DatasetSettings:
        try:
            dataset_options(self.origin, self.options, self.classes)
        except OptionsError as error:
            raise _options_errors(error) from None
        return self


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
    origin: Annotated[str, AfterValidator(WEIGHT_ORIGINS.check)]  # a key of models.origins.WEIGHT_ORIGINS
    options: dict[str, Any] = Field(default_factory=dict)  # checked by the origin's options model
    task: str | None = None
    pretrain: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _origin_options(self) -> SourceSettings:
        try:
            WEIGHT_ORIGINS.options(self.origin, self.options)
        except OptionsError as error:
            raise _options_errors(error) from None
        return self


class TrainSettings(_Section):
    """``pretrain`` and ``finetune``: the keys whose values differ between the two are required."""

    epochs: int = Field(ge=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-4, ge=0)
    augment: bool = True
    keep_best: bool = True
    class_weighted: bool = False  # cross-entropy weighted by inverse class frequency (imbalanced data)


#: the single-source baselines (``baselines``; models/<baseline>/seed_<n>/<source>): full fine-tuning, linear
#: probe then fine-tuning; each with its name in the report
BASELINES = {"ft": "FT", "lpft": "LP-FT"}
Baseline = Literal[tuple(BASELINES)]


class _SharedMergeSettings(_Section):
    """The keys of ``merge`` that every method has."""

    method: Annotated[str, AfterValidator(MERGE_METHODS.check)] = "medmerge"  # a key of MERGE_METHODS
    sources_from: Literal[("pretrained", *BASELINES)] = "pretrained"
    # permute non-anchor sources onto the anchor first: by their weights, or by their features on the target
    align: Literal["none", "weight_matching", "activation_matching"] = "none"
    batch_size: int = Field(32, ge=1)
    anchor: str
    finetune_epochs: int = Field(8, ge=0)
    bn_recalibration: bool = True
    repair: bool = False  # REPAIR after collapsing: each merged layer's output statistics -> the sources' interpolation
    class_weighted: bool = False
    options: dict[str, Any] = Field(default_factory=dict)  # the keys of a method whose keys are not merge's


def _merge_settings_model() -> type[_SharedMergeSettings]:
    """``merge``'s model: the shared keys, and the keys of every registered method whose settings model sets
    ``keys_in_merge``, copied from it (type, constraints and default)."""
    declared_by = dict.fromkeys(_SharedMergeSettings.model_fields, "merge")
    fields: dict[str, Any] = {}
    for name, method in MERGE_METHODS.items():
        model = method.settings
        if not model.keys_in_merge:
            continue
        decorators = model.__pydantic_decorators__
        if decorators.field_validators or decorators.model_validators:
            raise TypeError(f"method '{name}': a settings model with keys_in_merge keeps its constraints in "
                            "its fields' types (validators are not copied into merge); checks across keys go "
                            "in check()")
        for key, field in model.model_fields.items():
            if key in declared_by:
                raise TypeError(f"merge.{key} is declared twice: by {declared_by[key]} and by method "
                                f"'{name}'")
            if field.is_required():
                raise TypeError(f"merge.{key} of method '{name}' needs a default (the value params.yaml "
                                "gives)")
            declared_by[key] = f"method '{name}'"
            fields[key] = (field.annotation, copy.copy(field))
    return create_model("MergeSettings", __base__=_SharedMergeSettings, __module__=__name__, __doc__=(
        "One merge: ``method`` and its settings. ``merge`` holds the shared defaults; each entry of "
        "``methods`` overrides some of them for one compared merge. The built-in methods' keys are declared "
        "in their settings models (``medmerge/methods/<method>.py``); a method whose keys are not merge's "
        "reads them from ``options``. Built directly (``MergeSettings(anchor='a', lr=0.05)``), it is "
        "checked as params.yaml's ``merge`` is, with params.yaml's values as defaults."), **fields)


MergeSettings = _merge_settings_model()


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
    channels_last: Literal["auto", "on", "off"] = "on"
    compile: bool = False
    # on the CPU: portable (PyTorch, oneDNN and MKL held to AVX2: a CPU with or without AVX-512 trains the
    # same bits as another of its kind; measured on two AMD EPYCs) or native (each library's fastest code path
    # for this CPU: only the same CPU model showing the same instruction sets). Another vendor's CPU trains
    # other bits either way: a statistically equivalent run
    cpu_kernels: Literal["portable", "native"] = "portable"
    cpu_threads: int = Field(1, ge=0, le=4096)  # torch threads on the CPU (the sums' order); 0: one per core
    # taps: on the CPU, the weight gradient of a depthwise convolution with a map of at most 4x4 outputs is
    # summed tap by tap (medmerge.depthwise: the same gradient; a step 1.8x faster, AMD EPYC Zen 4) | library: oneDNN
    cpu_depthwise_grad: Literal["taps", "library"] = "taps"
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
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    # at least one: the best of them (on validation) is the reference of every paired comparison
    baselines: list[Baseline] = Field(["ft", "lpft"], min_length=1)
    pretrain: TrainSettings
    finetune: TrainSettings
    merge: MergeSettings
    methods: dict[str, dict[str, Any]]  # name -> the keys of merge that this compared merge overrides
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
        if "ft" not in self.baselines:  # dvc.yaml: teachers@ depends on models/ft/seed_<n>
            raise ValueError(f"baselines: must include ft (every teachers@ stage reads models/ft/seed_<n>, the FT "
                             f"ensemble that distill learns from), got {self.baselines}")
        return self

    def _check_method(self, name: str, settings: MergeSettings) -> None:
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
        if get_method(settings.method).needs_teachers and "ft" not in self.baselines:
            raise ValueError(f"{where}: method '{settings.method}' learns from the FT baselines: baselines must "
                             f"include ft, got {self.baselines}")

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


def _key_messages(error: ValidationError, unknown: str) -> list[tuple[str, str]]:
    """Each bad key (dotted; "" for a check across sections, whose message names the keys) with what is
    wrong with it; ``unknown`` is what to say of a key that is not taken."""
    found = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        cause = item.get("ctx", {}).get("error")
        if isinstance(cause, _KeyErrors):
            found += [(f"{key}.{sub}" if key else sub, message) for sub, message in cause.errors]
        elif item["type"] == "extra_forbidden":
            found.append((key, unknown))
        elif item["type"] == "missing":
            found.append((key, "required key is missing"))
        elif item["type"] == "value_error" or not item["loc"]:  # a validator's message names the value
            found.append((key, str(cause) if cause is not None else item["msg"]))
        else:
            found.append((key, f"{item['msg']} (got {item.get('input')!r})"))
    return found


def _override_error(where: str, section: str, error: ValidationError) -> str:
    """One line naming each bad key of an entry that overrides ``section``."""
    messages = _key_messages(error, f"unknown key (any key of {section} may be overridden)")
    return "; ".join(f"{where}.{key}: {message}" for key, message in messages)


def _format_error(path: Path, error: ValidationError) -> str:
    messages = _key_messages(error, "unknown key (check the spelling; see the defaults in params.yaml)")
    return "\n".join([f"{path}: invalid params", *(f"  {key}: {message}" if key else f"  {message}"
                                                      for key, message in messages)])


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
