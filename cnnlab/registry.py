"""Name -> object registries, so that a YAML file name selects an implementation; and the
one-line description each config key carries beside its schema field (`described`)."""

import dataclasses
import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from omegaconf import MISSING

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


# The metadata key of a schema field's one-line description (`described`).
HELP = "help"


def described(text: str, default: Any = MISSING, *,
              factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field of a config schema with its one-line description beside it: the
    `help` that `cnnlab COMMAND --help` shows for the key (read back by `field_help`).
    `default` is MISSING where conf/ gives the value; `factory` for a nested section."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={HELP: text})
    return dataclasses.field(default=default, metadata={HELP: text})


def field_help(schema: type) -> dict[str, str]:
    """Each field of the dataclass `schema` -> its description ('' where it has none)."""
    return {f.name: f.metadata.get(HELP, "") for f in dataclasses.fields(schema)}
