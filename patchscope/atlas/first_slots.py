"""A site's corpus mean without each segment's first slot (the BOS token, or an attention sink).

An atlas profiled with `exclude_bos` (the default) leaves those slots out of its moments already.
One profiled without it counts them; then their sum is taken off. Under causal attention a
first-slot vector depends on its token alone, so one forward pass over the distinct first tokens
gives every one of them.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.batching import adds_bos, segments
from patchscope.atlas.sources import TextSource
from patchscope.model.hooks import run_with_cache

if TYPE_CHECKING:
    from patchscope.atlas.atlas import Atlas


def mean_without_first_slots(atlas: Atlas, site: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """``[d]``: the mean of ``site`` over the atlas's corpus, first slots left out (see the module)."""
    stats, meta = atlas[site], atlas.meta
    if meta.exclude_bos:
        return stats.mean.float()
    if meta.source is None:
        raise ValueError(
            "this atlas counted first slots and was profiled from in-memory texts: its first tokens cannot be read again"
        )
    has_bos = adds_bos(tokenizer)
    firsts = Counter(
        part.ids[0]
        for document in TextSource(meta.source)
        for part in segments(tokenizer, document, meta.max_length, meta.overflow, False, has_bos)
        if part.first_counted == 0
    )
    embeddings = cast(nn.Embedding, cast(Any, model).get_input_embeddings())
    ids = torch.tensor(list(firsts), device=embeddings.weight.device).unsqueeze(1)  # [tokens, 1]
    with torch.no_grad():
        _, cache = run_with_cache(model, ids, site)
    first_slots = cache[site][:, 0].float().cpu()  # [tokens, d_model]
    counts = torch.tensor(list(firsts.values()), dtype=torch.float32)
    total = stats.moments.total.float() - counts @ first_slots
    return total / (float(stats.moments.n_tokens) - float(counts.sum()))
