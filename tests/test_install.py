"""Installing patchscope must not claim the top-level import name `kernels` (HuggingFace's package)."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_folder_installs_under_patchscope(tmp_path):
    probe = (
        "import importlib.util, importlib.metadata, json\n"
        "import patchscope.kernels as ours\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "try:\n    dist = importlib.metadata.version('kernels')\nexcept importlib.metadata.PackageNotFoundError:\n    dist = None\n"
        "from transformers.utils import import_utils\n"
        "print(json.dumps({'ours': ours.__file__, 'spec': spec.origin if spec else None, 'dist': dist,"
        " 'probe': import_utils.is_kernels_available()}))\n"
    )
    # a neutral working directory, so the repository root is not on sys.path
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["ours"].endswith("kernels/__init__.py")
    if found["dist"] is None:  # HF kernels not installed: nothing named `kernels` may be importable
        assert found["spec"] is None
        assert found["probe"] is False
    else:  # installed: `import kernels` must be theirs
        assert "site-packages" in found["spec"] and found["spec"] != found["ours"]


ROOT = Path(__file__).resolve().parents[1]


def _from_root(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` with the repository root as the working directory, so the root is on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(command, cwd=ROOT, input=stdin, capture_output=True, text=True, env=env, timeout=300)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_the_four_repository_root_entry_points_import(gemma_dir, tmp_path):
    """``python -c``, ``python -m patchscope``, ``torchrun -m patchscope profile`` and a notebook (a script
    read from stdin, with ``''`` on sys.path) all work from the clone, where our ``kernels/`` lies."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one small text\nand a second one\n", encoding="utf-8")
    which = (
        "import importlib, patchscope.kernels as ours\n"
        "try:\n    theirs = importlib.import_module('kernels').__file__\n"
        "except ModuleNotFoundError:\n    theirs = 'none'\n"
        "print('theirs', theirs, 'ours', ours.__file__)"
    )
    library = f"import patchscope\n{which}\nmodel, _ = patchscope.load_model({str(gemma_dir)!r})\nprint(type(model).__name__)"
    runs = {
        "python -c": _from_root([sys.executable, "-c", library]),
        "notebook": _from_root([sys.executable, "-"], stdin=f"import sys; assert sys.path[0] == ''\n{library}\n"),
        "python -m": _from_root([sys.executable, "-m", "patchscope", "sites", "--model", str(gemma_dir)]),
        "torchrun": _from_root(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "patchscope"]
            + ["profile", "--model", str(gemma_dir), "--dataset", str(corpus), "--layer", "1", "--device", "cpu"]
            + ["--max-length", "8", "--out", str(tmp_path / "atlas")]
        ),
    }
    for name, result in runs.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
    for name in ("python -c", "notebook"):
        line = next(row for row in runs[name].stdout.splitlines() if row.startswith("theirs"))
        _, theirs, _, ours = line.split()
        assert ours == str(ROOT / "kernels" / "__init__.py")
        if _hf_kernels_installed():
            assert theirs != ours and "site-packages" in theirs, line
        else:  # nothing else is named `kernels`, and our folder does not answer to the name
            assert theirs == "none", line
        assert runs[name].stdout.strip().endswith("ForCausalLM"), name
    assert "blocks.1.mlp.hook_post" in runs["python -m"].stdout
    assert (tmp_path / "atlas" / "atlas.json").exists()


def test_without_hf_kernels_the_folder_is_not_importable_as_kernels(tmp_path):
    """Our folder never answers to ``import kernels``: with no other such package on the path, the import fails."""
    probe = "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]; import kernels"
    result = _from_root([sys.executable, "-c", probe])
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr


def test_every_package_folder_is_installed():
    """A wheel holds only the packages ``pyproject.toml`` lists: a folder missing there is missing for users."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "patchscope").rglob("__init__.py")}
    assert folders | {"patchscope.kernels"} == listed
