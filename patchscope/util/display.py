"""Notebook display for types of the lower layers, drawn by the report layer.

`AtlasEntry`, `AtlasNeuron` and `SweepResult` define ``_repr_html_`` as `html_view`, which asks this
registry for their renderer. `patchscope.report.notebook` registers the renderers when it is imported
(the package root imports it under IPython), so the atlas and scope layers never import the report layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RENDERERS: dict[str, Callable[[Any], str]] = {}
"""Qualified class name (``patchscope.atlas.atlas.AtlasEntry``) -> a function that draws it as HTML."""


def register(cls: type, render: Callable[[Any], str]) -> None:
    RENDERERS[f"{cls.__module__}.{cls.__qualname__}"] = render


def html_view(obj: Any) -> str | None:
    """The HTML of ``obj`` for Jupyter, or None (Jupyter then shows its text repr) when no renderer is registered."""
    render = RENDERERS.get(f"{type(obj).__module__}.{type(obj).__qualname__}")
    return None if render is None else render(obj)
