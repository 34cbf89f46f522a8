"""The public API is closed: every patchscope type a public function or class takes or returns is exported."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing

import patchscope


def _namespace() -> dict[str, object]:
    """Every class of the package by name: resolves annotations imported only under TYPE_CHECKING."""
    names: dict[str, object] = {}
    for info in pkgutil.walk_packages(patchscope.__path__, "patchscope."):
        if ".cli" not in info.name and not info.name.endswith("__main__"):
            module = importlib.import_module(info.name)
            names.update((n, o) for n, o in vars(module).items() if inspect.isclass(o))
    return names


def _annotated(hint) -> list:
    found = [hint]
    for arg in typing.get_args(hint):
        found += _annotated(arg)
    return found


NAMESPACE = _namespace()


def unexported_types(objects: dict[str, object], exported: set[str]) -> dict[str, str]:
    """``{type name: where it is used}`` for patchscope classes in the signatures of ``objects`` that are not exported."""
    missing = {}
    for name, obj in objects.items():
        functions = [obj] if inspect.isfunction(obj) else []
        if inspect.isclass(obj):
            functions = [f for n, f in vars(obj).items() if inspect.isfunction(f) and (not n.startswith("_") or n == "__init__")]
        for function in functions:
            for hint in typing.get_type_hints(function, localns=NAMESPACE).values():
                for t in _annotated(hint):
                    private = getattr(t, "__name__", "_").startswith("_")
                    if (
                        inspect.isclass(t)
                        and t.__module__.startswith("patchscope")
                        and t.__name__ not in exported
                        and not private
                    ):
                        missing[t.__name__] = f"{name}.{function.__name__}"
    return missing


def test_every_public_signature_type_is_exported():
    objects = {name: getattr(patchscope, name) for name in patchscope.__all__ if name != "__version__"}
    assert unexported_types(objects, set(patchscope.__all__)) == {}
    assert {"Source", "run_with_cache", "Cut", "Layout"} <= set(patchscope.__all__)


def test_the_check_can_fail():
    from patchscope.scope.sweep import sweep

    assert unexported_types({"sweep": sweep}, set(patchscope.__all__) - {"Source"}) == {"Source": "sweep.sweep"}
