"""Config error messages that name the YAML path, file line and column of each problem."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import yaml
from pydantic import BaseModel, ValidationError

Loc: TypeAlias = tuple[int | str, ...]
LocatedError: TypeAlias = tuple[Loc, str]


def line_index(text: str) -> dict[Loc, tuple[int, int]]:
    """Map each YAML path (keys and list indices) to its 1-based line and column."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    index: dict[Loc, tuple[int, int]] = {}

    def walk(node: yaml.Node, loc: Loc) -> None:
        index[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*loc, key.value)
                walk(value, child)
                # Point unknown-key errors at the key itself, not its value.
                index[child] = (key.start_mark.line + 1, key.start_mark.column + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*loc, i))

    if root is not None:
        walk(root, ())
    return index


def dotted(loc: Loc) -> str:
    """``('ensembles', 0, 'members')`` -> ``ensembles[0].members``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _known_keys(loc: Loc, schema: type[BaseModel] | None) -> list[str]:
    """Field names allowed at the parent of ``loc``, found by walking ``schema``'s models."""
    model: Any = schema
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(str(part))
            if field is None:
                return []  # a dict key such as a tier name
            model = _inner_model(field.annotation)
        else:
            model = None
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside ``X``, ``list[X]``, ``dict[str, X]`` or ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _message(loc: Loc, msg: str, kind: str, schema: type[BaseModel] | None) -> str:
    if kind == "extra_forbidden" and loc:
        key = str(loc[-1])
        text = f"unknown key {key!r}"
        return text + did_you_mean(key, _known_keys(loc, schema))
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":  # our validators' own messages, without pydantic's prefix
        return msg.removeprefix("Value error, ")
    return msg


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest known name, else ``""``."""
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def format_errors(
    source: str,
    errors: ValidationError | Sequence[LocatedError],
    lines: dict[Loc, tuple[int, int]],
    schema: type[BaseModel] | None = None,
) -> list[str]:
    """One line per problem: ``file:line:col: yaml.path: message``; an unknown key gets a
    "did you mean" from the keys ``schema`` (the root model validated) allows there."""
    located: list[tuple[Loc, str]] = []
    if isinstance(errors, ValidationError):
        for e in errors.errors():
            loc = tuple(e["loc"])
            located.append((loc, _message(loc, e["msg"], e["type"], schema)))
    else:
        located = list(errors)
    out = []
    for loc, msg in located:
        where = source
        probe = loc
        while probe not in lines and probe:
            probe = probe[:-1]  # a missing key: point at its parent
        if probe in lines:
            line, col = lines[probe]
            where = f"{source}:{line}:{col}"
        out.append(f"{where}: {dotted(loc)}: {msg}")
    return out
