"""Named extension points: samplers, pruners, searchable methods, evaluation backends.

Each registry maps a name to what builds the thing. An entry is either the object
itself or a lazy ``"module:attribute"`` string (as lm-eval registers its model
classes), imported the first time it is asked for, so naming a heavy backend
costs nothing until a study uses it. An unknown name is one `MergetuneError`
that lists the known ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar, Union

from mergetune.errors import MergetuneError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names → entries of one kind (`kind` is how errors call them: "sampler", "backend")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Union[T, str]] = {}

    def register(self, name: str, entry: Union[T, str]) -> None:
        """Add `entry` (or a lazy "module:attribute" path to it) under `name`; names are unique."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def unknown(self, name: object) -> str:
        """The message for a name that is not registered."""
        return f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}"

    def get(self, name: str) -> T:
        """The entry registered as `name`, importing it on first use."""
        if name not in self._entries:
            raise MergetuneError(self.unknown(name))
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = getattr(importlib.import_module(module), attribute)
            self._entries[name] = entry
        return entry  # type: ignore[return-value]
