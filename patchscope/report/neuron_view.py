"""A page for every neuron, drawn in the browser from the atlas's numbers, in shards beside the index.

`patchscope report` gives the `--top` (or `--neurons`) neurons full pages: shaded replays, the
histogram, the output tokens (`patchscope.report.dashboard`). Every other row of the index opens
``neurons/view.html#site=S&n=N`` instead. That one page loads the shard holding neuron N of site S,
``neurons/data/<site>-<block>.js`` (`SHARD_NEURONS` neurons each), as a ``<script>``, which a
``file://`` page may load without any request leaving the machine. It then draws the neuron's
statistics and its top and bottom examples (value, document, position, token and context) from it.

- **Shards.** Each one holds its neurons' numbers and, once, the ``(token, context)`` of every place
  they name (`patchscope.atlas.exports.place_strings`, as in the index's table and the Parquet).
- **What stays fast.** The index loads no shard; each of its rows only gains a link, which its
  script builds.
- **Values.** The numbers are written with ``repr`` (JSON), so a page shows the atlas's values
  exactly, as the full pages do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.exports import place_strings
from patchscope.atlas.stats import TopK
from patchscope.report.html import JS_FORMAT, esc, page
from patchscope.util.storage import atomic_write

SHARD_NEURONS = 256
"""Neurons per shard, by default: a page loads one shard, so its cost does not grow with the site's width (an SAE's 65k features)."""
VIEW = "neurons/view.html"
STATS = ("max", "min", "mean", "std", "density")


def shard_file(site: str, block: int) -> str:
    """The shard holding neurons ``block * shard_neurons`` onwards of ``site``, relative to the dashboard."""
    return f"neurons/data/{site}-{block}.js"


def _examples(slots: TopK | None, limit: int) -> list[list[tuple[float, int, int]]]:
    """Per neuron, its first ``limit`` filled slots as ``(value, doc, position)``, in the atlas's order."""
    if slots is None:
        return []
    values, docs, positions = (t[:limit].T.tolist() for t in (slots.values, slots.doc, slots.pos))  # [n, limit]
    return [[(v, d, p) for v, d, p in zip(*row) if d >= 0] for row in zip(values, docs, positions)]


def shown_documents(atlas: Atlas, examples: int) -> set[int]:
    """The documents the shards quote: those of every neuron's first ``examples`` top and bottom examples."""
    found: set[int] = set()
    for stats in atlas.sites.values():
        for slots in (stats.top, stats.bottom):
            if slots is not None:
                found.update(d for d in slots.doc[:examples].flatten().tolist() if d >= 0)
    return found


def _finite(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value


def _site_shards(
    atlas: Atlas, site: str, examples: int, strings: Mapping[tuple[int, int], tuple[str, str]], size: int
) -> list[dict[str, Any]]:
    """The shards of one site: per neuron ``[max, min, mean, std, density, nonfinite, top, bottom]``, each
    example ``[value, place]``, and the shard's places ``[doc, position, token, context]``."""
    stats = atlas[site]
    columns = [
        stats.max.tolist(),
        stats.min.tolist() if stats.min is not None else [math.nan] * stats.n_neurons,
        stats.mean.tolist(),
        stats.std.tolist(),
        stats.fire_rate.tolist(),
    ]
    nonfinite = stats.moments.nonfinite.tolist()
    top, bottom = _examples(stats.top, examples), _examples(stats.bottom, examples)
    shards = []
    for first in range(0, stats.n_neurons, size):
        places: dict[tuple[int, int], int] = {}
        rows = []
        for n in range(first, min(first + size, stats.n_neurons)):
            groups = [
                [[v, places.setdefault((d, p), len(places))] for v, d, p in group[n]] if group else [] for group in (top, bottom)
            ]
            rows.append([*(_finite(float(c[n])) for c in columns), int(nonfinite[n]), *groups])
        table = [[d, p, *strings[d, p]] for d, p in places]
        shards.append({"site": site, "first": first, "neurons": rows, "places": table})
    return shards


def write_neuron_data(
    atlas: Atlas,
    out: Path,
    *,
    texts: Mapping[int, str],
    tokenizer: PreTrainedTokenizerBase,
    examples: int,
    shard_neurons: int = SHARD_NEURONS,
) -> int:
    """Write every site's shards and ``neurons/view.html`` into the dashboard ``out``; returns the number of shards.

    ``texts`` holds `shown_documents`; ``examples`` top and bottom examples are kept per neuron, and
    ``shard_neurons`` neurons per shard.
    """
    wanted = {
        (d, p): None
        for stats in atlas.sites.values()
        for slots in (stats.top, stats.bottom)
        for group in _examples(slots, examples)
        for _, d, p in group
    }
    places = list(wanted)
    strings = dict(zip(places, place_strings(atlas, places, texts, tokenizer)))  # one tokenization per document
    count = 0
    for site in atlas.sites:
        for shard in _site_shards(atlas, site, examples, strings, shard_neurons):
            text = "patchscopeShard(" + json.dumps(shard, allow_nan=False, separators=(",", ":")) + ");\n"
            _write(out / shard_file(site, shard["first"] // shard_neurons), text)
            count += 1
    _write(out / VIEW, view_page(atlas, shard_neurons))
    return count


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


VIEW_SCRIPT = r"""
const params = new URLSearchParams(location.hash.slice(1));
const site = params.get('site'), n = parseInt(params.get('n'));
function say(text){
  document.getElementById('state').textContent = text;
  document.body.dataset.readyMs = String(Math.round(performance.now()));
}
function examples(group, places){
  if (!group.length) return '<p class=muted>none recorded</p>';
  return group.map(([v, i]) => {
    const [doc, pos, token, context] = places[i];
    return '<div class=ex data-doc=' + doc + ' data-pos=' + pos + ' data-act="' + String(v) + '">'
      + '<span class=v title="activation recorded in the atlas">' + fmt(v, 3) + '</span>'
      + '<span class=where>doc ' + doc + ' · pos ' + pos + '</span>'
      + '<span class="ctx tok" title="the token">' + escHtml(JSON.stringify(token)) + '</span> '
      + '<span class=ctx title="its context, +-5 tokens">' + escHtml(context) + '</span></div>';
  }).join('');
}
function stat(key, value){
  const v = value === null ? NaN : value;
  return '<span>' + key + ' <b data-stat=' + key + ' data-v="' + String(v) + '">' + fmt(v, 4) + '</b></span>';
}
window.patchscopeShard = function(data){
  const row = data.neurons[n - data.first];
  if (data.site !== site || !row) { say('neuron ' + n + ' is not in this atlas\'s ' + site); return; }
  const warn = row[5] ? '<span class=warn>' + row[5] + ' inf/nan activations left out</span>' : '';
  document.getElementById('stats').innerHTML = '<div class=stats>' + STATS.map((k, i) => stat(k, row[i])).join('') + warn + '</div>';
  document.getElementById('top-list').innerHTML = examples(row[6], data.places);
  document.getElementById('bottom-list').innerHTML = examples(row[7], data.places);
  document.querySelector('h1').textContent = document.title = site + ' · neuron ' + n;
  say('');
};
if (!site || isNaN(n)) say('name a neuron in the URL: view.html#site=blocks.12.mlp.hook_post&n=0');
else {
  const script = document.createElement('script');  // a file:// page may load a script beside it; nothing else is fetched
  script.src = 'data/' + encodeURIComponent(site + '-' + Math.floor(n / SHARD)) + '.js';
  script.onerror = () => say('no data for ' + site + ' neuron ' + n + ' beside this page');
  document.head.appendChild(script);
}
window.addEventListener('hashchange', () => location.reload());
"""


def view_page(atlas: Atlas, shard_neurons: int = SHARD_NEURONS) -> str:
    """``neurons/view.html``: one page for any neuron, named in its URL hash, drawn from its shard."""
    meta = atlas.meta
    subtitle = (
        f"<a href='../index.html'>&larr; all neurons</a> · {esc(meta.model)} · {esc(meta.dataset)} {esc(meta.split)} · "
        f"{atlas.n_tokens} tokens · "
        "drawn from the atlas's numbers; the full pages (shaded replays, histogram, output tokens) are those of "
        "<code>patchscope report --top N</code> or <code>--neurons N ...</code>"
    )
    body = (
        "<p id=state class=muted>loading…</p><section><h2>Statistics</h2><div id=stats></div></section>"
        "<section id=top><h2>Top activations</h2><div id=top-list></div></section>"
        "<section id=bottom><h2>Bottom activations (most negative)</h2><div id=bottom-list></div></section>"
    )
    constants = f"const SHARD = {shard_neurons}, STATS = {json.dumps(list(STATS))};\n"
    return page("Neuron", subtitle, body, JS_FORMAT + constants + VIEW_SCRIPT)
