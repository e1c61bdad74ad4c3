"""Merge methods behind one interface, chosen by name (``merge.method`` / ``methods.<name>.method``).

Every method takes the N sources (already aligned, if asked) and the target data and returns a
:class:`~medmerge.merge.functional.KernelMerge` whose coefficients and target head are set (or a merged
model it built itself). What follows is the same for all of them, each its own stage: collapse into one
ordinary model with BatchNorm recalibration (``stages/collapse.py``), the optional fine-tune
(``stages/train.py finetune_merged``) and evaluation (``stages/evaluate.py``); ``stages/learn.py`` runs the
method, reading only the settings :func:`step_settings` says its learning reads.

One file per method, as mergekit's ``merge_methods/``: ``average.py``, ``interpolate.py``, ``medmerge.py``;
the interface and the registry are in ``base.py`` (see there), the fixed-weight methods' shared merge in
``fixed.py``. Importing this package imports every module in it, so adding a method is adding one file
that defines a :class:`MergeMethod` subclass decorated with :func:`register_method`. No module here
imports torch at module level, so ``medmerge.config`` can validate ``methods.<name>`` with the method's
own settings model cheaply; the merge stage calls :func:`run_merge_method`, and :func:`rebuild_merge`
reopens a saved merge (its ``merge_state.safetensors`` and sources).
"""

from __future__ import annotations

import importlib
import pkgutil

from medmerge.methods.base import (
    MERGE_METHODS,
    STEPS,
    MergeInputs,
    MergeMethod,
    MergeResult,
    MethodSettings,
    MethodSettingsError,
    get_method,
    rebuild_merge,
    register_method,
    run_merge_method,
    step_settings,
)

for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

del _module

__all__ = [
    "MERGE_METHODS",
    "MergeInputs",
    "MergeMethod",
    "MergeResult",
    "MethodSettings",
    "MethodSettingsError",
    "STEPS",
    "get_method",
    "rebuild_merge",
    "step_settings",
    "register_method",
    "run_merge_method",
]
