"""One registry type for every pluggable thing chosen by name (timm's ``_registry.py`` in miniature).

A thing registers itself where it is defined, with the registry's ``register`` decorator::

    DATA_ORIGINS = Registry("data origin")

    @DATA_ORIGINS.register("synthetic", options=SyntheticOptions)
    def fetch_synthetic(out_path, options): ...

``options`` (optional) is a pydantic model of the settings that the entry takes: ``medmerge.config``
validates a params section's ``options`` with it (:meth:`Registry.options`) when params load, so a bad key
fails there, naming it. This module imports nothing heavy (no torch, pandas or PIL): the config imports
registries to check names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from medmerge.errors import InputError

T = TypeVar("T")


class Options(BaseModel):
    """Base of an entry's options model: a key it does not declare is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class UnknownNameError(ValueError, InputError):
    """A name that no entry of a registry has; the message lists the names it has."""


class OptionsError(ValueError):
    """Options that an entry's options model refuses, by key: ``unknown`` (not taken), ``missing`` (required,
    not given), ``invalid`` ((key, what is wrong) pairs); ``takes`` and ``requires`` are the model's keys,
    ``subject`` names the entry ("data origin 'csv'"). The message names the entry and each key; callers
    with their own wording read the lists."""

    def __init__(self, kind: str, name: str, model: type, error: ValidationError) -> None:
        self.subject = f"{kind} '{name}'"
        self.takes = list(model.model_fields)
        self.requires = [key for key, field in model.model_fields.items() if field.is_required()]
        self.unknown: list[str] = []
        self.missing: list[str] = []
        self.invalid: list[tuple[str, str]] = []
        for item in error.errors():
            key = ".".join(str(part) for part in item["loc"])
            if item["type"] == "extra_forbidden":
                self.unknown.append(key)
            elif item["type"] == "missing":
                self.missing.append(key)
            elif item["type"] == "value_error":  # a validator's own message, which names the value
                self.invalid.append((key, str(item["ctx"]["error"])))
            else:
                self.invalid.append((key, f"{item['msg']} (got {item.get('input')!r})"))
        problems = "; ".join(f"options.{key}: {message}" for key, message in self.errors)
        super().__init__(f"{self.subject}: {problems}")

    @property
    def errors(self) -> list[tuple[str, str]]:
        """Every bad key with what is wrong with it."""
        return ([(key, f"unknown key ({self.subject} takes {self.takes})") for key in self.unknown]
                + [(key, "required key is missing") for key in self.missing] + self.invalid)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing: its name, the object, and the options model it takes (None: no options check)."""

    name: str
    obj: T
    options: type | None = None


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names it in errors: "unknown data origin 'x'; expected one of ...")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str | None = None, *, options: type | None = None) -> Callable[[T], T]:
        """Decorator: register the decorated object as ``name`` (default: its ``name`` attribute, else
        ``__name__``), with the ``options`` model it takes."""

        def decorate(obj: T) -> T:
            self.add(name or getattr(obj, "name", None) or obj.__name__, obj, options=options)
            return obj

        return decorate

    def add(self, name: str, obj: T, *, options: type | None = None) -> None:
        """Register ``obj`` as ``name``; the same name from another definition is an error (re-importing
        the same definition, e.g. on module reload, replaces it)."""
        existing = self._entries.get(name)
        if existing is not None and _origin(existing.obj) != _origin(obj):
            raise ValueError(f"{self.kind} '{name}' is registered twice: by {_origin(existing.obj)[0]} and "
                             f"{_origin(obj)[0]}")
        self._entries[name] = Entry(name, obj, options)

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a temporary entry)."""
        self._entries.pop(name, None)

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} '{name}'; expected one of {self.names()}")
        return self._entries[name]

    def get(self, name: str) -> T:
        """The object registered as ``name``; :class:`UnknownNameError` listing the names otherwise."""
        return self.entry(name).obj

    def check(self, name: str) -> str:
        """``name`` if it is registered (for validators), else :class:`UnknownNameError`."""
        self.entry(name)
        return name

    def options(self, name: str, values: Mapping[str, Any]) -> Any:
        """``values`` validated by the options model of ``name`` (:class:`OptionsError` naming the bad keys
        otherwise); ``values`` as a dict where the entry has no options model."""
        model = self.entry(name).options
        if model is None:
            return dict(values)
        try:
            return model.model_validate(dict(values))
        except ValidationError as error:
            raise OptionsError(self.kind, name, model, error) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return ((name, entry.obj) for name, entry in self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {self.names()})"


def _origin(obj: Any) -> tuple[str, str]:
    """Where ``obj`` was defined: (module, qualified name); an instance by its class."""
    source = obj if hasattr(obj, "__qualname__") else type(obj)
    return getattr(source, "__module__", "?"), getattr(source, "__qualname__", repr(source))
