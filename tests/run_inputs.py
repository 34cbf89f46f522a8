"""Inputs for a test run of patchscope: a corpus file, a ``patchscope profile`` command line, a Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from factories import FIXTURE_CORPUS

from patchscope.atlas.engine import Profiler

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


@contextmanager
def ctrl_c_at_batch(n: int = 2) -> Iterator[None]:
    """Inside the block, this process gets a SIGINT while the profiler folds its ``n``-th batch, as from a Ctrl-C."""
    fold, calls = Profiler.fold, []

    def fold_then_stop(self, rows, pad_id):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        fold(self, rows, pad_id)

    Profiler.fold = fold_then_stop  # type: ignore[method-assign]
    try:
        yield
    finally:
        Profiler.fold = fold  # type: ignore[method-assign]
