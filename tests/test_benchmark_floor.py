"""`python -m benchmarks.floor` runs on a tiny budget and renders its section. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_floor_benchmark_runs_and_renders(tmp_path):
    data = tmp_path / "floor.json"
    args = [
        "--shape",
        "tiny",
        "--layer",
        "1",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--batches",
        "1",
        "--warmup",
        "0",
        "--runs",
        "1",
        "--dtypes",
        "float32",
        "--no-compile",
        "--json",
        str(data),
        "--results",
        str(tmp_path / "RESULTS.md"),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.floor", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (section,) = json.loads(data.read_text()).values()
    assert section["rows"]["floor: bare forward, decoder cut after the layer"]["vs_floor"] == 1.0
    assert all(row["tokens_per_s"] > 0 for row in section["rows"].values())
    assert "whole call: patchscope.profile(texts), defaults" in section["rows"]  # what a user pays, beside the steady state
    assert "| profiler, defaults (top-k, moments, bottom-k, histogram) |" in result.stdout and "_Conditions: CPU" in result.stdout
    assert "<!-- floor:begin -->" in (tmp_path / "RESULTS.md").read_text()
