"""Bottom-k: the k most negative activations of each neuron, by the top-k ranking rule mirrored.

Ranking rule: smaller activation first; among exact ties, smaller document index, then smaller
position. A bottom-k is held as a `TopK` with the real (not negated) values, ascending; empty
slots hold ``+inf`` with document ``-1``. It is the top-k of the negated activations, so merging
reuses `topk_merge.merge_topk`, and the fast kernels are those of `topk_merge_fast` on ``-x``.

Gemma's ``gelu_tanh(gate) * up`` neurons are often strongly negative: the up projection carries
the sign.
"""

from __future__ import annotations

import torch
from torch import Tensor

from patchscope.atlas.stats import TopK

from .topk_merge import batch_topk, merge_topk
from .topk_merge_fast import merge_topk_fast, topk_candidates


def negated(top: TopK) -> TopK:
    """The same examples with their values negated: a bottom-k <-> a top-k of ``-x``."""
    return TopK(-top.values, top.doc, top.pos, top.token)


def empty_bottomk(k: int, n: int, device: torch.device | str = "cpu") -> TopK:
    return negated(TopK.empty(k, n, device))


def merge_bottomk(first: TopK, *rest: TopK) -> TopK:
    """The best ``first.k`` of several bottom-k sets (reference)."""
    return negated(merge_topk(*(negated(part) for part in (first, *rest))))


def merge_bottomk_fast(first: TopK, *rest: TopK) -> TopK:
    """`merge_bottomk` by way of `topk_merge_fast.merge_topk_fast` on the negated values: a plain
    ``topk`` pre-selection, with the exact fallback for neurons whose ties overflow it."""
    return negated(merge_topk_fast(*(negated(part) for part in (first, *rest))))


def batch_bottomk(acts: Tensor, doc: Tensor, pos: Tensor, token: Tensor, counted: Tensor, k: int) -> TopK:
    """Bottom-k of one batch, per neuron (reference): the top-k of the negated activations."""
    return negated(batch_topk(-acts.float(), doc, pos, token, counted, k))


def bottomk_candidates(values: Tensor, doc: Tensor, pos: Tensor, token: Tensor, counted: Tensor, k: int) -> TopK:
    """Candidates for the batch bottom-k: ``k + TIE_MARGIN`` rows per neuron, unordered (the top-k
    candidates of ``-values`` from `topk_merge_fast`, ties at the k-th value included).

    ``values``: float32 ``[tokens, n]``. `merge_bottomk_fast` with any state (or an empty one)
    picks the best k of them by the ranking rule.
    """
    return negated(topk_candidates(-values, doc, pos, token, counted, k, all_finite=False))
