"""Name-to-class registries, so users add losses and adapters with a decorator."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to classes (or factories) of one kind.

    Example:
        >>> losses = Registry("loss")
        >>> @losses.register("my_loss")
        ... class MyLoss: ...
        >>> losses.build("my_loss")  # doctest: +ELLIPSIS
        <...MyLoss object at ...>

    Args:
        kind: What the registry holds, used in error messages ("loss", "adapter").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Returns a decorator that registers a class or factory under ``name``.

        Args:
            name: Registry key; defaults to the decorated object's ``__name__``.
            override: Replace an existing entry of the same name instead of raising.

        Raises:
            KeyError: ``name`` is taken and ``override`` is false.
        """

        def decorator(obj: Callable[..., T]) -> Callable[..., T]:
            key = name or obj.__name__
            if key in self._entries and not override:
                raise KeyError(
                    f"a {self.kind} named {key!r} is already registered "
                    f"({self._entries[key].__module__}.{self._entries[key].__qualname__}); "
                    "pass override=True to replace it"
                )
            self._entries[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """Returns the entry registered under ``name``.

        Raises:
            KeyError: Unknown name; the message lists the closest registered names.
        """
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}{hint} Registered: {', '.join(sorted(self._entries))}"
            ) from None

    def build(self, name: str, /, **kwargs: object) -> T:
        """Instantiates the entry registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Returns the registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
