"""How the package reads: short functions, and one file name per concept (STYLE.md)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONGEST = 60
"""Lines from ``def`` to the function's last line, docstring included."""


def _sources() -> list[Path]:
    return sorted([*(ROOT / "patchscope").rglob("*.py"), *(ROOT / "kernels").glob("*.py")])


def long_functions(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > LONGEST:
                    found.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_over_60_lines():
    assert long_functions(_sources()) == []


def test_the_length_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n" + "    x = 1\n" * (LONGEST - 1))
    assert long_functions([probe]) == []
    probe.write_text("def f():\n" + "    x = 1\n" * LONGEST)
    assert long_functions([probe]) == [f"probe.py:1 f ({LONGEST + 1} lines)"]


def shared_names(paths: list[Path]) -> list[str]:
    names = Counter(p.name for p in paths if p.name != "__init__.py" and "cli" not in p.parent.parts)
    return [name for name, count in names.items() if count > 1]


def test_no_two_modules_share_a_name(tmp_path):
    """``atlas/run.py`` beside ``cli/run.py`` makes a reader open both. The CLI's modules are named for their
    subcommands (``cli/sweep.py`` is ``patchscope sweep``), so they are left out."""
    assert shared_names([p.relative_to(ROOT) for p in _sources()]) == []
    assert shared_names([Path("atlas/run.py"), Path("cli/run.py"), Path("scope/run.py")]) == ["run.py"]
