"""Dataclass configs -> argparse, so defaults and help text live in one place.

Help text is the docstring written under each field (read from the source with `ast`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache
from typing import Any, Literal, get_args, get_origin


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for the string literal that follows each annotated field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``cls``, typed from its annotation."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for spec in dataclasses.fields(cls):
        if spec.name in skip or not spec.init:
            continue
        hint = hints[spec.name]
        default = spec.default if spec.default is not dataclasses.MISSING else (
            spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None
        )
        kwargs: dict[str, Any] = {"default": default, "help": docs.get(spec.name, "") + f" (default: {default})"}
        base, optional = _unwrap(hint)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is Literal:
            kwargs["choices"] = list(get_args(base))
            kwargs["type"] = type(get_args(base)[0])
        elif get_origin(base) in (list, tuple):
            kwargs["nargs"] = "+"
            kwargs["type"] = get_args(base)[0]
        else:
            kwargs["type"] = base
        flags = spec.metadata.get("flags", (_flag(spec.name),))
        group.add_argument(*flags, dest=spec.name, **kwargs)


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``."""
    args = get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def from_namespace(cls: type, namespace: argparse.Namespace, **extra: Any) -> Any:
    """Build ``cls`` from the parsed flags that belong to it."""
    names = {f.name for f in dataclasses.fields(cls) if f.init} - extra.keys()
    values = {name: getattr(namespace, name) for name in names if hasattr(namespace, name)}
    values.update(extra)
    for spec in dataclasses.fields(cls):  # nargs="+" gives lists; keep tuples where declared
        if spec.name in values and isinstance(values[spec.name], list) and get_origin(_unwrap(typing.get_type_hints(cls)[spec.name])[0]) is tuple:
            values[spec.name] = tuple(values[spec.name])
    return cls(**values)
