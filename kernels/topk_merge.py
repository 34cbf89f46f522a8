"""Per-batch neuron statistics: the masked top-k merge and running moments, in plain torch.

This is the reference. An optimised kernel must produce the same `TopK` and `Moments` (the atlas's
data, `patchscope.atlas.stats`) on the same inputs (``tests/test_kernels.py`` holds the checks it has to pass).

Ranking rule, used everywhere: larger activation first; among exact ties, smaller document index,
then smaller position. Empty slots hold ``-inf`` with document ``-1`` (position and token 0) and sort last.
"""

from __future__ import annotations

import torch
from torch import Tensor

from patchscope.atlas.stats import Moments, TopK

POSITION_BITS = 24
"""Tie-break key = doc << POSITION_BITS | position; positions stay below 16.7M tokens."""
EMPTY_KEY = torch.iinfo(torch.int64).max


def order_key(doc: Tensor, pos: Tensor) -> Tensor:
    """The tie-break key of each example: smaller ranks first; empty slots last."""
    return torch.where(doc >= 0, (doc << POSITION_BITS) | pos, EMPTY_KEY)


def merge_topk(first: TopK, *rest: TopK) -> TopK:
    """The best ``first.k`` of the union of several top-k sets, by the ranking rule."""
    parts = (first, *rest)
    values = torch.cat([p.values for p in parts])  # [sum of k, n]
    doc = torch.cat([p.doc for p in parts])
    pos = torch.cat([p.pos for p in parts])
    token = torch.cat([p.token for p in parts])
    # Lexicographic sort as two stable sorts: by tie-break key, then by value (descending).
    by_key = order_key(doc, pos).argsort(dim=0, stable=True)
    by_value = values.gather(0, by_key).argsort(dim=0, descending=True, stable=True)
    order = by_key.gather(0, by_value)[: first.k]
    return TopK(values.gather(0, order), doc.gather(0, order), pos.gather(0, order), token.gather(0, order))


def batch_topk(acts: Tensor, doc: Tensor, pos: Tensor, token: Tensor, counted: Tensor, k: int) -> TopK:
    """Top-k of one batch, per neuron, by the ranking rule (ties included).

    acts: [tokens, n] in any float dtype; doc, pos, token: [tokens]; counted: [tokens] bool, False for
    padding and excluded positions. Uncounted and non-finite activations never enter.
    """
    values = acts.float()
    usable = counted.unsqueeze(1) & torch.isfinite(values)  # [tokens, n]
    masked = torch.where(usable, values, float("-inf"))
    # rows in tie-break order, then a stable sort by value: equal values keep that order
    by_key = order_key(doc, pos).argsort(stable=True)  # [tokens]
    order = masked[by_key].argsort(dim=0, descending=True, stable=True)[:k]  # [<=k, n]
    top_index = by_key[order]
    top_values = masked.gather(0, top_index)
    filled = torch.isfinite(top_values)
    result = TopK(
        values=top_values,
        doc=torch.where(filled, doc[top_index], -1),
        pos=torch.where(filled, pos[top_index], 0),
        token=torch.where(filled, token[top_index], 0),
    )
    if result.k < k:
        result = merge_topk(TopK.empty(k, values.shape[1], values.device), result)
    return result


def batch_moments(acts: Tensor, counted: Tensor) -> Moments:
    """Counts and sums of one batch; acts [tokens, n], counted [tokens] bool."""
    values = acts.float()
    finite = torch.isfinite(values)
    usable = counted.unsqueeze(1) & finite
    kept = torch.where(usable, values, 0.0)
    return Moments(
        fire_count=(kept > 0).sum(0),
        total=kept.sum(0, dtype=torch.float64),
        total_sq=kept.square().sum(0, dtype=torch.float64),
        nonfinite=(counted.unsqueeze(1) & ~finite).sum(0),
        n_tokens=counted.sum(),
    )


def update(
    state: TopK, moments: Moments, acts: Tensor, doc: Tensor, pos: Tensor, token: Tensor, counted: Tensor
) -> tuple[TopK, Moments]:
    """Fold one batch of activations ``[tokens, n]`` into the running state."""
    return merge_topk(state, batch_topk(acts, doc, pos, token, counted, state.k)), moments + batch_moments(acts, counted)
