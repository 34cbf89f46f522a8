"""One writer per output folder: an exclusive advisory lock (``flock``) on a file inside it.

The kernel drops the lock when its process ends, however it ends, so a killed run never leaves a
stale lock behind. A second run on the same folder is refused at once, with the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".patchscope.lock"

_HELD: dict[Path, int] = {}
"""Folders this process holds, with a nesting count: `run_experiment` holds `out` while `profile` writes it."""


class OutputBusyError(RuntimeError):
    """Another process is writing to the same output folder."""


@contextmanager
def output_lock(directory: str | Path) -> Iterator[Path]:
    """Hold ``directory`` exclusively for the block; creates it (and removes it again if the block
    left it empty, so a failed run leaves no empty output folder behind)."""
    directory = Path(directory).absolute()
    if directory in _HELD:
        _HELD[directory] += 1
        try:
            yield directory
        finally:
            _HELD[directory] -= 1
        return
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    fd = _acquire(directory / LOCK_FILE)
    _HELD[directory] = 1
    try:
        yield directory
    finally:
        del _HELD[directory]
        (directory / LOCK_FILE).unlink(missing_ok=True)  # before unlocking: see `_acquire`
        os.close(fd)
        if created:
            try:
                directory.rmdir()  # only succeeds when nothing was written
            except OSError:
                pass


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputBusyError(
                f"another patchscope run{holder} is writing to {path.parent}; wait for it to finish, or pick another `out`"
            ) from None
        # The holder unlinks the file before unlocking; if we locked a file that is no longer at
        # `path`, the next run would lock a fresh one beside us. Try again on the current file.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def is_held(directory: str | Path) -> bool:
    """Whether this process holds ``directory``'s lock."""
    return Path(directory).absolute() in _HELD
