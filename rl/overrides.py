"""How a recipe is read from text: ``key=value`` overrides parsed as YAML and set into the tree, and
validation errors turned into messages that name the field (and the closest valid one)."""

from __future__ import annotations

import difflib
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class RecipeError(ValueError):
    """A recipe that cannot run. The message names the field."""



def _field_names(model_cls: type[BaseModel]) -> list[str]:
    return list(model_cls.model_fields)


def _section_class(root: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The pydantic class at a dotted path of the recipe (None where the path leaves the typed tree)."""
    cls: Any = root
    for part in path:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        nxt = None
        for c in candidates:
            if isinstance(c, type) and issubclass(c, BaseModel):
                nxt = c
            for inner in getattr(c, "__args__", ()) or ():
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    nxt = inner
        if nxt is None:
            return None
        cls = nxt
    return cls


def format_errors(err: ValidationError, root: type[BaseModel]) -> str:
    """pydantic's errors as lines naming each recipe field; an unknown field gets its closest valid name."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            parent = _section_class(root, loc[:-1])
            valid = _field_names(parent) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            lines.append(f"unknown recipe field '{dotted}'{hint} (valid here: {', '.join(valid)})")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"recipe field '{dotted}': {e['msg']}{got_s}")
    return "\n".join(lines)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree[a][b] = value`` for ``dotted`` = \"a.b\", making the sections on the way."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["trainer.lr=1e-4", "name=x"]`` -> ``[("trainer.lr", 1e-4), ("name", "x")]`` (values parsed as YAML)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise RecipeError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out
