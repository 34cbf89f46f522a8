"""Jupyter views of an atlas neuron, an atlas entry and a sweep result, from the dashboard's HTML helpers.

Importing this module registers the renderers that ``_repr_html_`` of `AtlasNeuron`, `AtlasEntry`
and `SweepResult` look up (`patchscope.util.display`); ``import patchscope`` does it when IPython is
loaded. Each view is one fragment with the dashboard's CSS scoped under ``.patchscope``, so it can sit
in a notebook cell, and (like the dashboard) it fetches nothing.
"""

from __future__ import annotations

import math
import re

from patchscope.atlas.atlas import AtlasEntry, AtlasNeuron
from patchscope.report.html import CSS, bar_chart, esc, number, shade
from patchscope.scope.sweep import SweepResult
from patchscope.util.display import register

_SCOPED = re.sub(r"(^|})\s*body\{", r"\1.patchscope{", CSS)  # the page's body style, applied to the fragment


def _fragment(title: str, body: str) -> str:
    return f"<div class=patchscope><style>{_SCOPED}</style><section><h2>{esc(title)}</h2>{body}</section></div>"


def _stats(pairs: list[tuple[str, str]]) -> str:
    return "<div class=stats>" + "".join(f"<span>{esc(k)} <b>{v}</b></span>" for k, v in pairs) + "</div>"


def entry_html(entry: AtlasEntry) -> str:
    """One recorded example: where it is and the value the neuron reached there."""
    stats = _stats(
        [
            ("activation", number(entry.activation, 4)),
            ("rank", str(entry.rank)),
            ("document", str(entry.doc)),
            ("position", str(entry.position)),
            ("token id", str(entry.token)),
        ]
    )
    return _fragment(f"{entry.site} neuron {entry.neuron}, example {entry.rank}", stats)


def neuron_html(neuron: AtlasNeuron) -> str:
    """The neuron's statistics, its top examples as bars (the maximum marked), and a table of where they are."""
    stats = _stats(
        [
            ("model", esc(neuron.model)),
            ("max", number(neuron.max)),
            ("mean", number(neuron.mean)),
            ("fires on", f"{100 * neuron.fire_rate:.2f}%"),
            ("tokens", f"{neuron.n_tokens:,}"),
        ]
    )
    labels = [f"doc {e.doc} pos {e.position}" for e in neuron.entries]
    chart = bar_chart(labels, [e.activation for e in neuron.entries], reference=("max", neuron.max)) if labels else ""
    rows = "".join(
        f"<tr><td>{e.rank}</td><td data-v='{e.activation!r}'>{number(e.activation, 4)}</td>"
        f"<td>{e.doc}</td><td>{e.position}</td><td>{e.token}</td></tr>"
        for e in neuron.entries
    )
    table = f"<table class=examples><tr><th>rank</th><th>activation</th><th>document</th><th>position</th><th>token id</th></tr>{rows}</table>"
    empty = "" if labels else "<p class=muted>no recorded examples</p>"
    return _fragment(f"{neuron.site} neuron {neuron.neuron}", stats + chart + table + empty)


def _heatmap(result: SweepResult, metric: str, condition: str) -> str:
    grid = result.grid(metric, condition)
    finite = [abs(v) for v in grid.flat if math.isfinite(v)]
    scale = max(finite, default=1.0) or 1.0
    head = "".join(f"<th>t={t}</th>" for t in result.target_layers)
    body = "".join(
        f"<tr><th>s={s}</th>"
        + "".join(
            f"<td class=cell data-v='{float(v)!r}' style='background:{shade(float(v), scale)}'>{number(float(v), 2)}</td>"
            for v in grid[i]
        )
        + "</tr>"
        for i, s in enumerate(result.source_layers)
    )
    table = f"<table class=heatmap data-metric='{esc(metric)}' data-condition='{esc(condition)}'>"
    return f"<h3>{esc(metric)} ({esc(condition)})</h3>{table}<tr><th></th>{head}</tr>{body}</table>"


def sweep_html(result: SweepResult) -> str:
    """Per condition, precision@1 over source (rows) x target (columns) layers, means over the sources."""
    stats = _stats([("sources", str(len(result.sources))), ("layer pairs", str(len(result.pairs)))])
    maps = "".join(_heatmap(result, "hit", condition) for condition in result.conditions())
    notes = "".join(f"<p class=muted>{esc(note)}</p>" for note in result.notes)
    return _fragment("Patchscope sweep", stats + f"<div class=cols>{maps}</div>" + notes)


register(AtlasEntry, entry_html)
register(AtlasNeuron, neuron_html)
register(SweepResult, sweep_html)
