"""Atomic file writes: a run killed at any moment leaves either the old file or the new one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8"))


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def check_writable(directory: str | Path) -> Path:
    """Fail now, not after hours of work, if outputs cannot be written to ``directory``."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".patchscope-write-test"
        probe.write_text("ok")
        probe.unlink(missing_ok=True)  # torchrun ranks probe the same directory at once
    except OSError as error:
        raise PermissionError(f"cannot write to output directory {str(directory)!r}: {error.strerror}; pick another `out`") from error
    return directory
