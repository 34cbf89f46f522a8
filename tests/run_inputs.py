"""Inputs for a test run of patchscope: a corpus file, and a ``patchscope profile`` command line."""

from __future__ import annotations

import json
from pathlib import Path

from factories import FIXTURE_CORPUS

TEXTS = [t for t in FIXTURE_CORPUS if t]


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return path


def profile_argv(model_dir: Path, data: Path, out: Path, *flags: str) -> list[str]:
    """``patchscope profile`` of ``data`` (every row) on the CPU into ``out``, plus ``flags``."""
    return [
        "profile",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--dataset",
        str(data),
        "--split",
        "",
        *flags,
        "--out",
        str(out),
    ]
