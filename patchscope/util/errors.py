"""How library messages name what the user set.

The library speaks of its parameters, written in backticks: ``"`top_k` must be at least 1"``.
The command line turns each backticked name that is one of its flags into that flag
(``--top-k``), so both audiences read their own vocabulary from one message.
"""

from __future__ import annotations

import re

_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")


def as_flags(message: str, flags: set[str]) -> str:
    """Replace every backticked parameter whose flag is in ``flags`` (e.g. ``{"--top-k"}``) by the flag."""

    def swap(match: re.Match[str]) -> str:
        flag = "--" + match.group(1).replace("_", "-")
        return flag if flag in flags else match.group(0)

    return _PARAMETER.sub(swap, message)
