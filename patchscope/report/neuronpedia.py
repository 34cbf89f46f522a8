"""Export an atlas as the batch JSON that Neuronpedia's importer reads for features.

Field names follow Neuronpedia's importer, which reads ``batch-*.json`` files
(``utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py`` in the
Neuronpedia repository), and SAEDashboard's writer of those files
(``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``: `NeuronpediaDashboardBatch`,
`NeuronpediaDashboardFeature`, `NeuronpediaDashboardActivation`). Only the names are taken.

What goes where, for a neuron instead of an SAE feature:
- ``activations``: the top examples, then the quantile examples (highest interval first), each the
  whole profiled segment as ``tokens`` with the neuron's ``values`` (replayed, BOS left out when the
  atlas left it out), ``qualifying_token_index`` at the example's token, and the bin it came from
  (``bin_min``, ``bin_max``, ``bin_contains`` = the share of the neuron's positive activations in
  that bin). Neuronpedia shows positive activations; the bottom-k is not exported.
- ``frac_nonzero``: the share of tokens with activation > 0 (for SAE features, never negative, the
  same as non-zero).
- ``freq_hist_data_bar_heights`` / ``_values``: the positive bins of the atlas histogram (counts,
  bin midpoints; `patchscope.kernels.histogram`).
- ``pos_str`` / ``pos_values``, ``neg_str`` / ``neg_values``: the output-token view
  (`patchscope.atlas.output_tokens`); ``logits_hist_data_bar_*``: a 40-bin histogram of that view
  over the whole vocabulary.
- The alignment / correlation fields the importer also reads are written empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.feature_site import FeatureSite, reads_of
from patchscope.atlas.output_tokens import output_directions, output_tokens
from patchscope.kernels.histogram import CENTER, bin_values
from patchscope.kernels.quantiles import INTERVALS
from patchscope.model.sites import parse_site
from patchscope.report.inputs import as_atlas, atlas_model
from patchscope.report.neuronpedia_links import feature_of
from patchscope.report.replay import Example, replay_contexts
from patchscope.util.storage import write_json

LOGIT_BINS = 40
BATCH_FEATURES = 128


def export_neuronpedia(
    atlas: Atlas | str | Path,
    out: str | Path,
    *,
    model: nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    texts: Mapping[int, str] | None = None,
    site: str | None = None,
    neurons: list[int] | None = None,
    model_id: str | None = None,
    source_set: str = "patchscope-neurons",
    logit_k: int = 10,
    features: Sequence[FeatureSite] = (),
) -> list[Path]:
    """Write ``batch-0.json``, ``batch-1.json``, ... (`BATCH_FEATURES` neurons each) into ``out``.

    ``atlas`` is an `Atlas` or its directory. Without ``model`` / ``tokenizer`` the model the atlas
    names is loaded; without ``texts`` the shown documents are read from the atlas's source. An SAE
    feature ``site`` is exported like a neuron site, its examples replayed through its SAE (among
    ``features``); its output-token fields are left empty, as on its dashboard page.
    """
    atlas = as_atlas(atlas)
    site = site or next(iter(atlas.sites))
    stats = atlas[site]
    neurons = list(range(stats.n_neurons)) if neurons is None else list(neurons)
    bad = [n for n in neurons if not 0 <= n < stats.n_neurons]
    if bad:
        raise IndexError(f"`neurons` {bad[:5]} are out of range: {site} has neurons 0..{stats.n_neurons - 1}")
    layer, _ = parse_site(reads_of(site))  # a feature site is filed under the layer its SAE reads
    if texts is None:
        texts = atlas.texts({e.doc for n in neurons for examples, *_ in _groups(atlas, site, n) for _, e in examples})
    if model is None or tokenizer is None:
        model, tokenizer = atlas_model(atlas)
    written = []
    for number, start in enumerate(range(0, len(neurons), BATCH_FEATURES)):
        chunk = neurons[start : start + BATCH_FEATURES]
        records = _features(atlas, site, chunk, model, tokenizer, texts, logit_k, feature_of(site, features))
        batch = {
            "model_id": model_id or Path(atlas.meta.model).name or atlas.meta.model,
            "layer": layer,
            "sae_set": source_set,
            "sae_id_suffix": None,
            "features": records,
        }
        written.append(write_json(Path(out) / f"batch-{number}.json", batch))
    return written


def _groups(atlas: Atlas, site: str, n: int) -> list[tuple[list[tuple[float, Example]], float, float, float]]:
    """``(examples, bin_min, bin_max, bin_contains)``: the top group, then the quantile intervals from the highest."""
    stats = atlas[site]
    positive = max(int(stats.moments.fire_count[n]), 1)
    top = [
        (float(v), Example(n, int(d), int(p)))
        for v, d, p in zip(stats.top.values[:, n].tolist(), stats.top.doc[:, n].tolist(), stats.top.pos[:, n].tolist())
        if d >= 0 and v > 0
    ]
    groups = []
    if top:
        groups.append((top, top[-1][0], top[0][0], len(top) / positive))
    q = stats.quantiles
    if q is not None:
        upper = float(q.upper[n])
        for b in reversed(range(INTERVALS)):
            picks = sorted(
                (
                    (float(v), Example(n, int(d), int(p)))
                    for v, d, p in zip(q.values[b, :, n].tolist(), q.doc[b, :, n].tolist(), q.pos[b, :, n].tolist())
                    if d >= 0
                ),
                key=lambda pick: -pick[0],
            )
            if picks:
                groups.append((picks, upper * b / INTERVALS, upper * (b + 1) / INTERVALS, int(q.count[b, n]) / positive))
    return groups


def _features(atlas, site, neurons, model, tokenizer, texts, logit_k, sae: FeatureSite | None) -> list[dict[str, Any]]:
    stats = atlas[site]
    groups = {n: _groups(atlas, site, n) for n in neurons}
    wanted = [example for per in groups.values() for examples, *_ in per for _, example in examples]
    length = atlas.meta.max_length
    encode = sae.encode if sae else None
    contexts = replay_contexts(model, tokenizer, atlas, site, wanted, texts, before=length, after=length, encode=encode)
    view = None if sae else output_tokens(model, site, neurons, logit_k)
    directions = None if sae else output_directions(model, site, neurons)
    centres = bin_values()[CENTER + 1 :].tolist()
    features = []
    for row, n in enumerate(neurons):
        activations = []
        for examples, low, high, contains in groups[n]:
            for _, example in examples:
                context = contexts[example]
                activations.append(
                    {
                        "bin_min": low,
                        "bin_max": high,
                        "bin_contains": contains,
                        "tokens": context.tokens,
                        "values": context.values,
                        "qualifying_token_index": context.focus,
                    }
                )
        heights = stats.histogram[n, CENTER + 1 :].tolist() if stats.histogram is not None else []
        occupied = [i for i, h in enumerate(heights) if h]
        span = slice(occupied[0], occupied[-1] + 1) if occupied else slice(0, 0)
        feature: dict[str, Any] = {
            "feature_index": n,
            "activations": activations,
            "frac_nonzero": float(stats.fire_rate[n]),
            "freq_hist_data_bar_heights": [float(h) for h in heights[span]],
            "freq_hist_data_bar_values": centres[span],
            "n_prompts_total": atlas.meta.n_documents,
            "n_tokens_in_prompt": atlas.meta.max_length,
            "dataset": atlas.meta.dataset,
            "decoder_weights_dist": [],
        }
        for prefix in ("neuron_alignment", "correlated_neurons", "correlated_features"):
            feature.update({f"{prefix}_indices": [], f"{prefix}_l1": []})
        feature.update(neuron_alignment_values=[], correlated_neurons_pearson=[], correlated_features_pearson=[])
        feature.update(_logits(view, directions, row, model, tokenizer))
        features.append(feature)
    return features


def _logits(view, directions, row: int, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    if view is None:
        empty: list = []
        return {
            "pos_str": empty,
            "pos_values": empty,
            "neg_str": empty,
            "neg_values": empty,
            "logits_hist_data_bar_heights": empty,
            "logits_hist_data_bar_values": empty,
        }
    unembed = cast(Any, model).get_output_embeddings().weight
    with torch.no_grad():
        logits = (unembed.float() @ directions[:, row].to(unembed.device)).cpu()  # [vocab]
    heights = torch.histc(logits, bins=LOGIT_BINS, min=float(logits.min()), max=float(logits.max()))
    edges = torch.linspace(float(logits.min()), float(logits.max()), LOGIT_BINS + 1)
    return {
        "pos_str": tokenizer.batch_decode([[i] for i in view.top_ids[row].tolist()]),
        "pos_values": view.top_values[row].tolist(),
        "neg_str": tokenizer.batch_decode([[i] for i in view.bottom_ids[row].tolist()]),
        "neg_values": view.bottom_values[row].tolist(),
        "logits_hist_data_bar_heights": heights.tolist(),
        "logits_hist_data_bar_values": ((edges[:-1] + edges[1:]) / 2).tolist(),
    }
