"""Run ``patchscope profile`` in a child process that stops at a chosen point and waits.

The child prints ``READY`` at the point and then blocks on its stdin, so the test decides what
happens next (SIGKILL, SIGINT, SIGTERM, or a newline to go on) with no timing involved.
"""

from __future__ import annotations

import selectors
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import patchscope.atlas.profiling as run_module
import patchscope.util.storage as storage
from patchscope.atlas.engine import Profiler
from patchscope.cli.main import main

POINT, AT = {point!r}, {at!r}

def pause():
    print("READY", flush=True)
    sys.stdin.readline()

if POINT == "after_checkpoint":  # a checkpoint is durable on disk
    checkpoint = run_module._checkpoint
    def after(run, folder, loop):
        checkpoint(run, folder, loop)
        if loop.batches == AT:
            pause()
    run_module._checkpoint = after
elif POINT == "mid_checkpoint":  # the new checkpoint is written to its temporary file, not yet renamed
    replace, seen = storage.os.replace, []
    def held(src, dst):
        if str(dst).endswith("checkpoint.safetensors"):
            seen.append(dst)
            if len(seen) == AT:
                pause()
        replace(src, dst)
    storage.os.replace = held
elif POINT == "before_commit":  # atlas.safetensors is written; the exports and atlas.json are not
    before = run_module._before_commit
    def held(*args, **kwargs):
        pause()
        before(*args, **kwargs)
    run_module._before_commit = held
elif POINT == "before_batch":  # batches 1..AT-1 are folded; batch AT is about to be
    fold, calls = Profiler.fold, []
    def held(self, rows, pad_id):
        calls.append(1)
        if len(calls) == AT:
            pause()
        fold(self, rows, pad_id)
    Profiler.fold = held
sys.exit(main({argv!r}))
"""


def start(point: str, at: int, argv: list[str], timeout: float = 300) -> subprocess.Popen:
    """Start the child and return once it has reached ``point`` (it is then blocked, waiting)."""
    script = CHILD.format(tests=str(Path(__file__).parent), point=point, at=at, argv=argv)
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout)  # a bound for a hung child, not a timing that decides anything
    line = child.stdout.readline() if ready else ""
    if line.strip() != "READY":
        child.kill()
        _, err = child.communicate()
        raise AssertionError(f"the child never reached {point}: {err[-3000:]}")
    return child


def go_on(child: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Let a paused child continue; its exit status and stderr."""
    _, err = child.communicate("\n", timeout=timeout)
    return child.returncode, err
