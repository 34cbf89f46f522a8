"""The benchmark driver runs end to end on a tiny budget. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_driver_writes_results(tmp_path):
    out, data = tmp_path / "RESULTS.md", tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), "--json", str(data)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
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
