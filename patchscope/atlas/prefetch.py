"""Plan the next batches in a background thread while the current one runs on the device.

Reading and tokenizing is Python and Rust work on the host; the forward pass spends its time in
torch kernels that release the GIL. Running the planner ahead in a thread overlaps the two. The
order of the batches is unchanged, so checkpoints and resume see the same sequence.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order while a daemon thread produces up to ``depth`` of them ahead.

    An exception in the producer is raised here, at the item where it happened. Closing the
    generator early (an error or an interrupt in the consumer) stops the producer.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as error:  # handed to the consumer, raised there
            offer(error)

    thread = threading.Thread(target=produce, name="patchscope-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
