"""The optional second pass: quantile examples, cut from the maxima of a finished first pass.

`add_quantile_examples` replays the same documents with the same batching and keeps, per neuron,
``config.quantile_examples`` examples in each of `INTERVALS` equal activation intervals of
``(0, max]`` (`patchscope.kernels.quantiles`); an SAE's features are encoded from their site's
activations by the first pass's own encode path. To shard it, merge the first-pass atlases of every
shard first and run each shard's second pass with the merged atlas: the picks then merge exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.batching import collate
from patchscope.atlas.feature_site import FeatureSite, encoded_chunks, features_of, reads_of
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.sources import Document
from patchscope.atlas.stats import TokenFields
from patchscope.kernels.quantiles import INTERVALS, QuantileExamples, batch_quantiles, merge_quantiles
from patchscope.model.hooks import add_hooks, stop_after
from patchscope.model.loading import model_device
from patchscope.model.sites import stop_site

__all__ = ["INTERVALS", "add_quantile_examples", "quantile_examples"]


def quantile_examples(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: Iterable[Document],
    atlas: Atlas,
    config: ProfileConfig,
    features: Sequence[FeatureSite] = (),
) -> dict[str, QuantileExamples]:
    """The picks of every site of ``atlas`` over ``documents``, with intervals cut from ``atlas``'s maxima.

    A feature site of ``atlas`` needs its SAE among ``features`` (the one the atlas recorded): its site's
    activations are encoded as in the first pass (`patchscope.atlas.feature_site.encoded_chunks`).
    """
    if config.quantile_examples < 1:
        raise ValueError(f"`quantile_examples` must be at least 1 for the quantile pass, got {config.quantile_examples}")
    device = model_device(model)
    sites = list(atlas.sites)
    saes = features_of(atlas, features)
    deepest = stop_site(model, [reads_of(site) for site in sites])
    upper = {site: atlas[site].max.float().clamp(min=0).to(device) for site in sites}  # [n]
    state = {site: QuantileExamples.empty(upper[site], config.quantile_examples) for site in sites}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    current: list[TokenFields] = []  # the batch being run

    def pick(site: str, acts: Tensor, fields: TokenFields) -> None:  # acts: [tokens, n]
        if upper[site].device != acts.device:  # under a device_map the site may live on another GPU
            upper[site] = upper[site].to(acts.device)  # one tensor for state and batch: the merge's check reads nothing
            state[site] = dataclasses.replace(state[site].to(acts.device), upper=upper[site])
        found = batch_quantiles(acts, fields.doc, fields.pos, fields.token, fields.counted, upper[site], config.quantile_examples)
        state[site] = merge_quantiles(state[site], found)

    def hook(reads: str):
        def on_site(value: Tensor, step) -> None:
            acts = value.reshape(-1, value.shape[-1])  # [tokens, n]
            fields = current[-1].to(acts.device)  # [tokens] each; a no-op on the same device
            for site in (s for s in sites if reads_of(s) == reads):
                if site not in saes:
                    pick(site, acts, fields)
                    continue
                for rows, encoded in encoded_chunks(saes[site], acts):  # [chunk, d_sae] float32
                    pick(site, encoded, fields[rows])

        return on_site

    batches = config.plan(documents, tokenizer)
    with torch.inference_mode(), add_hooks(model, {reads: hook(reads) for reads in dict.fromkeys(map(reads_of, sites))}):
        for rows in batches:
            batch = collate(rows, pad_id).to(device)
            current[:] = [batch.fields()]
            with stop_after(model, deepest) if deepest else nullcontext():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return {site: picks.to("cpu") for site, picks in state.items()}


def add_quantile_examples(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    documents: Iterable[Document],
    atlas: Atlas,
    config: ProfileConfig,
    features: Sequence[FeatureSite] = (),
) -> Atlas:
    """``atlas`` with the quantile examples of ``documents`` added to every site (its SAE features with ``features``)."""
    picks = quantile_examples(model, tokenizer, documents, atlas, config, features)
    return Atlas(atlas.meta, {site: dataclasses.replace(stats, quantiles=picks[site]) for site, stats in atlas.sites.items()})
