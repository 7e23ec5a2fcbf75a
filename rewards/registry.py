"""Reward registry and plugin loading.

A reward is looked up by one *spec* string, the same string a recipe writes under
``rewards:``. Three forms are accepted:

=============================  ======================================================
spec                           resolves to
=============================  ======================================================
``arithmetic_exact``           a name registered with :func:`register_reward`
``path/to/my_rewards.py:fn``   ``fn`` in a Python file, loaded by path (a relative
                               path is resolved against the current directory)
``my_pkg.my_module:fn``        ``fn`` in an importable module
=============================  ======================================================

A spec is a file path when the part before the last ``:`` ends in ``.py`` or contains
a path separator; otherwise it is a module path. ``fn`` may be dotted
(``module:Class.method``). Errors name what was asked for:

- unknown short name -> :class:`KeyError` listing the registered names and the closest one;
- missing file -> :class:`FileNotFoundError` naming the resolved path;
- missing function -> :class:`AttributeError` naming it;
- a found object that is not callable -> :class:`TypeError`.

A file plugin is executed once per resolved path and then cached, so a file that
decorates its functions with :func:`register_reward` can be named twice without
tripping the duplicate-name check. The loaded module is deliberately *not* left in
``sys.modules``: its synthetic name cannot be imported in another process, and leaving
it out lets cloudpickle (Ray) ship the function by value.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Protocol, runtime_checkable

from common.registry import Registry

__all__ = ["RewardFn", "register_reward", "get_reward", "reward_names"]


@runtime_checkable
class RewardFn(Protocol):
    """The reward contract (see :mod:`rewards`): ``fn(prompts, completions, **columns) -> list[float]``."""

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]: ...


REWARDS: Registry[Callable[..., list[float]]] = Registry("reward")
_FILE_MODULES: dict[Path, ModuleType] = {}  # resolved plugin path -> executed module


def register_reward(name: str) -> Callable[[Callable], Callable]:
    """Register a reward function under a short ``name``; returns the function unchanged.

    Usage (in the package or in a plugin file)::

        @register_reward("always_one")
        def always_one(prompts, completions, **columns):
            return [1.0] * len(completions)

    >>> register_reward("arithmetic_exact")(lambda prompts, completions, **columns: [])
    Traceback (most recent call last):
    ...
    ValueError: reward 'arithmetic_exact' is already registered (by rewards.builtin.arithmetic_exact); pick another name

    Raises:
        ValueError: ``name`` is already registered, empty, or contains ``:`` (which would
            make it read as a plugin spec).
    """
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def decorator(fn: Callable) -> Callable:
        if not callable(fn):
            raise TypeError(f"register_reward({name!r}) needs a callable, got {type(fn).__name__}")
        return REWARDS.register(name)(fn)

    return decorator


def reward_names() -> list[str]:
    """Sorted names of all registered rewards (the built-ins and any registered since)."""
    return REWARDS.names()


def get_reward(spec: str) -> Callable[..., list[float]]:
    """Resolve a reward spec (short name, ``file.py:fn`` or ``module:fn``) to the callable.

    >>> get_reward("arithmetic_exact") is get_reward("rewards.builtin:arithmetic_exact")
    True
    >>> get_reward("arithmetic_exactt")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    common.registry.UnknownName: unknown reward 'arithmetic_exactt'; did you mean 'arithmetic_exact'? ...
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()

    if ":" not in spec:
        return REWARDS.get(spec, ". A plugin is named as 'path/to/file.py:fn' or 'package.module:fn'.")

    obj = load_plugin(spec, "reward function")
    if not callable(obj):
        raise TypeError(
            f"reward spec {spec!r} resolves to a {type(obj).__name__}, which is not callable; "
            "it must be a function fn(prompts, completions, **columns) -> list[float]"
        )
    return obj


def load_plugin(spec: str, what: str) -> Any:
    """The object a ``path/to/file.py:name`` or ``package.module:name`` spec names (``name`` may be
    dotted); errors say which file or module was searched and suggest a close name. ``what`` names
    the kind of object in messages ("reward function", "environment")."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(
            f"malformed {what} spec {spec!r}: expected 'path/to/file.py:name' or 'package.module:name'"
        )
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _load_file(target, spec)
        where = f"file {module.__file__}"
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ModuleNotFoundError(f"cannot import module {target!r} for {what} spec {spec!r}: {e}", name=target) from e
        where = f"module {target!r}"
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            candidates = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, candidates, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise AttributeError(f"{what} {attr!r} not found in {where} (spec {spec!r}){hint}")
        obj = getattr(obj, part)
    return obj


def _load_file(target: str, spec: str) -> ModuleType:
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise FileNotFoundError(f"reward plugin file not found: {path} (from spec {spec!r})")

    # A name no real module has; the path hash keeps two 'rewards.py' files apart.
    mod_name = f"_reward_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    import_spec = importlib.util.spec_from_file_location(mod_name, path)
    if import_spec is None or import_spec.loader is None:
        raise ImportError(f"cannot load reward plugin file {path} (from spec {spec!r})")
    module = importlib.util.module_from_spec(import_spec)
    # Present in sys.modules only while the file runs (dataclasses and typing look it up).
    sys.modules[mod_name] = module
    try:
        import_spec.loader.exec_module(module)
    finally:
        sys.modules.pop(mod_name, None)
    _FILE_MODULES[path] = module
    return module

