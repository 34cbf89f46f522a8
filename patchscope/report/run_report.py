"""``report.html`` beside ``results.json``: one readable page for a `patchscope run`.

Top down: what the case means (said once), a summary table with one row per neuron linking to its
card, the legend of the token shading, then one card per neuron: a one-line verdict, its trigger
context (each token shaded by the neuron's activation, the trigger token outlined), the SAE features
of the source vector with links to their atlas pages where the run profiled that SAE
(`patchscope.report.feature_pages`) and to Neuronpedia (when an SAE was used; otherwise the page says once
why not), the patched activation against each control as bars on a symmetric log scale, and the
generated text with the neuron along the prompt and the generated tokens. Last, the run's settings,
versions, timings and notes, and a link to ``results.json``.
Built from the ``results.json`` dictionary; the model only replays the trigger contexts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.batching import segment_at
from patchscope.atlas.sources import SourceConfig
from patchscope.model.hooks import run_with_cache
from patchscope.model.loading import model_device
from patchscope.report.html import SYMLOG_NOTE, bar_chart, esc, number, page, shade, tokens_html
from patchscope.scope.controls import Case
from patchscope.scope.verdict import DECODE_MEASURE_TEXT, case_explanation
from patchscope.util.errors import as_flags
from patchscope.util.storage import atomic_write

BEFORE, AFTER = 24, 8
GENERATED_SHOWN = 40
"""Characters of the generated text in the summary table (the card has all of it)."""
EXTRA_CSS = (
    "<style>.legend{display:flex;gap:14px;flex-wrap:wrap;align-items:center}.summary td{vertical-align:top}"
    ".scale{fill:#7a8591}.decoded{color:#16782d;font-weight:600}.verdict{font-size:15px;margin:0 0 6px}</style>"
)


def write_run_report(
    results: dict[str, Any], path: str | Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Mapping[int, str]
) -> Path:
    """Write the page for ``results`` (the ``results.json`` dictionary) to ``path``; ``texts`` holds the
    studied documents (`Atlas.texts`)."""
    config = results["config"]
    site = results["sites"]["neuron"]
    source = SourceConfig(**config["source"])
    cards = [_neuron_section(n, results, site, texts, model, tokenizer) for n in results["neurons"]]
    body = [_explanation(results), _summary_table(results), _legend(), _sae_absent(results), *cards, _run_section(results)]
    prompt = results["prompt"]
    if _several_layers(results):
        site = f"{site}, L in {', '.join(map(str, results['sites']['layers']))} ({results['sites']['pick']})"
    subtitle = (
        f"{esc(config['model'])} · {esc(site)} · prompt {esc(repr(prompt['text']))}, vector written at "
        f"position {prompt['position']} ({esc(repr(prompt['token']))}) · {esc(source.dataset)} {esc(source.split)}"
    )
    text = page("Patchscope run", subtitle, EXTRA_CSS + "".join(body))
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _explanation(results: dict[str, Any]) -> str:
    """What the case means and how the decode is measured, once for every card."""
    sites = results["sites"]
    cases = dict.fromkeys(Case(n["case"]) for n in results["neurons"])
    said = "".join(f"<p>{esc(case_explanation(case, sites['target'], sites['neuron']))}</p>" for case in cases)
    return (
        f"<section id=reading><h2>Reading it</h2>{said}<p><b>decoded</b> means: {esc(DECODE_MEASURE_TEXT)}. "
        "The controls write nothing (unpatched), a random direction of the vector's norm (random_same_norm) "
        "or the corpus mean at the source site (corpus_mean) at the placeholder.</p></section>"
    )


def _several_layers(results: dict[str, Any]) -> bool:
    """A run over several layers (``sites`` gives their pattern and ``layers``; each neuron its own ``layer``)."""
    return "layers" in results["sites"]


def _anchor(n: dict[str, Any], several: bool) -> str:
    """The card's id: the neuron index, with its layer where one index may appear at several layers."""
    return f"neuron-{n['layer']}-{n['neuron']}" if several else f"neuron-{n['neuron']}"


def _summary_table(results: dict[str, Any]) -> str:
    controls = list(results["neurons"][0]["controls"]) if results["neurons"] else []
    head = "".join(f"<th>{esc(c)}</th>" for c in controls)
    several = _several_layers(results)
    rows = [_summary_row(n, controls, several) for n in results["neurons"]]
    return (
        f"<section id=summary><h2>Summary</h2><table class=summary><tr>{'<th>layer</th>' if several else ''}"
        "<th>neuron</th><th>max activation</th>"
        f"<th class=l>trigger token</th><th class=l>context</th><th>patched</th>{head}<th class=l>decode</th>"
        f"<th class=l>generated</th></tr>{''.join(rows)}</table></section>"
    )


def _summary_row(n: dict[str, Any], controls: list[str], several: bool = False) -> str:
    src, patched = n["source"], n["patched"]
    decode = n["decode"]
    label = _decode_label(decode)
    values = "".join(_value_cell(n["controls"][c]["at_placeholder"], c) for c in controls)
    generated = patched["generated_text"]
    shown = generated if len(generated) <= GENERATED_SHOWN else generated[:GENERATED_SHOWN] + "…"
    attrs = f" data-layer={n['layer']}" if several else ""
    layer = f"<td data-col=layer data-v={n['layer']}>{n['layer']}</td>" if several else ""
    return (
        f"<tr data-neuron={n['neuron']}{attrs}>{layer}<td class=neuron><a href='#{_anchor(n, several)}'>{n['neuron']}</a></td>"
        f"{_value_cell(n['max_activation'], 'max_activation')}"
        f"<td class='l ctx' data-col=token>{esc(repr(src['token']))}</td><td class='l ctx' data-col=context>{esc(src['context'])}</td>"
        f"{_value_cell(patched['at_placeholder'], 'patched')}{values}"
        f"<td class='l{' decoded' if decode['decoded'] else ''}' data-col=decode>{esc(label)}</td>"
        f"<td class='l ctx' data-col=generated data-full='{esc(generated)}'>{esc(shown)}</td></tr>"
    )


def _value_cell(value: float, column: str) -> str:
    return f"<td data-col='{esc(column)}' data-v='{value!r}'>{number(value, 4)}</td>"


def _decode_label(decode: dict[str, Any]) -> str:
    if decode["decoded"] is None:
        return "not measured"
    return "decoded" if decode["decoded"] else "not decoded"


def _legend() -> str:
    swatch = lambda value, text: f"<span class=t style='background:{shade(value, 1.0)}'>{esc(text)}</span>"  # noqa: E731
    return (
        "<section id=legend><h2>Token shading</h2><div class='legend ctx'>"
        f"{swatch(1.0, 'positive')} {swatch(0.4, 'weaker')} {swatch(-1.0, 'negative')}"
        "<span class='t f'>outlined</span><span class='t nv'>grey</span></div><p class=muted>Each token is shaded by the "
        "neuron's activation there, as a share of the neuron's maximum in the atlas (full colour at or beyond it); orange "
        "is positive, blue negative; hover for the value. Outlined: the trigger token, or the placeholder where the vector "
        "is written. Grey: the last generated token, never fed back, so it has no activation.</p></section>"
    )


def _sae_absent(results: dict[str, Any]) -> str:
    if any(n.get("sae") for n in results["neurons"]):
        return ""
    note = next((note for note in results.get("notes", []) if "SAE" in note), "no SAE was used in this run")
    why = as_flags(note, {"--sae"})  # the page is read beside the command line
    return (
        f"<section id=sae-absent><h2>SAE</h2><p class=muted>No SAE read-out on this page: {esc(why)}. To add one, pass "
        "<code>--sae PATH</code> (a Gemma Scope <code>params.npz</code> or <code>.safetensors</code>, or a SAELens folder) "
        "trained on the source vector's site.</p></section>"
    )


def _run_section(results: dict[str, Any]) -> str:
    name = Path(results.get("results_file") or "results.json").name
    settings = json.dumps(results["config"], indent=1)
    versions = "".join(f"<tr><td class=l>{esc(k)}</td><td class=l>{esc(v)}</td></tr>" for k, v in results["versions"].items())
    timings = ", ".join(f"{k} {v} s" for k, v in results["timings"].items())
    notes = "".join(f"<li>{esc(note)}</li>" for note in results.get("notes", []))
    return (
        f"<section id=run><h2>Run</h2><p>Every number on this page, and more: <a id=results-link href='{esc(name)}'>{esc(name)}</a>"
        f"</p><p class=muted>timings: {esc(timings)}</p><ul>{notes}</ul><h3>Versions</h3><table>{versions}</table>"
        f"<h3>Settings</h3><pre class=ctx id=settings>{esc(settings)}</pre></section>"
    )


def _trigger(result, config, site, texts, model, tokenizer) -> str:
    src, site = result["source"], result.get("site", site)  # over several layers, the neuron's own
    profile = config["profile"]
    segment, local = segment_at(tokenizer, texts[src["doc"]], src["position"], profile["max_length"], profile["overflow"])
    with torch.inference_mode():
        _, seen = run_with_cache(
            model, {"input_ids": torch.tensor([segment.ids], device=model_device(model)), "use_cache": False}, site
        )
    lo, hi = max(segment.first_counted, local - BEFORE), min(len(segment.ids), local + AFTER + 1)
    values = seen[site][0, lo:hi, result["neuron"]].float().tolist()
    tokens = tokenizer.batch_decode([[i] for i in segment.ids[lo:hi]])
    return tokens_html(tokens, values, abs(result["max_activation"]) or 1.0, local - lo)


def _features_table(features: list[dict[str, Any]], value_key: str, pages: Mapping[str, str]) -> str:
    """One row per feature: its index, linked to its atlas page where the run's atlas profiled the SAE
    (`patchscope.report.feature_pages`), else to Neuronpedia where the SAE is a known release (with both,
    the Neuronpedia link follows the index)."""
    rows = []
    for f in features:
        page, url = pages.get(str(f["index"])), f.get("url")
        target = page or url
        link = f"<a href='{esc(target)}'>{f['index']}</a>" if target else str(f["index"])
        if page and url:
            link += f" <a class=np href='{esc(url)}'>Neuronpedia</a>"
        rows.append(f"<tr><td class=l>{link}</td><td data-v='{f[value_key]!r}'>{number(f[value_key])}</td></tr>")
    return f"<table><tr><th class=l>feature</th><th>{esc(value_key)}</th></tr>{''.join(rows)}</table>"


def _sae_section(sae: dict[str, Any] | None) -> str:
    if not sae:
        return ""
    head = (
        f"<h3>SAE features of the source vector</h3><p class=muted>{esc(sae['sae'])} (trained on {esc(sae['sae_site'])}) · "
        f"L0 {sae['l0']} · relative error {number(sae['relative_error'])} · cosine {number(sae['cosine'])}</p>"
    )
    warnings = "".join(f"<p class=warn>{esc(w)}</p>" for w in sae.get("warnings", []))
    pages = sae.get("feature_pages") or {}
    if pages:
        head += "<p class=muted>Each feature links to its page in this run's atlas (dashboard/).</p>"
    drivers = sae.get("features_driving_neuron") or []
    chart = bar_chart([f"feature {f['index']}" for f in drivers], [f["contribution"] for f in drivers]) if drivers else ""
    return (
        head + warnings + "<div class=cols>"
        f"<div><h3>top features (activation)</h3>{_features_table(sae['top_features'], 'activation', pages)}</div>"
        f"<div><h3>contributions to the neuron</h3>{_features_table(drivers, 'contribution', pages)}{chart}</div></div>"
    )


def _along(result: dict[str, Any], results: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> str:
    """The neuron along the prompt and the generated tokens, the placeholder outlined."""
    patched = result["patched"]
    prompt_tokens = [tokenizer.convert_tokens_to_string([piece]) for piece in results["prompt"]["tokens"]]
    generated = tokenizer.batch_decode([[i] for i in patched["generated_tokens"]])
    fed = patched["prompt_activations"] + patched["generated_activations"]
    sequence = list(prompt_tokens) + generated
    values_along = fed + [None] * (len(sequence) - len(fed))  # the last generated token is never fed back
    return tokens_html(sequence, values_along, abs(result["max_activation"]) or 1.0, results["prompt"]["position"])


def _neuron_section(result, results, site, texts, model, tokenizer) -> str:
    patched, controls = result["patched"], result["controls"]
    labels = ["patched", *controls]
    values = [patched["at_placeholder"], *(c["at_placeholder"] for c in controls.values())]
    chart = bar_chart(labels, values, reference=("original max", result["max_activation"]), log_scale=True)
    src, ratio, decode = result["source"], patched.get("ratio"), result["decode"]
    line = f"{Case(result['case']).description} · {_decode_label(decode)}"
    several = _several_layers(results)
    title = f"Layer {result['layer']} · neuron {result['neuron']}" if several else f"Neuron {result['neuron']}"
    return (
        f"<section class=card id='{_anchor(result, several)}'><h2>{title} · max {number(result['max_activation'], 4)}</h2>"
        f"<p class=verdict data-verdict>{esc(line)}</p><p class=muted>decode: {esc(result['verdict'].partition('; ')[2])}</p>"
        f"<h3>Trigger context (document {src['doc']}, position {src['position']}, token {esc(repr(src['token']))})</h3>"
        f"<div class=ex>{_trigger(result, results['config'], site, texts, model, tokenizer)}</div>"
        f"{_sae_section(result.get('sae'))}"
        f"<h3>Activation at the placeholder: patched vs controls</h3>{chart}<p class=muted>{esc(SYMLOG_NOTE)}. "
        f"Reactivation ratio (patched / original max): {number(ratio) if ratio is not None else 'n/a'}</p>"
        f"<h3>Generated text</h3><p class=ctx>{esc(patched['generated_text'])}</p>"
        "<h3>The neuron along the prompt and the generated tokens (placeholder outlined)</h3>"
        f"<div class=ex>{_along(result, results, tokenizer)}</div></section>"
    )
