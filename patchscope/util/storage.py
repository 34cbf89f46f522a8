"""Atomic file writes: a run killed at any moment leaves either the old file or the new one."""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

_OUR_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")
"""`atomic_write`'s temporary files: ``.NAME.RANDOM.tmp``."""
_SAFETENSORS_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
"""safetensors' own temporary file (``.tmpXXXXXX``, the Rust `tempfile` crate), renamed onto ours when done."""


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it over ``path``, fsync the folder.

    The file ends with the mode an ordinary ``open(path, "w")`` would give it (umask respected),
    not the ``-rw-------`` of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _ordinary_mode(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # after `write`: a writer may have replaced the file by renaming its own onto it
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)  # makes the rename itself durable
    return path


def _ordinary_mode(path: Path) -> int:
    """The mode of the file being replaced, or 0o666 less the umask for a new file."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # the portable way: set and restore
    os.umask(mask)
    return mask


def fsync_directory(directory: str | Path) -> None:
    """Flush a directory entry (a rename, a new file) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary files that killed writes left in ``directory``; returns what was removed.

    Only our own patterns (``.NAME.RANDOM.tmp`` and safetensors' ``.tmpXXXXXX``), and only call it
    while holding the folder's lock (`patchscope.util.lock`), so no live write is touched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if (_OUR_TEMP.match(entry.name) or _SAFETENSORS_TEMP.match(entry.name)) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8"))


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def check_writable(directory: str | Path) -> Path:
    """Fail now, not after hours of work, if outputs cannot be written to ``directory``.

    Creates nothing that stays: a missing folder is checked through its nearest existing parent,
    and is made only when the first output is written.
    """
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise PermissionError(
            f"cannot write to output directory {str(directory)!r}: {error.strerror}; pick another `out`"
        ) from error
    return directory
