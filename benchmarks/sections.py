"""Keep a named section of RESULTS.md up to date between markers, leaving the rest of the file alone.

`python -m benchmarks` rewrites RESULTS.md from results.json; the separate benchmarks (floor,
end_to_end) put their sections back with ``--render``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from patchscope.util.storage import atomic_write, write_json


def write_section(results_md: Path, name: str, text: str) -> None:
    """Replace the block between ``<!-- name:begin -->`` and ``<!-- name:end -->``, or append it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = results_md.read_text(encoding="utf-8") if results_md.exists() else ""
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        updated = head + block + ("\n" + tail if tail else "")  # one blank line before what follows the block
    else:
        updated = current.rstrip("\n") + "\n\n" + block
    atomic_write(results_md, lambda tmp: tmp.write_text(updated, encoding="utf-8"))


def record(store: Path, results_md: Path, name: str, render: Callable[[dict], str], new: dict | None = None) -> str:
    """Add ``new`` (``{key: result}``, none with ``--render``) to the JSON ``store``, rewrite section ``name``
    of ``results_md`` from everything the store holds, and return that section's text."""
    results = json.loads(store.read_text()) if store.exists() else {}
    if new:
        results.update(new)
        write_json(store, results)
    text = render(results)
    write_section(results_md, name, text)
    return text
