"""The benchmark driver runs end to end on a tiny budget. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_by_default_a_run_leaves_the_recorded_results_alone(tmp_path):
    import importlib.util

    # import the benchmarks package from its folder: the repo root on sys.path would shadow `kernels`
    spec = importlib.util.spec_from_file_location(
        "benchmarks", ROOT / "benchmarks" / "__init__.py", submodule_search_locations=[str(ROOT / "benchmarks")]
    )
    sys.modules["benchmarks"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["benchmarks"])
    from benchmarks.__main__ import HERE, parse

    default = parse([])
    assert Path(default.out).parent.parent == HERE / "runs" and Path(default.json).parent == Path(default.out).parent
    assert Path(default.out) != HERE / "RESULTS.md" and Path(default.json) != HERE / "results.json"
    chosen = parse(["--run-dir", str(tmp_path)])
    assert (chosen.out, chosen.json) == (str(tmp_path / "RESULTS.md"), str(tmp_path / "results.json"))
    recorded = parse(["--record"])
    assert (recorded.out, recorded.json) == (str(HERE / "RESULTS.md"), str(HERE / "results.json"))
    assert "runs/" in (ROOT / ".gitignore").read_text().replace("benchmarks/runs/", "runs/")


@pytest.mark.slow
def test_driver_writes_results(tmp_path):
    out, data = tmp_path / "RESULTS.md", tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--json", str(data)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(data.read_text())
    (section,) = results.values()
    assert section["conditions"]["dtype"] == "float32" and section["conditions"]["torch_version"]
    assert "patchscope profiler (top-k atlas update included)" in section["throughput"]
    assert all(t["tokens_per_s"] > 0 and t["peak_mb"] is not None for t in section["throughput"].values())
    text = out.read_text()
    for heading in ("Profiling throughput", "Hook cost", "JumpReLU SAE encode", "Patchscope generation", "Growing the dataset"):
        assert heading in text
    assert "_Conditions: CPU" in text


GPU_MACHINE = """
import runpy, sys
# what the GPU machine lacks: the check must run without them
for name in ("datasets", "gguf", "transformer_lens", "nnsight"):
    sys.modules[name] = None
sys.argv = ["python -m benchmarks.gpu", "--dry-run", "--out", sys.argv[1]]
runpy.run_module("benchmarks.gpu", run_name="__main__")
"""


def test_gpu_check_dry_run_covers_every_section_without_the_missing_wheels(tmp_path):
    """`python -m benchmarks.gpu --dry-run`: the GPU check's code paths on the CPU at a tiny shape, with
    `datasets`, `gguf`, TransformerLens and nnsight unimportable, as on the GPU machine."""
    result = subprocess.run(
        [sys.executable, "-c", GPU_MACHINE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    rows = report["rows"]
    sections = {row["section"] for row in rows}
    assert sections == {"hook parity", "triton pass", "profile parity", "cached patch", "speed", "whole model", "gpu paths"}
    assert not [row for row in rows if row["ok"] is False], [row for row in rows if row["ok"] is False]
    assert sum(row["ok"] is True for row in rows) >= 12  # the correctness rows ran and passed
    names = [row["name"] for row in rows]
    assert any("whole call" in n for n in names) and any("projected time for 10M tokens" in n for n in names)
    assert any(row["note"] == "skipped: transformer_lens is not installed" for row in rows)
    assert "| hook parity |" in (tmp_path / "gpu.md").read_text()


def test_the_gpu_paths_rows_name_what_they_skip(monkeypatch):
    """`benchmarks.gpu_paths.measure` where CUDA is absent: one row saying so, not a crash."""
    import torch

    from benchmarks import gpu_paths

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_paths.measure("cuda", torch.bfloat16, dry_run=True) == [
        dict(kind="all", device="cuda", note="skipped: CUDA is not available here")
    ]
    assert "needs CUDA" in gpu_paths._skip("triton", "cpu") and gpu_paths._skip("separate", "cpu") == ""


def test_whole_model_at_a_shape_writes_its_section(tmp_path):
    """`benchmarks.whole_model_shape` on the tiny shape: its three peers, their ratios, its section."""
    data, results = tmp_path / "shape.json", tmp_path / "RESULTS.md"
    args = ["--shape", "tiny", "--docs", "4", "--seq-len", "16", "--batch-tokens", "32", "--runs", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.whole_model_shape", *args, "--json", str(data), "--results", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads(data.read_text()).values()
    assert set(run["seconds"]) == {"one pass", "one pass, top-k and moments only (bottom_k=0, histogram=False)", "floor"}
    assert run["tokens"] == 4 * 16 and run["floor_over_one_pass"] > 0
    assert "<!-- whole-model-shape:begin -->" in results.read_text() and "4 layers, d_model 64" in results.read_text()
