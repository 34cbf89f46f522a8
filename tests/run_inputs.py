"""Inputs for a test run of patchscope: a corpus file, a ``patchscope profile`` command line, a Ctrl-C, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from factories import FIXTURE_CORPUS

from patchscope.atlas.engine import Profiler

TEXTS = [t for t in FIXTURE_CORPUS if t]
ROOT = Path(__file__).parent.parent


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


def env(**extra: str) -> dict[str, str]:
    """A child process's environment: this checkout first on the path, one thread per process."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def torchrun(args: list[str], nproc: int = 2, **extra: str) -> subprocess.CompletedProcess:
    """``patchscope ARGS`` under torchrun with ``nproc`` gloo processes on this machine."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "patchscope",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, env=env(**extra), timeout=300)
