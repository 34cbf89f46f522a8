"""The static neuron dashboard: an index of every neuron, and a page for each chosen neuron.

``index.html`` holds, per site, a sortable and filterable table of every neuron (max, min, density,
mean, std), a search box for a neuron number, and a density/max overview plot. ``neurons/*.html``
show a neuron's top and bottom examples as shaded token sequences, its quantile examples, its
histogram and its output-token view. Pages are self-contained (`patchscope.report.html`).

Sorting is scriptable through the URL: ``index.html#sort=max&desc=1`` sorts on load (a test renders
that in a headless browser).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.feature_site import FeatureSite
from patchscope.atlas.output_tokens import OutputTokens, output_tokens
from patchscope.kernels.histogram import bin_ranges
from patchscope.kernels.quantiles import INTERVALS
from patchscope.report.html import esc, histogram_chart, number, page, scatter_chart, tokens_html
from patchscope.report.neuronpedia_links import feature_of, page_url
from patchscope.report.replay import Context, Example, replay_contexts
from patchscope.util.storage import atomic_write

INDEX = "index.html"
COLUMNS = ("max", "min", "density", "mean", "std")


@dataclass(frozen=True)
class DashboardConfig:
    """What the dashboard shows."""

    top: int = field(default=20, metadata={"help": "Neurons per site that get their own page: those with the largest maxima."})
    neurons: tuple[int, ...] = field(
        default=(), metadata={"help": "Explicit neurons to give pages (every site) instead of --top."}
    )
    examples: int = field(default=10, metadata={"help": "Top and bottom examples shown per neuron."})
    before: int = field(default=24, metadata={"help": "Context tokens shown before each example's token."})
    after: int = field(default=8, metadata={"help": "Context tokens shown after it."})
    output_k: int = field(default=12, metadata={"help": "Tokens in the output-token view, each direction."})

    def validate(self) -> None:
        if self.top < 1 and not self.neurons:
            raise ValueError(f"`top` must be at least 1 (or name `neurons`), got {self.top}")
        if self.examples < 1 or self.before < 0 or self.after < 0:
            raise ValueError("`examples` must be at least 1, and `before` / `after` must not be negative")


def neuron_file(site: str, neuron: int) -> str:
    return f"neurons/{site}-{neuron}.html"


def chosen_neurons(atlas: Atlas, config: DashboardConfig) -> dict[str, list[int]]:
    chosen = {}
    for site, stats in atlas.sites.items():
        if config.neurons:
            bad = [n for n in config.neurons if not 0 <= n < stats.n_neurons]
            if bad:
                raise IndexError(f"`neurons` {bad} are out of range: {site} has neurons 0..{stats.n_neurons - 1}")
            chosen[site] = list(dict.fromkeys(config.neurons))
        else:
            chosen[site] = atlas.top_neurons(site, min(config.top, stats.n_neurons))
    return chosen


def shown_examples(atlas: Atlas, site: str, neuron: int, config: DashboardConfig) -> dict[str, list[tuple[float, Example]]]:
    """``{"top"|"bottom"|"quantile b": [(atlas value, example)]}`` for one neuron, in display order."""
    stats = atlas[site]
    groups: dict[str, list[tuple[float, Example]]] = {}

    def take(values, docs, positions, limit):
        return [
            (float(v), Example(neuron, int(d), int(p)))
            for v, d, p in zip(values.tolist(), docs.tolist(), positions.tolist())
            if d >= 0
        ][:limit]

    groups["top"] = take(stats.top.values[:, neuron], stats.top.doc[:, neuron], stats.top.pos[:, neuron], config.examples)
    if stats.bottom is not None:
        groups["bottom"] = take(
            stats.bottom.values[:, neuron], stats.bottom.doc[:, neuron], stats.bottom.pos[:, neuron], config.examples
        )
    if stats.quantiles is not None:
        q = stats.quantiles
        for b in reversed(range(INTERVALS)):
            order = torch.argsort(q.values[b, :, neuron], descending=True)
            groups[f"quantile {b}"] = take(
                q.values[b, order, neuron], q.doc[b, order, neuron], q.pos[b, order, neuron], q.per_interval
            )
    return groups


def write_dashboard(
    atlas: Atlas,
    out: str | Path,
    *,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Mapping[int, str],
    config: DashboardConfig = DashboardConfig(),
    features: Sequence[FeatureSite] = (),
) -> Path:
    """Write ``index.html`` and the neuron pages into ``out``; returns the index path.

    ``features``: the SAEs of the atlas's feature sites (`patchscope.sae.features.feature_site`), to replay them.
    """
    config.validate()
    out = Path(out)
    chosen = chosen_neurons(atlas, config)
    for site, neurons in chosen.items():
        groups = {n: shown_examples(atlas, site, n, config) for n in neurons}
        wanted = [example for per in groups.values() for group in per.values() for _, example in group]
        sae = feature_of(site, features)
        contexts = replay_contexts(model, tokenizer, atlas, site, wanted, texts, before=config.before, after=config.after,
                                   encode=sae.encode if sae else None)  # fmt: skip
        view = None if sae else output_tokens(model, site, neurons, config.output_k)
        for n in neurons:
            url = page_url(atlas.meta.model, site, n, features)
            html_text = neuron_page(atlas, site, n, groups[n], contexts, view, tokenizer, url=url)

            def write_page(tmp: Path, text: str = html_text) -> int:
                return Path(tmp).write_text(text, encoding="utf-8")

            atomic_write(out / neuron_file(site, n), write_page)
    index = out / INDEX
    html_text = index_page(atlas, chosen)
    atomic_write(index, lambda tmp: Path(tmp).write_text(html_text, encoding="utf-8"))
    return index


# -- the neuron page


def _stats_line(atlas: Atlas, site: str, n: int) -> str:
    s = atlas[site]
    items = [
        ("max", float(s.max[n])),
        ("min", float(s.min[n]) if s.min is not None else None),
        ("mean", float(s.mean[n])),
        ("std", float(s.std[n])),
        ("density (share of tokens > 0)", float(s.fire_rate[n])),
    ]
    spans = [f"<span>{esc(k)} <b data-stat='{esc(k.split()[0])}' data-v='{v!r}'>{number(v, 4)}</b></span>" for k, v in items]
    nonfinite = int(s.moments.nonfinite[n])
    if nonfinite:
        spans.append(f"<span class=warn>{nonfinite} inf/nan activations left out</span>")
    return "<div class=stats>" + "".join(spans) + "</div>"


def _examples_html(group: Sequence[tuple[float, Example]], contexts: Mapping[Example, Context], scale: float) -> str:
    if not group:
        return "<p class=muted>none recorded</p>"
    rows = []
    for value, example in group:
        context = contexts[example]
        rows.append(
            f"<div class=ex data-doc={example.doc} data-pos={example.position} data-act='{value!r}' data-ntokens={len(context.tokens)}>"
            f"<span class=v title='activation recorded in the atlas'>{number(value)}</span>"
            f"<span class=where>doc {example.doc} · pos {example.position}</span>"
            f"{tokens_html(context.tokens, context.values, scale, context.focus)}</div>"
        )
    return "".join(rows)


def _output_tokens_html(view: OutputTokens | None, n: int, tokenizer: PreTrainedTokenizerBase) -> str:
    if view is None:
        return "<p class=muted>this site has no output direction of its own</p>"
    row = view.neurons.index(n)

    def column(title: str, ids, values) -> str:
        names = tokenizer.batch_decode([[i] for i in ids.tolist()])
        cells = "".join(
            f"<tr><td class='l ctx'>{esc(repr(t))}</td><td data-v='{v!r}'>{number(v)}</td></tr>"
            for t, v in zip(names, values.tolist())
        )
        return f"<div><h3>{title}</h3><table>{cells}</table></div>"

    return (
        "<div class=cols>"
        + column("promoted (top logits)", view.top_ids[row], view.top_values[row])
        + column("suppressed (bottom logits)", view.bottom_ids[row], view.bottom_values[row])
        + "</div><p class=muted>W_U · (final-norm gain ⊙ post-MLP-norm gain ⊙ down_proj[:, n]); RMS scaling and soft-cap left out "
        "(they rescale every logit alike). See patchscope/atlas/output_tokens.py.</p>"
    )


def neuron_page(atlas: Atlas, site: str, n: int, groups, contexts, view, tokenizer, *, url: str | None = None) -> str:
    stats = atlas[site]
    scale = max(abs(float(stats.max[n])), abs(float(stats.min[n])) if stats.min is not None else 0.0) or 1.0
    body = [f"<section><h2>Statistics</h2>{_stats_line(atlas, site, n)}</section>"]
    titles = {"top": f"Top activations (largest {len(groups['top'])})", "bottom": "Bottom activations (most negative)"}
    for key in ("top", "bottom"):
        if key in groups:
            body.append(f"<section id={key}><h2>{titles[key]}</h2>{_examples_html(groups[key], contexts, scale)}</section>")
    quantiles = [k for k in groups if k.startswith("quantile")]
    if quantiles:
        assert stats.quantiles is not None  # quantile groups exist only when the atlas has quantiles
        upper = float(stats.quantiles.upper[n])
        parts = []
        for key in quantiles:
            b = int(key.split()[1])
            parts.append(
                f"<h3>interval {b + 1} of {INTERVALS}: ({number(upper * b / INTERVALS)}, {number(upper * (b + 1) / INTERVALS)}]</h3>"
            )
            parts.append(_examples_html(groups[key], contexts, scale))
        body.append("<section id=quantiles><h2>Examples across the activation range</h2>" + "".join(parts) + "</section>")
    if stats.histogram is not None:
        low, high = bin_ranges()
        chart = histogram_chart(stats.histogram[n].tolist(), low.tolist(), high.tolist())
        body.append(f"<section id=histogram><h2>Activation histogram</h2>{chart}</section>")
    body.append(
        f"<section id=output-tokens><h2>Output tokens (from the weights)</h2>{_output_tokens_html(view, n, tokenizer)}</section>"
    )
    subtitle = (
        f"<a href='../{INDEX}'>&larr; all neurons</a> · {esc(atlas.meta.model)} · {esc(atlas.meta.dataset)} "
        f"{esc(atlas.meta.split)} · {atlas.n_tokens} tokens · hover a token for its activation"
        + (f" · <a href='{esc(url)}'>Neuronpedia</a>" if url else " · no Neuronpedia page known for this one")
    )
    return page(f"{site} · neuron {n}", subtitle, "".join(body))


# -- the index page

INDEX_SCRIPT = r"""
function rows(table){return Array.from(table.tBodies[0].rows);}
function sortTable(table, key, desc){
  const col = Array.from(table.tHead.rows[0].cells).findIndex(c => c.dataset.key === key);
  if (col < 0) return;
  const sorted = rows(table).sort((a, b) => {
    const x = parseFloat(a.cells[col].dataset.v), y = parseFloat(b.cells[col].dataset.v);
    return (desc ? y - x : x - y) || (parseInt(a.dataset.n) - parseInt(b.dataset.n));
  });
  sorted.forEach(r => table.tBodies[0].appendChild(r));
  Array.from(table.tHead.rows[0].cells).forEach(c => c.classList.remove('sorted-asc', 'sorted-desc'));
  table.tHead.rows[0].cells[col].classList.add(desc ? 'sorted-desc' : 'sorted-asc');
  table.dataset.sort = key + (desc ? ':desc' : ':asc');
}
function filterTable(table){
  const box = table.closest('section');
  const q = box.querySelector('.search').value.trim();
  const minMax = parseFloat(box.querySelector('.min-max').value);
  const minDensity = parseFloat(box.querySelector('.min-density').value);
  let shown = 0;
  rows(table).forEach(r => {
    const ok = (!q || r.dataset.n === q || r.dataset.n.startsWith(q))
      && (isNaN(minMax) || parseFloat(r.dataset.max) >= minMax)
      && (isNaN(minDensity) || parseFloat(r.dataset.density) >= minDensity);
    r.style.display = ok ? '' : 'none'; if (ok) shown++;
  });
  box.querySelector('.count').textContent = shown + ' shown';
}
document.querySelectorAll('table.neurons').forEach(table => {
  Array.from(table.tHead.rows[0].cells).forEach(cell => cell.addEventListener('click', () => {
    sortTable(table, cell.dataset.key, !cell.classList.contains('sorted-desc'));
  }));
  table.closest('section').querySelectorAll('input').forEach(i => i.addEventListener('input', () => filterTable(table)));
});
function fromHash(){
  const p = new URLSearchParams(location.hash.slice(1));
  document.querySelectorAll('table.neurons').forEach(table => {
    if (p.get('sort')) sortTable(table, p.get('sort'), p.get('desc') === '1');
    if (p.get('click')) table.querySelector('th[data-key="' + p.get('click') + '"]').click();
    if (p.get('q') !== null) { table.closest('section').querySelector('.search').value = p.get('q'); filterTable(table); }
  });
}
window.addEventListener('hashchange', fromHash);
fromHash();
"""


def index_page(atlas: Atlas, chosen: Mapping[str, list[int]]) -> str:
    sections = []
    for site, stats in atlas.sites.items():
        columns = {
            "max": stats.max.tolist(),
            "min": stats.min.tolist() if stats.min is not None else [math.nan] * stats.n_neurons,
            "density": stats.fire_rate.tolist(),
            "mean": stats.mean.tolist(),
            "std": stats.std.tolist(),
        }
        pages = set(chosen.get(site, []))
        body = []
        for n in range(stats.n_neurons):
            label = f"<a href='{esc(neuron_file(site, n))}'>{n}</a>" if n in pages else str(n)
            cells = "".join(f"<td data-v='{columns[c][n]!r}'>{number(columns[c][n], 4)}</td>" for c in COLUMNS)
            body.append(
                f"<tr data-n={n} data-max='{columns['max'][n]!r}' data-density='{columns['density'][n]!r}'><td class=l data-v={n}>{label}</td>{cells}</tr>"
            )
        head = "<th class=l data-key=neuron>neuron</th>" + "".join(f"<th data-key={c}>{c}</th>" for c in COLUMNS)
        points = [
            (
                columns["density"][n],
                columns["max"][n],
                f"neuron {n}: max {number(columns['max'][n])}, density {number(columns['density'][n], 4)}",
                neuron_file(site, n) if n in pages else None,
            )
            for n in range(stats.n_neurons)
        ]
        plot = scatter_chart(points, x_label="density (share of tokens > 0)", y_label="max activation")
        linked = ", ".join(f"<a href='{esc(neuron_file(site, n))}'>{n}</a>" for n in chosen.get(site, []))
        sections.append(
            f"<section data-site='{esc(site)}'><h2>{esc(site)} · {stats.n_neurons} neurons</h2>"
            f"<div class=cols><div>{plot}</div><div style='max-width:520px'><h3>Neuron pages</h3><p>{linked}</p>"
            "<p class=muted>Orange dots have a page. Click a column header to sort; the URL hash "
            "<code>#sort=max&amp;desc=1</code> does the same.</p></div></div>"
            "<div class=controls><label>neuron <input class=search type=search placeholder='e.g. 1234' size=8></label>"
            "<label>max &ge; <input class=min-max type=number step=any size=6></label>"
            "<label>density &ge; <input class=min-density type=number step=any size=6></label><span class='count muted'></span></div>"
            f"<div class=scroll><table class=neurons><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>"
        )
    meta = atlas.meta
    subtitle = (
        f"{esc(meta.model)} · {esc(meta.dataset)} {esc(meta.split)} · {meta.n_documents} documents, {atlas.n_tokens} tokens · "
        f"max length {meta.max_length} · {esc(meta.dtype)}" + (" · BOS excluded" if meta.exclude_bos else "")
    )
    return page("Neuron atlas", subtitle, "".join(sections), INDEX_SCRIPT)
