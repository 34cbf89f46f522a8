"""Keep a named section of RESULTS.md up to date between markers, leaving the rest of the file alone.

`python -m benchmarks` rewrites RESULTS.md from results.json; the separate benchmarks (floor,
end_to_end) put their sections back with ``--render``.
"""

from __future__ import annotations

from pathlib import Path

from patchscope.util.storage import atomic_write


def write_section(results_md: Path, name: str, text: str) -> None:
    """Replace the block between ``<!-- name:begin -->`` and ``<!-- name:end -->``, or append it."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    current = results_md.read_text(encoding="utf-8") if results_md.exists() else ""
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        updated = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        updated = current.rstrip("\n") + "\n\n" + block
    atomic_write(results_md, lambda tmp: tmp.write_text(updated, encoding="utf-8"))
