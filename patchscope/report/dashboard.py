"""The static neuron dashboard: an index of every neuron, and a page for each chosen neuron.

``index.html`` holds, per site, a sortable and filterable table of every neuron (max, min, density,
mean, std), a search box for a neuron number, and a density/max overview plot. ``neurons/*.html``
show a neuron's top and bottom examples as shaded token sequences, its quantile examples, its
histogram and its output-token view. Pages are self-contained (`patchscope.report.html`).

Sorting is scriptable through the URL: ``index.html#sort=max&desc=1`` sorts on load (a test renders
that in a headless browser).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.exports import place_strings
from patchscope.atlas.feature_site import FeatureSite, is_feature_site, reads_of
from patchscope.atlas.output_tokens import OutputTokens, output_tokens
from patchscope.kernels.histogram import bin_ranges
from patchscope.kernels.quantiles import INTERVALS
from patchscope.model.sites import parse_site
from patchscope.report.html import JS_FORMAT, bar_chart, esc, histogram_chart, number, page, scatter_chart, tokens_html
from patchscope.report.neuron_view import VIEW, write_neuron_data
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
    all_neurons: bool = field(
        default=False,
        metadata={
            "help": "Give every other neuron a page too: its index row opens neurons/view.html, drawn in the browser from "
            "the atlas's numbers in neurons/data/ (statistics, and the top and bottom examples as text; no replay). "
            "Off by default: the data grows with every neuron (about 66 MB for 18 x 2,048 neurons with 10 examples each)."
        },
    )

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
            note = neighbour_note(site, n, chosen)
            html_text = neuron_page(atlas, site, n, groups[n], contexts, view, tokenizer, note, url=url)

            def write_page(tmp: Path, text: str = html_text) -> int:
                return Path(tmp).write_text(text, encoding="utf-8")

            atomic_write(out / neuron_file(site, n), write_page)
    if config.all_neurons:
        write_neuron_data(atlas, out, texts=texts, tokenizer=tokenizer, examples=config.examples)
    index = out / INDEX
    html_text = index_page(atlas, chosen, top_strings(atlas, texts, tokenizer), all_neurons=config.all_neurons)
    atomic_write(index, lambda tmp: Path(tmp).write_text(html_text, encoding="utf-8"))
    return index


# -- the neuron page


def neighbour_note(site: str, n: int, chosen: Mapping[str, list[int]]) -> str:
    """Links to index ``n`` at the same site of the layers before and after, only where that is one unit.

    A residual-stream site (``hook_resid_*``, and ``hook_attn_out`` / ``hook_mlp_out``, which are written into
    it) has one basis at every layer, so dimension ``n`` is the same coordinate before and after a block. An
    MLP neuron is a row of one layer's weights: neuron ``n`` of the next layer is unrelated, so no link is given.
    """
    if is_feature_site(site):
        return "<p class=muted>No links to other layers: SAE features are the rows of this SAE alone.</p>"
    layer, suffix = parse_site(site)
    if suffix.startswith("mlp."):
        return (
            f"<p class=muted>No links to neuron {n} of layers {layer - 1} or {layer + 1}: MLP neurons have no identity "
            "across layers (each layer's neurons are its own weights' rows), so the same index means nothing there.</p>"
        )
    links = []
    for other in (layer - 1, layer + 1):
        name = f"blocks.{other}.{suffix}"
        if n in chosen.get(name, []):
            links.append(f"<a class=neighbour href='../{esc(neuron_file(name, n))}'>{esc(name)} · {n}</a>")
    if not links:
        return f"<p class=muted>The same residual-stream dimension {n} has no page at the neighbouring layers.</p>"
    return "<p>The same residual-stream dimension at the neighbouring layers: " + " · ".join(links) + "</p>"


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


def neuron_page(
    atlas: Atlas, site: str, n: int, groups, contexts, view, tokenizer, neighbours: str = "", *, url: str | None = None
) -> str:
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
    body.append(f"<section id=neighbours><h2>Other layers</h2>{neighbours}</section>")
    subtitle = (
        f"<a href='../{INDEX}'>&larr; all neurons</a> · {esc(atlas.meta.model)} · {esc(atlas.meta.dataset)} "
        f"{esc(atlas.meta.split)} · {atlas.n_tokens} tokens · hover a token for its activation"
        + (f" · <a href='{esc(url)}'>Neuronpedia</a>" if url else " · no Neuronpedia page known for this one")
    )
    return page(f"{site} · neuron {n}", subtitle, "".join(body))


# -- the index page: a layer selector; each site's table and plot are built from embedded data when shown

INDEX_SCRIPT = (
    JS_FORMAT
    + r"""
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
function build(section){
  if (section.dataset.built) return;
  const data = JSON.parse(section.querySelector('script.rows').textContent);
  const view = data.view && (data.view + '#site=' + encodeURIComponent(section.dataset.site) + '&n=');
  const html = data.rows.map(r => {
    const [n, page, token, context] = [r[0], r[1], r[2], r[3]], values = r.slice(4).map(v => v === null ? NaN : v);
    const href = page || (view && view + n);  // a full page, else the page drawn from the atlas's numbers
    const label = href ? '<a class="' + (page ? 'page' : 'view') + '" href="' + escHtml(href) + '">' + n + '</a>' : String(n);
    const cells = values.map(v => '<td data-v="' + String(v) + '">' + fmt(v, 4) + '</td>').join('');
    return '<tr data-n=' + n + ' data-max="' + String(values[0]) + '" data-density="' + String(values[2]) + '">'
      + '<td class=l data-v=' + n + '>' + label + '</td>' + cells
      + '<td class="l ctx tok">' + escHtml(token) + '</td><td class="l ctx">' + escHtml(context) + '</td></tr>';
  }).join('');
  const table = section.querySelector('table.neurons');
  table.tBodies[0].innerHTML = html;
  const plot = section.querySelector('template.plot');
  if (plot) section.querySelector('.plot-here').appendChild(plot.content.cloneNode(true));
  Array.from(table.tHead.rows[0].cells).forEach(cell => { if (cell.dataset.key) cell.addEventListener('click', () => {
    sortTable(table, cell.dataset.key, !cell.classList.contains('sorted-desc'));
  }); });
  section.querySelectorAll('input').forEach(i => i.addEventListener('input', () => filterTable(table)));
  section.dataset.built = '1';
}
function show(site){
  const sections = Array.from(document.querySelectorAll('section.site'));
  const wanted = sections.find(s => s.dataset.site === site) || sections[0];
  sections.forEach(s => { s.hidden = s !== wanted; });
  if (!wanted) return;
  build(wanted);
  document.getElementById('site-select').value = wanted.dataset.site;
}
document.getElementById('site-select').addEventListener('change', e => {
  const p = new URLSearchParams(location.hash.slice(1)); p.set('site', e.target.value); location.hash = p.toString();
});
function fromHash(){
  const p = new URLSearchParams(location.hash.slice(1));
  show(p.get('site'));
  document.querySelectorAll('section.site:not([hidden]) table.neurons').forEach(table => {
    if (p.get('sort')) sortTable(table, p.get('sort'), p.get('desc') === '1');
    if (p.get('click')) table.querySelector('th[data-key="' + p.get('click') + '"]').click();
    if (p.get('q') !== null) { table.closest('section').querySelector('.search').value = p.get('q'); filterTable(table); }
  });
  document.body.dataset.readyMs = String(Math.round(performance.now()));
}
window.addEventListener('hashchange', fromHash);
fromHash();
"""
)


def _site_label(site: str) -> str:
    layer, suffix = parse_site(reads_of(site))
    return f"layer {layer} · {suffix}{site[len(reads_of(site)) :]}" if layer >= 0 else site


def _site_section(
    site: str, atlas: Atlas, pages: list[int], strings: Sequence[tuple[str, str]] | None, all_neurons: bool = True
) -> str:
    stats = atlas[site]
    columns = {
        "max": stats.max.tolist(),
        "min": stats.min.tolist() if stats.min is not None else [math.nan] * stats.n_neurons,
        "density": stats.fire_rate.tolist(),
        "mean": stats.mean.tolist(),
        "std": stats.std.tolist(),
    }
    linked = set(pages)
    data = [
        [
            n,
            neuron_file(site, n) if n in linked else None,
            *(strings[n] if strings is not None else ("", "")),
            *(None if math.isnan(columns[c][n]) else columns[c][n] for c in COLUMNS),
        ]
        for n in range(stats.n_neurons)
    ]
    head = "<th class=l data-key=neuron>neuron</th>" + "".join(f"<th data-key={c}>{c}</th>" for c in COLUMNS)
    head += "<th class=l title='the token of its top example'>top token</th><th class=l>context</th>"
    points = [
        (
            columns["density"][n],
            columns["max"][n],
            f"neuron {n}: max {number(columns['max'][n])}, density {number(columns['density'][n], 4)}",
            neuron_file(site, n) if n in linked else None,
        )
        for n in range(stats.n_neurons)
    ]
    plot = scatter_chart(points, x_label="density (share of tokens > 0)", y_label="max activation")
    links = ", ".join(f"<a href='{esc(neuron_file(site, n))}'>{n}</a>" for n in pages)
    payload = json.dumps({"rows": data, "view": VIEW if all_neurons else None}, allow_nan=False).replace("</", "<\\/")
    return (
        f"<section class=site data-site='{esc(site)}' hidden><h2>{esc(site)} · {stats.n_neurons} neurons</h2>"
        f"<div class=cols><div class=plot-here><template class=plot>{plot}</template></div>"
        f"<div style='max-width:520px'><h3>Neuron pages</h3><p>{links}</p>"
        "<p class=muted>Orange dots have a full page. "
        + (
            "Every other neuron's number opens a page drawn from the atlas's numbers (statistics, top and bottom examples). "
            if all_neurons
            else ""
        )
        + "Click a column header to sort; the URL hash "
        "<code>#sort=max&amp;desc=1</code> does the same, and <code>#site=...</code> picks the layer. Every neuron's top "
        "token and context are in the table; all its top examples are in the atlas folder's Parquet files.</p></div></div>"
        "<div class=controls><label>neuron <input class=search type=search placeholder='e.g. 1234' size=8></label>"
        "<label>max &ge; <input class=min-max type=number step=any size=6></label>"
        "<label>density &ge; <input class=min-density type=number step=any size=6></label><span class='count muted'></span></div>"
        f"<div class=scroll><table class=neurons><thead><tr>{head}</tr></thead><tbody></tbody></table></div>"
        f"<script type=application/json class=rows>{payload}</script></section>"
    )


def _layers_overview(atlas: Atlas) -> str:
    """One plot with a layer axis per statistic: each site's median and largest max, and its median density."""
    labels = [_site_label(site) for site in atlas.sites]
    largest = [float(atlas[site].max.max()) for site in atlas.sites]
    median = [float(atlas[site].max.float().median()) for site in atlas.sites]
    density = [float(atlas[site].fire_rate.float().median()) for site in atlas.sites]
    return (
        "<section id=layers><h2>Across layers</h2><div class=cols>"
        f"<div><h3>largest max</h3>{bar_chart(labels, largest, width=420)}</div>"
        f"<div><h3>median max</h3>{bar_chart(labels, median, width=420)}</div>"
        f"<div><h3>median density (share of tokens &gt; 0)</h3>{bar_chart(labels, density, width=420)}</div>"
        "</div></section>"
    )


def index_page(
    atlas: Atlas,
    chosen: Mapping[str, list[int]],
    strings: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    *,
    all_neurons: bool = True,
) -> str:
    """The index; ``strings`` gives each site's ``(top token, context)`` per neuron (`top_strings`). With
    ``all_neurons``, each row without a page of its own opens `patchscope.report.neuron_view`'s page."""
    options = "".join(f"<option value='{esc(site)}'>{esc(_site_label(site))}</option>" for site in atlas.sites)
    selector = (
        f"<section id=choose><label>site <select id=site-select>{options}</select></label> "
        f"<span class=muted>{len(atlas.sites)} site{'s' if len(atlas.sites) != 1 else ''}, "
        f"{sum(s.n_neurons for s in atlas.sites.values())} neurons in all</span></section>"
    )
    sections = [
        _site_section(site, atlas, chosen.get(site, []), strings.get(site) if strings is not None else None, all_neurons)
        for site in atlas.sites
    ]
    overview = _layers_overview(atlas) if len(atlas.sites) > 1 else ""
    meta = atlas.meta
    subtitle = (
        f"{esc(meta.model)} · {esc(meta.dataset)} {esc(meta.split)} · {meta.n_documents} documents, {atlas.n_tokens} tokens · "
        f"max length {meta.max_length} · {esc(meta.dtype)}" + (" · BOS excluded" if meta.exclude_bos else "")
    )
    return page("Neuron atlas", subtitle, selector + overview + "".join(sections), INDEX_SCRIPT)


def top_strings(atlas: Atlas, texts: Mapping[int, str], tokenizer: PreTrainedTokenizerBase) -> dict[str, list[tuple[str, str]]]:
    """Per site, each neuron's top token and its +-5-token context (blank for a neuron that never fired)."""
    out = {}
    for site, stats in atlas.sites.items():
        docs, positions = stats.top.doc[0].tolist(), stats.top.pos[0].tolist()
        filled = [n for n in range(stats.n_neurons) if docs[n] >= 0 and docs[n] in texts]  # texts: `top_documents`
        strings = place_strings(atlas, [(docs[n], positions[n]) for n in filled], texts, tokenizer)
        row = [("", "")] * stats.n_neurons
        for n, pair in zip(filled, strings):
            row[n] = pair
        out[site] = row
    return out


def top_documents(atlas: Atlas) -> set[int]:
    """The documents of every neuron's top example (what `top_strings` reads)."""
    return {int(d) for stats in atlas.sites.values() for d in stats.top.doc[0].tolist() if d >= 0}
