"""Ctrl-C and SIGTERM during long work: finish the current step, save, then stop with one line.

`deferred_interrupts` turns SIGINT/SIGTERM into a flag that the work loop reads between batches;
the loop then writes its checkpoint and raises `Interrupted`, which the CLI prints as one line and
turns into the exit status a shell expects (130 for SIGINT, 143 for SIGTERM). A second signal
while the checkpoint is written stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving its progress (``checkpoint``, when there is one)."""

    def __init__(self, signum: int, checkpoint: Path | None = None, detail: str = "", hint: str = "rerun the same command with `resume`") -> None:
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
    """Set by the first SIGINT/SIGTERM inside `deferred_interrupts`."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def deferred_interrupts() -> Iterator[InterruptFlag]:
    """Record SIGINT/SIGTERM instead of stopping; a second signal raises `Interrupted` at once.

    Outside the main thread signals cannot be caught, and the flag simply never gets set.
    """
    flag = InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def note(signum: int, frame: FrameType | None) -> None:
        if flag:
            raise Interrupted(signum)
        flag.signum = signum

    previous = {signum: signal.signal(signum, note) for signum in SIGNALS}
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def raise_on_sigterm() -> None:
    """Make SIGTERM stop the main thread like Ctrl-C does (an `Interrupted` exception), not silently."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
