"""Dataclass configs -> argparse, so defaults and help text live in one place.

Help text is each field's ``field(metadata={"help": ...})``; the default is appended once.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin


def field_help(spec: dataclasses.Field) -> str:
    """A field's help text, from ``field(metadata={"help": ...})``."""
    text = spec.metadata.get("help")
    if not text:
        raise TypeError(f"config field {spec.name!r} has no help text: declare it with field(metadata={{'help': ...}})")
    return " ".join(text.split()).replace("%", "%%")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None
) -> None:
    """One ``--flag`` per field of ``cls`` (or of its fields named in ``only``), typed from its annotation."""
    hints = typing.get_type_hints(cls)
    group = parser if only is not None else parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for spec in dataclasses.fields(cls):
        if spec.name in skip or not spec.init or (only is not None and spec.name not in only):
            continue
        hint = hints[spec.name]
        default = (
            spec.default
            if spec.default is not dataclasses.MISSING
            else (spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None)
        )
        help_text = field_help(spec)
        base, optional = _unwrap(hint)
        if default not in (None, ()) and "default" not in help_text:
            help_text += " (default: %(default)s)"  # written once: BooleanOptionalAction then adds none
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
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
        if (
            spec.name in values
            and isinstance(values[spec.name], list)
            and get_origin(_unwrap(typing.get_type_hints(cls)[spec.name])[0]) is tuple
        ):
            values[spec.name] = tuple(values[spec.name])
    return cls(**values)
