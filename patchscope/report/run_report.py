"""``report.html`` beside ``results.json``: one readable page for a `patchscope run`.

Per neuron: its trigger context (each token shaded by the neuron's activation, the trigger token
outlined), the SAE features of the source vector with their Neuronpedia links and their
contributions to the neuron, the patched activation against each control as a bar chart, and the
generated text with the neuron's activation along the prompt and the generated tokens.
Built from the ``results.json`` dictionary; the model only replays the trigger contexts.
"""

from __future__ import annotations

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
from patchscope.report.html import bar_chart, esc, number, page, tokens_html
from patchscope.util.storage import atomic_write

BEFORE, AFTER = 24, 8


def write_run_report(
    results: dict[str, Any], path: str | Path, model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Mapping[int, str]
) -> Path:
    """Write the page for ``results`` (the ``results.json`` dictionary) to ``path``; ``texts`` holds the
    studied documents (`Atlas.texts`)."""
    config = results["config"]
    site = f"blocks.{config['profile']['layer']}.mlp.hook_post"
    source = SourceConfig(**config["source"])
    sections = [_neuron_section(n, results, site, texts, model, tokenizer) for n in results["neurons"]]
    timings = ", ".join(f"{k} {v} s" for k, v in results["timings"].items())
    notes = "".join(f"<li>{esc(note)}</li>" for note in results.get("notes", []))
    sections.append(f"<section><h2>Run</h2><p class=muted>{esc(timings)}</p><ul>{notes}</ul></section>")
    prompt = results["prompt"]
    subtitle = (
        f"{esc(config['model'])} · {esc(site)} · prompt {esc(repr(prompt['text']))}, vector written at "
        f"position {prompt['position']} ({esc(repr(prompt['token']))}) · {esc(source.dataset)} {esc(source.split)}"
    )
    text = page("Patchscope run", subtitle, "".join(sections))
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _trigger(result, config, site, texts, model, tokenizer) -> str:
    src = result["source"]
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


def _features_table(features: list[dict[str, Any]], value_key: str) -> str:
    rows = []
    for f in features:
        link = f"<a href='{esc(f['url'])}'>{f['index']}</a>" if f.get("url") else str(f["index"])
        rows.append(f"<tr><td class=l>{link}</td><td data-v='{f[value_key]!r}'>{number(f[value_key])}</td></tr>")
    return f"<table><tr><th class=l>feature</th><th>{esc(value_key)}</th></tr>{''.join(rows)}</table>"


def _sae_section(sae: dict[str, Any] | None) -> str:
    if not sae:
        return "<h3>SAE</h3><p class=muted>no SAE read-out in this run</p>"
    head = (
        f"<h3>SAE features of the source vector</h3><p class=muted>{esc(sae['sae'])} (trained on {esc(sae['sae_site'])}) · "
        f"L0 {sae['l0']} · relative error {number(sae['relative_error'])} · cosine {number(sae['cosine'])}</p>"
    )
    warnings = "".join(f"<p class=warn>{esc(w)}</p>" for w in sae.get("warnings", []))
    drivers = sae.get("features_driving_neuron") or []
    chart = bar_chart([f"feature {f['index']}" for f in drivers], [f["contribution"] for f in drivers]) if drivers else ""
    return (
        head + warnings + "<div class=cols>"
        f"<div><h3>top features (activation)</h3>{_features_table(sae['top_features'], 'activation')}</div>"
        f"<div><h3>contributions to the neuron</h3>{_features_table(drivers, 'contribution')}{chart}</div></div>"
    )


def _neuron_section(result, results, site, texts, model, tokenizer) -> str:
    config = results["config"]
    patched, controls = result["patched"], result["controls"]
    labels = ["patched", *controls]
    values = [patched["at_placeholder"], *(c["at_placeholder"] for c in controls.values())]
    chart = bar_chart(labels, values, reference=("original max", result["max_activation"]))
    prompt_tokens = [tokenizer.convert_tokens_to_string([piece]) for piece in results["prompt"]["tokens"]]
    generated = tokenizer.batch_decode([[i] for i in patched["generated_tokens"]])
    fed = patched["prompt_activations"] + patched["generated_activations"]
    sequence = list(prompt_tokens) + generated
    values_along = fed + [None] * (len(sequence) - len(fed))  # the last generated token is never fed back
    along = tokens_html(sequence, values_along, abs(result["max_activation"]) or 1.0, results["prompt"]["position"])
    src = result["source"]
    ratio = patched.get("ratio")
    return (
        f"<section><h2>Neuron {result['neuron']} · max {number(result['max_activation'], 4)} · {esc(result['verdict'])}</h2>"
        f"<h3>Trigger context (document {src['doc']}, position {src['position']}, token {esc(repr(src['token']))})</h3>"
        f"<div class=ex>{_trigger(result, config, site, texts, model, tokenizer)}</div>"
        f"{_sae_section(result.get('sae'))}"
        f"<h3>Activation at the placeholder: patched vs controls</h3>{chart}"
        f"<p class=muted>reactivation ratio (patched / original max): {number(ratio) if ratio is not None else 'n/a'}</p>"
        f"<h3>Generated text</h3><p class=ctx>{esc(patched['generated_text'])}</p>"
        f"<h3>The neuron along the prompt and the generated tokens (placeholder outlined)</h3><div class=ex>{along}</div></section>"
    )
