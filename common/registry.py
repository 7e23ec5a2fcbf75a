"""Short names that stand for objects of one kind (reward functions, environments, weight transports, the
algorithms' math), filled by a decorator. Every registry of the project is one of these, so all of them refuse a
name taken twice and answer an unknown name with the closest registered one.

>>> shapes = Registry("shape")
>>> @shapes.register("square")
... def square(x):
...     return x * x
>>> shapes.get("square")(3), shapes.names(), "square" in shapes
(9, ['square'], True)
>>> shapes.get("sqare")
Traceback (most recent call last):
...
common.registry.UnknownName: unknown shape 'sqare'; did you mean 'square'? registered: square
>>> shapes.register("square")(square) is square  # the same object again (a module imported twice): kept
True
>>> shapes.register("square")(lambda x: x)
Traceback (most recent call last):
...
ValueError: shape 'square' is already registered (by common.registry.square); pick another name
>>> shapes.get("circle")  # nothing close enough to suggest
Traceback (most recent call last):
...
common.registry.UnknownName: unknown shape 'circle'; registered: square
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownName(KeyError):
    """KeyError whose message prints as written (a plain KeyError shows the repr of its argument)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def qualified_name(obj: object) -> str:
    """``module.QualName`` of a function or class, for messages."""
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


class Registry(Generic[T]):
    """Names -> objects of one kind; ``what`` names the kind in messages ("reward", "weight transport")."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding its object under ``name``; returns the object unchanged.

        Raises ValueError when ``name`` already stands for another object: a silent overwrite would let a plugin
        replace a built-in without anyone noticing. Registering the same object again is a no-op.
        """

        def decorator(obj: T) -> T:
            held = self._entries.get(name)
            if held is not None and held is not obj:
                raise ValueError(f"{self.what} {name!r} is already registered (by {qualified_name(held)}); pick another name")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str, advice: str = "") -> T:
        """The object registered as ``name``; UnknownName (a KeyError) names the closest registered name, all of
        them, and ``advice`` after them."""
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(str(name), list(self._entries), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        raise UnknownName(f"unknown {self.what} {name!r}{hint} registered: {', '.join(self.names()) or '(none)'}{advice}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
