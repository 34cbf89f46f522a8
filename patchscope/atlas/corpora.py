"""Built-in corpora: real English text that ships with Python, so profiling needs no download.

``python-docs`` is the prose of CPython's ``pydoc_data.topics`` (the text ``help("assert")`` shows),
one document per paragraph. The order is fixed, so absolute document indices are stable for one
Python version:

1. topics in sorted order of their key (``assert``, ``assignment``, ``async``, ...);
2. within a topic, its paragraphs (blocks separated by blank lines) in reading order;
3. kept only if prose: the first line is not indented (indented blocks are code, grammar or
   tables) and is not a ``>>>`` session, the block is not a heading (its last line is not an
   underline such as ``*****``) and it has at least 3 words;
4. each paragraph's hard-wrapped lines are joined with single spaces.

The text changes between Python releases, so the Python version is recorded with every atlas.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable

PYTHON_DOCS = "python-docs"

_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_UNDERLINE = re.compile(r"^([*=~^\-#+])\1{2,}$")
_MIN_WORDS = 3


def python_docs() -> list[str]:
    """The paragraphs of ``pydoc_data.topics``, in the documented order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in _BLANK_LINE.split(topics[key]):
            lines = [line for line in block.split("\n") if line.strip()]
            if not lines or lines[0][:1].isspace() or lines[0].startswith(">>>") or _UNDERLINE.match(lines[-1].strip()):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= _MIN_WORDS:
                paragraphs.append(text)
    return paragraphs


BUILTIN: dict[str, Callable[[], list[str]]] = {PYTHON_DOCS: python_docs}
"""Dataset names that are read from the Python installation instead of a file or the hub."""


def is_builtin(dataset: str) -> bool:
    return dataset in BUILTIN


def builtin_version(dataset: str) -> str:
    """What the built-in corpus's text depends on (the Python version), recorded in atlas metadata."""
    return f"python {platform.python_version()}" if is_builtin(dataset) else ""
