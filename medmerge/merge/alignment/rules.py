"""The rule registries: what a leaf module (:data:`MODULE_RULES`) or an op (:data:`OP_RULES`) does to the
feature axis of its input. Supporting a new one is adding a rule (:func:`module_rule`, :func:`op_rule`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

from medmerge.merge.alignment.builder import Builder, Feature
from medmerge.registry import Registry

ModuleRule = Callable[[Builder, fx.Node, str, nn.Module, Feature], Feature]
OpRule = Callable[[Builder, fx.Node, list[fx.Node]], Feature]

MODULE_RULES: Registry[ModuleRule] = Registry("module rule")
"""Rules for leaf modules, by the rule's name; :func:`module_rule_for` finds a module's rule by its type."""
OP_RULES: Registry[OpRule] = Registry("op rule")
"""Rules for ops, by the rule's name; :func:`op_rule_for` finds an op's rule by its function or method."""

_RULE_OF_TYPE: dict[type[nn.Module], str] = {}
_RULE_OF_TARGET: dict[Any, str] = {}


def _registrar(
    registry: Registry[Any], table: dict[Any, str], handled: tuple[Any, ...]
) -> Callable[[Any], Any]:
    """A decorator registering a rule by its function's name as the one rule of each of ``handled``."""

    def register(rule: Any) -> Any:
        name = rule.__name__
        taken = next(((thing, table[thing]) for thing in handled if table.get(thing, name) != name), None)
        if taken:
            raise ValueError(f"{registry.kind} '{name}' claims {taken[0]!r}, which {registry.kind} "
                             f"'{taken[1]}' already handles")
        registry.add(name, rule)
        table.update(dict.fromkeys(handled, name))
        return rule

    return register


def module_rule(*types: type[nn.Module]) -> Callable[[ModuleRule], ModuleRule]:
    """Decorator: the rule for leaf modules of ``types`` (and of their subclasses without a rule of their
    own)."""
    return _registrar(MODULE_RULES, _RULE_OF_TYPE, types)


def op_rule(*targets: Any) -> Callable[[OpRule], OpRule]:
    """Decorator: the rule for functions (callables, ``call_function`` nodes) and tensor methods (names,
    ``call_method`` nodes)."""
    return _registrar(OP_RULES, _RULE_OF_TARGET, targets)


def module_rule_for(m: nn.Module) -> ModuleRule | None:
    """The rule of the first type along ``type(m)``'s MRO that has one (None: no rule)."""
    for t in type(m).__mro__:
        if t in _RULE_OF_TYPE:
            return MODULE_RULES[_RULE_OF_TYPE[t]]
    return None


def op_rule_for(target: Any) -> OpRule | None:
    """The rule of a ``call_function`` target (a callable) or a ``call_method`` target (a method name)."""
    name = _RULE_OF_TARGET.get(target) if isinstance(target, str) or callable(target) else None
    return None if name is None else OP_RULES[name]
