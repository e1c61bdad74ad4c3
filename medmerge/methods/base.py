"""The interface every merge method implements, what it is given and returns, and the registry of methods.

A method is one :class:`MergeMethod` subclass in one file of this package, registered under its ``name``
with :func:`register_method`. It declares:

- ``settings``: a pydantic model (:class:`MethodSettings`) of its own keys: their types, constraints and
  defaults, declared there alone. Its keys are read from ``options`` (``methods.<name>.options.<key>``),
  unless the model sets ``keys_in_merge`` (the built-in methods): then they are keys of ``merge`` itself,
  which :mod:`medmerge.config` builds from those models, so that ``merge`` holds their shared defaults and
  every entry of ``methods`` may override them. The config validates ``methods.<name>`` with the model
  (:meth:`MergeMethod.validate`), naming the bad key.
- ``learns_coefficients``: whether its coefficients are learned (the report's layer-wise plot shows those).
- ``needs_teachers``: whether it reads ``MergeInputs.teachers``, the FT baselines (``distill``).
- ``collapses_while_learning``: whether ``run`` reads the collapse keys (``bn_recalibration``, ``repair``):
  a fixed-weight method fits its head on the collapsed model, a feature-matching one recalibrates.
- ``learn_keys(settings)``: the keys of ``merge`` its learning reads (:data:`LEARN_KEYS`, its own keys, and
  what it adds); :func:`step_settings` splits a merge's settings into what each of its stages reads, so
  that a sweep of a key reruns only the stages that read it.
- ``describe(settings)``: the report's "kind" text; ``check(settings, source_names)``: checks across keys
  or against the sources.
- ``run(inputs)``: the merge, with its coefficients and target head set; ``rebuild(...)``: an empty merge of
  the same shape, for ``collapse`` to load the saved merge state into.

Nothing in this package imports torch at module level: ``medmerge.config`` imports the package to build
``merge``'s model and to check ``methods.<name>`` when params are read, before any model is built. The
torch-side work (:mod:`medmerge.train`, :mod:`medmerge.merge`) is imported inside the functions that run a
merge: ``run`` / ``rebuild`` and the builders of :mod:`medmerge.methods.medmerge` and :mod:`medmerge.methods.fixed`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from medmerge.registry import Registry

#: the keys of ``merge`` that learning any merge reads: the stage reads sources_from, align and anchor to
#: load and align the sources, the method batches the target and weighs its loss
LEARN_KEYS = ("method", "sources_from", "align", "anchor", "batch_size", "class_weighted", "options")
#: read by collapsing a learned merge (and by the learning of a method that ``collapses_while_learning``)
COLLAPSE_KEYS = ("bn_recalibration", "repair")
#: read by the fine-tune of the collapsed model
FINETUNE_KEYS = ("finetune_epochs",)
#: the merge's steps, each one DVC stage per method and seed, in order
STEPS = ("learn", "collapse", "finetune")

if TYPE_CHECKING:
    from torch import Tensor, nn

    from medmerge.config import MergeSettings
    from medmerge.data.target import TargetData
    from medmerge.device import Runtime
    from medmerge.merge.functional import KernelMerge
    from medmerge.resume import ResumeDir
    from medmerge.train import EpochResult


@dataclass
class MergeInputs:
    """What a merge method may use: the sources (in ``source_names`` order) and the target task; a method that
    trains keeps its per-epoch resume checkpoints in ``resume`` (see :func:`medmerge.train.fit`)."""

    arch: str
    sources: Sequence[dict[str, Tensor]]
    source_names: Sequence[str]
    data: TargetData
    settings: MergeSettings
    runtime: Runtime
    seed: int = 0
    on_epoch: Callable[[EpochResult], None] | None = None
    resume: ResumeDir | None = None
    # the FT baselines of every source for this seed (source_names order, target head), given by the stage
    # only to a method that sets ``needs_teachers`` (distillation from their ensemble)
    teachers: Sequence[dict[str, Tensor]] | None = None


@dataclass
class MergeResult:
    """What a method made, its validation macro F1, and method-specific details (``alpha``, ``best_epoch``...)
    for ``merge.json`` and MLflow.

    A coefficient merge returns ``merge`` (its coefficients and head set), which the stage collapses into one
    model; a method that builds the merged weights itself (by feature matching, least squares or
    distillation) returns ``merge=None`` and ``model``: an ordinary timm model of the sources' architecture
    with its target head, which the stage only recalibrates (``bn_recalibration``) before fine-tuning.
    """

    merge: KernelMerge | None
    val_f1: float
    details: dict = field(default_factory=dict)
    model: nn.Module | None = None

    def __post_init__(self) -> None:
        if (self.merge is None) == (self.model is None):
            raise ValueError("a merge result holds a coefficient merge or a merged model, exactly one of them")


class MethodSettings(BaseModel):
    """A method's own keys (subclass it; no fields: the method has none), read from
    ``methods.<name>.options``.

    ``keys_in_merge = True`` makes them keys of ``merge`` instead (``merge.<key>``, overridden by
    ``methods.<name>.<key>``), for the methods in this package; every key must then have a default (the
    value params.yaml gives it) and carry its constraints in its type (``Field``, ``Annotated``), since
    ``merge``'s model copies the fields. Checks across keys go in :meth:`MergeMethod.check`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    keys_in_merge: ClassVar[bool] = False


class MethodSettingsError(ValueError):
    """Bad values of a method's own keys: ``errors`` holds each key (``alphas``, ``options.weights``) with
    what is wrong with it."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{key}: {message}" for key, message in errors))
        self.errors = errors


class MergeMethod(ABC):
    """One merge method. Subclass, set ``name`` (and ``settings``, ``learns_coefficients`` where they
    differ from the defaults), implement ``run`` and ``rebuild``, and decorate with :func:`register_method`."""

    name: ClassVar[str]
    settings: ClassVar[type[MethodSettings]] = MethodSettings
    learns_coefficients: ClassVar[bool] = False
    # reads MergeInputs.teachers: the stage loads the FT baselines (models/ft/seed_<n>/<source>) for it, and
    # the config refuses it unless ``baselines`` holds ft
    needs_teachers: ClassVar[bool] = False
    collapses_while_learning: ClassVar[bool] = False

    def learn_keys(self, settings: MergeSettings) -> set[str]:
        """The keys of ``merge`` that :meth:`run` (and the stage around it) reads with ``settings``: a change
        of any other key leaves its learned merge as it is."""
        keys = set(LEARN_KEYS) | (set(COLLAPSE_KEYS) if self.collapses_while_learning else set())
        return keys | (set(self.settings.model_fields) if self.settings.keys_in_merge else set())

    def describe(self, settings: MergeSettings) -> str:
        """The report's "kind" of a merge with ``settings`` (alignment is added by the caller)."""
        return self.name

    def check(self, settings: MergeSettings, source_names: Sequence[str]) -> None:  # noqa: B027 (a hook)
        """Raise ``ValueError`` if ``settings`` cannot merge ``source_names``: one line that continues the
        method's name (``needs exactly two sources, got [...]``), which the caller puts in front."""

    def own_settings(self, settings: MergeSettings) -> MethodSettings:
        """``settings``' values of this method's own keys, validated by its ``settings`` model."""
        shared = type(settings).model_fields
        own = self.settings.model_fields
        options = dict(settings.options)
        unknown = [key for key in options if key not in own or key in shared]
        if unknown:
            takes = sorted(key for key in own if key not in shared) or "no options"
            raise MethodSettingsError([(f"options.{key}", f"unknown key (method '{self.name}' takes {takes})")
                                       for key in unknown])
        values = {key: getattr(settings, key) for key in own if key in shared} | options
        try:
            return self.settings.model_validate(values)
        except ValidationError as error:
            errors = []
            for item in error.errors():
                if not item["loc"]:  # a check across keys of the settings model: as from check()
                    raise ValueError(item["msg"]) from None
                key = ".".join(str(part) for part in item["loc"])
                key = key if item["loc"][0] in shared else f"options.{key}"
                if item["type"] == "missing":
                    errors.append((key, f"required by method '{self.name}'"))
                else:
                    errors.append((key, f"{item['msg']} (got {item.get('input')!r})"))
            raise MethodSettingsError(errors) from None

    def validate(self, settings: MergeSettings, source_names: Sequence[str]) -> MethodSettings:
        """Its own keys (:class:`MethodSettingsError` naming each bad key), then :meth:`check`."""
        own = self.own_settings(settings)
        self.check(settings, list(source_names))
        return own

    @abstractmethod
    def run(self, inputs: MergeInputs) -> MergeResult:
        """Merge ``inputs.sources`` for the target task: the merge with its coefficients and head set."""

    def rebuild(self, arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str],
                num_classes: int, settings: MergeSettings) -> KernelMerge:
        """An empty merge of the shape :meth:`run` produces, ready for ``restore_merge_state`` (a coefficient
        merge's method overrides it; a method that returns a merged model has no merge state to reopen)."""
        raise ValueError(f"merge method '{self.name}' builds its merged model directly: it saves no merge state "
                         "to rebuild")


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")  # filled as this package's modules import
Method = TypeVar("Method", bound=type[MergeMethod])


def register_method(cls: Method) -> Method:
    """Class decorator: make ``cls`` available as ``method: <cls.name>`` (a name taken by another class is
    an error)."""
    MERGE_METHODS.add(cls.name, cls())
    return cls


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; :class:`~medmerge.registry.UnknownNameError` listing them
    otherwise."""
    return MERGE_METHODS.get(name)


def run_merge_method(inputs: MergeInputs) -> MergeResult:
    """Run the method that ``inputs.settings.method`` names, after validating its settings."""
    method = get_method(inputs.settings.method)
    try:
        method.validate(inputs.settings, inputs.source_names)
    except MethodSettingsError as error:
        raise ValueError(f"merge method '{method.name}': {error}") from None
    except ValueError as error:
        raise ValueError(f"{method.name} {error}") from None
    return method.run(inputs)


def step_settings(settings: MergeSettings) -> dict[str, dict]:
    """``settings`` split by the step that reads them (:data:`STEPS`): ``learn`` holds the keys its method's
    learning reads, ``collapse`` and ``finetune`` the keys of those steps, each as JSON values by key."""
    values = settings.model_dump(mode="json")
    keys = {"learn": get_method(settings.method).learn_keys(settings), "collapse": COLLAPSE_KEYS,
            "finetune": FINETUNE_KEYS}
    return {step: {key: values[key] for key in sorted(keys[step])} for step in STEPS}


def rebuild_merge(arch: str, sources: Sequence[dict[str, Tensor]], source_names: Sequence[str], num_classes: int,
                  settings: MergeSettings) -> KernelMerge:
    """An empty merge of the shape ``settings.method`` produces, ready for ``restore_merge_state``."""
    return get_method(settings.method).rebuild(arch, sources, source_names, num_classes, settings)

