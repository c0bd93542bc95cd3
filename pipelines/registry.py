"""One shape for every registry: methods, loader backends, trunks, step modes.

A :class:`Registry` maps a name to an object (a factory, a class, a mode) plus optional metadata
(a backend's options dataclass, a method's minimum views). ``register`` works as a decorator or a
call; ``get`` names the valid entries when a name is unknown; ``names`` is what a CLI offers as
``choices``. A registry may be given a ``loader`` (a function that imports the modules that fill
it), run once on the first lookup, so that importing the registry stays light.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from pipelines.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` is used in error messages, e.g. "loader backend")."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._loader = loader
        self._loaded = loader is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # set first: the loader's modules call register()
            assert self._loader is not None
            self._loader()

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Any:
        """``register(name, obj, **meta)``, or ``@register(name, **meta)`` above a definition.
        Registering a name again replaces it (a user's plug-in may override a built-in)."""
        if obj is not None:
            self._entries[name] = obj
            self._meta[name] = dict(meta)
            return obj

        def deco(fn: T) -> T:
            self._entries[name] = fn
            self._meta[name] = dict(meta)
            return fn

        return deco

    def names(self) -> list[str]:
        """Registered names, sorted (for ``choices`` and error messages)."""
        self._load()
        return sorted(self._entries)

    def unknown(self, name: str) -> ConfigError:
        """The error for a name that is not registered (lists the valid ones)."""
        return ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        """The entry ``name``; :class:`ConfigError` naming the valid entries when unknown."""
        self._load()
        if name not in self._entries:
            raise self.unknown(name)
        return self._entries[name]

    def meta(self, name: str) -> dict[str, Any]:
        """The metadata given at registration (a copy)."""
        self.get(name)
        return dict(self._meta[name])

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
