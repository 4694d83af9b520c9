"""Name -> object registries, so that a YAML file name selects an implementation."""

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cnnlab.errors import ConfigError

T = TypeVar("T")


def unknown_choice(kind: str, name: object, choices: list[str]) -> str:
    """`unknown optimizer 'adm'; valid choices: ... (did you mean 'adam'?)` (one line)."""
    what = f"{kind}='{name}'" if "." in kind else f"unknown {kind} '{name}'"
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{what}; valid choices: {', '.join(choices)}{hint}"


class Registry(Generic[T]):
    """A named table of implementations; unknown names fail with the list of valid ones."""

    def __init__(self, kind: str) -> None:
        # A dotted kind is a config key (`optimizer.decay`): errors then read `key='value'`.
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None) -> Callable[[T], T] | T:
        """Register ``item`` under ``name``; without ``item``, return a decorator."""

        def add(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add if item is None else add(item)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(unknown_choice(self.kind, name, self.names())) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
