"""The package's layers, read from the import statements: imports only go down.

    util, kernels, atlas.stats  <  model  <  atlas  <  sae, scope  <  report  <  experiment  <  cli

A module may import its own layer and the layers below it, never one above. `atlas.stats` holds the
atlas's data types, which the kernels fill: it sits with the kernels and imports nothing of ours. Read statically with
`ast`, so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "_version": 0,
    "util": 0,
    "kernels": 0,
    "model": 1,
    "atlas": 2,
    "sae": 3,
    "scope": 3,
    "report": 4,
    "experiment": 5,
    "cli": 6,
    "__main__": 7,
}
MODULE_LAYERS = {"patchscope.atlas.stats": 0}
"""Modules placed apart from their folder's layer."""


def _layer(module: str) -> int | None:
    """``patchscope.atlas.profiling`` -> the layer of ``atlas``; None for the package root."""
    parts = module.split(".")
    if parts[0] != "patchscope" or len(parts) < 2:
        return None
    return MODULE_LAYERS.get(module, LAYERS[parts[1]])


def _modules() -> list[tuple[str, Path]]:
    found = [
        (".".join(("patchscope", *p.relative_to(ROOT / "patchscope").with_suffix("").parts)), p)
        for p in (ROOT / "patchscope").rglob("*.py")
    ]
    found += [("patchscope.kernels." + p.stem, p) for p in (ROOT / "kernels").glob("*.py")]
    return [(name.removesuffix(".__init__"), path) for name, path in found if name != "patchscope.__init__"]


def _imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                out.add(node.module)
    return {m for m in out if m == "patchscope" or m.startswith("patchscope.")}


@pytest.mark.parametrize("name, path", _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_only_go_down(name, path):
    own = _layer(name)
    assert own is not None, f"{name} is in no layer: add its folder to LAYERS"
    for target in _imports(name, path):
        layer = _layer(target)
        assert layer is not None, f"{name} imports the package root ({target}); import the defining module instead"
        assert layer <= own, f"{name} (layer {own}) imports {target} (layer {layer}): imports must only go down"


def test_the_atlas_types_import_nothing_of_ours():
    assert _imports("patchscope.atlas.stats", ROOT / "patchscope" / "atlas" / "stats.py") == set()


def test_the_check_can_fail():
    assert _layer("patchscope.cli.main") > _layer("patchscope.model.hooks")
    bad = ROOT / "tests" / "_layering_probe.py"
    try:
        bad.write_text("from patchscope.cli.main import main\n")
        assert "patchscope.cli.main" in _imports("patchscope.model.probe", bad)
    finally:
        bad.unlink()
