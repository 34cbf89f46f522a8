"""Ctrl-C and SIGTERM during long work: finish the current step, save, then stop with one line.

`deferred_interrupts` turns SIGINT/SIGTERM into a flag that the work loop reads between batches;
the loop then writes its checkpoint and raises `Interrupted`, which the CLI prints as one line and
turns into the exit status a shell expects (130 for SIGINT, 143 for SIGTERM). A second signal
while the checkpoint is written stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving its progress (``checkpoint``, when there is one)."""

    def __init__(
        self, signum: int, checkpoint: Path | None = None, detail: str = "", hint: str = "rerun the same command with `resume`"
    ) -> None:
        super().__init__(signum)
        self.signum = signum
        self.checkpoint = checkpoint
        self.detail = detail
        self.hint = hint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return f"interrupted ({name}); nothing was saved"
        return f"interrupted ({name}){self.detail}; checkpoint saved to {self.checkpoint}; {self.hint}"


class InterruptFlag:
    """Set by the first SIGINT/SIGTERM while installed; a second signal raises `Interrupted` at once.

    Outside the main thread signals cannot be caught, and the flag simply never gets set.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def install(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._note) for signum in SIGNALS}
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self:
            raise Interrupted(signum)
        self.signum = signum


@contextmanager
def deferred_interrupts() -> Iterator[InterruptFlag]:
    """Record SIGINT/SIGTERM in a flag for the block instead of stopping."""
    flag = InterruptFlag().install()
    try:
        yield flag
    finally:
        flag.restore()


def raise_on_sigterm() -> Callable[[], object]:
    """Make SIGTERM stop the main thread like Ctrl-C does (an `Interrupted` exception), not silently.

    Returns a function that puts the previous handler back.
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)
