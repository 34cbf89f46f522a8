"""``--layers all | 3-9 | 0,6,12``: which blocks a whole-model profile reads, and at which per-block site.

A selection expands to one site per layer (``blocks.L.<site_kind>``); the profiler reads them all in
one forward pass that stops after the deepest (`patchscope.atlas.engine.Profiler`). ``all`` needs the
model's layer count, which `ProfileConfig.for_model` supplies from the model's config before any
weights load.
"""

from __future__ import annotations

import re
from typing import Literal

SiteKind = Literal[
    "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"
]
"""The per-block sites (`patchscope.model.sites.SITE_SUFFIXES`, the same names in the same order; tested)."""

ALL = "all"
_RANGE = re.compile(r"^(\d+)-(\d+)$")
_FORMS = "`all`, a range such as `3-9`, or a list such as `0,6,12` (ranges may be listed: `0-3,12`)"


class LayerSelectionError(ValueError):
    """A ``layers`` selection that cannot be read, or that names layers the model lacks."""


def check_spelling(text: str) -> None:
    """Refuse a selection that cannot be read, without a model."""
    if text.strip() != ALL:
        _numbers(text)


def needs_count(text: str) -> bool:
    """Whether the selection can only be expanded knowing the model's layer count (``all``)."""
    return text.strip() == ALL


def parse_layers(text: str, n_layers: int | None = None) -> tuple[int, ...]:
    """The layers of a selection, ascending and without repeats; checked against ``n_layers`` when given.

    >>> parse_layers("0,6,12")
    (0, 6, 12)
    >>> parse_layers("3-5")
    (3, 4, 5)
    >>> parse_layers("all", 4)
    (0, 1, 2, 3)
    """
    if needs_count(text):
        if n_layers is None:
            raise LayerSelectionError("`layers` all needs the model's layer count: call ProfileConfig.for_model(n_layers)")
        return tuple(range(n_layers))
    layers = _numbers(text)
    if n_layers is not None:
        beyond = [layer for layer in layers if layer >= n_layers]
        if beyond:
            raise LayerSelectionError(
                f"`layers` {text}: layer {beyond[0]} is out of range, the model has layers 0..{n_layers - 1}; "
                f"use `all` or a range within it"
            )
    return layers


def _numbers(text: str) -> tuple[int, ...]:
    found: set[int] = set()
    for part in text.replace(" ", "").split(","):
        match = _RANGE.fullmatch(part)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            if last < first:
                raise LayerSelectionError(f"`layers` {text}: the range {part} runs backwards; write {last}-{first}")
            found.update(range(first, last + 1))
        elif part.isdigit():
            found.add(int(part))
        else:
            raise LayerSelectionError(f"`layers` {text!r} cannot be read: give {_FORMS}")
    return tuple(sorted(found))


def layer_sites(layers: tuple[int, ...], site_kind: str) -> tuple[str, ...]:
    """``blocks.L.<site_kind>`` for each layer, in forward order."""
    return tuple(f"blocks.{layer}.{site_kind}" for layer in layers)
