"""Bottom-k: the k most negative activations of each neuron, by the top-k ranking rule mirrored.

Ranking rule: smaller activation first; among exact ties, smaller document index, then smaller
position. A bottom-k is held as a `TopK` with the real (not negated) values, ascending; empty
slots hold ``+inf`` with document ``-1``. It is the top-k of the negated activations, so merging
reuses `topk_merge.merge_topk`; the fast merge pre-selects candidates with ``topk`` first.

Gemma's ``gelu_tanh(gate) * up`` neurons are often strongly negative: the up projection carries
the sign.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .topk_merge import TopK, batch_topk, merge_topk

BLOCK_ROWS = 8
TIE_MARGIN = 8
"""Extra candidates kept per batch so that values tied at the k-th place are ranked by the rule (as in
`topk_merge_fast`): exact unless more than TIE_MARGIN + 1 tokens of one batch tie at the k-th value."""


def negated(top: TopK) -> TopK:
    """The same examples with their values negated: a bottom-k <-> a top-k of ``-x``."""
    return TopK(-top.values, top.doc, top.pos, top.token)


def empty_bottomk(k: int, n: int, device: torch.device | str = "cpu") -> TopK:
    return negated(TopK.empty(k, n, device))


def merge_bottomk(first: TopK, *rest: TopK) -> TopK:
    """The best ``first.k`` of several bottom-k sets (reference)."""
    return negated(merge_topk(*(negated(part) for part in (first, *rest))))


def merge_bottomk_fast(first: TopK, *rest: TopK) -> TopK:
    """`merge_bottomk` with a plain ``topk`` pre-selection of ``k + TIE_MARGIN`` rows before the exact sort."""
    parts = (first, *rest)
    values = torch.cat([p.values for p in parts])  # [rows, n]
    keep = min(first.k + TIE_MARGIN, values.shape[0])
    _, index = values.topk(keep, dim=0, largest=False, sorted=False)  # [keep, n]
    pick = lambda name: torch.cat([getattr(p, name) for p in parts]).gather(0, index)  # noqa: E731
    shortlist = TopK(values.gather(0, index), pick("doc"), pick("pos"), pick("token"))
    return merge_bottomk(empty_bottomk(first.k, values.shape[1], values.device), shortlist)


def batch_bottomk(acts: Tensor, doc: Tensor, pos: Tensor, token: Tensor, counted: Tensor, k: int) -> TopK:
    """Bottom-k of one batch, per neuron (reference): the top-k of the negated activations."""
    return negated(batch_topk(-acts.float(), doc, pos, token, counted, k))


def bottomk_candidates(values: Tensor, doc: Tensor, pos: Tensor, token: Tensor, counted: Tensor, k: int) -> TopK:
    """Candidates for the batch bottom-k: ``k + TIE_MARGIN`` rows per neuron, unordered.

    ``values``: float32 ``[tokens, n]``. `merge_bottomk_fast` with any state (or an empty one)
    picks the best k of them by the ranking rule. Like `topk_merge_fast`, it first picks the
    ``k + TIE_MARGIN`` blocks of 8 rows with the smallest block minima, then runs ``topk`` on those
    rows only.
    """
    masked = values.masked_fill(~counted.unsqueeze(1), float("inf"))  # [tokens, n]
    masked = torch.nan_to_num(masked, nan=float("inf"), posinf=float("inf"), neginf=float("inf"))
    tokens, n = masked.shape
    k = min(k + TIE_MARGIN, tokens)
    full_blocks = tokens // BLOCK_ROWS
    if full_blocks < 2 * k:
        low_values, low_index = masked.topk(k, dim=0, largest=False, sorted=False)
    else:
        main = full_blocks * BLOCK_ROWS
        blocks = masked[:main].view(full_blocks, BLOCK_ROWS, n)  # [blocks, 8, n]
        _, best = blocks.amin(1).topk(k, dim=0, largest=False, sorted=False)  # [k, n]
        rows = best.unsqueeze(1) * BLOCK_ROWS + torch.arange(BLOCK_ROWS, device=masked.device).view(1, -1, 1)
        candidates = blocks.gather(0, best.unsqueeze(1).expand(k, BLOCK_ROWS, n)).view(k * BLOCK_ROWS, n)
        rows = rows.view(k * BLOCK_ROWS, n)
        if main < tokens:  # the rows after the last full block are always candidates
            rest = torch.arange(main, tokens, device=masked.device).view(-1, 1).expand(-1, n)
            candidates = torch.cat([candidates, masked[main:]])
            rows = torch.cat([rows, rest])
        low_values, local = candidates.topk(k, dim=0, largest=False, sorted=False)  # [k, n]
        low_index = rows.gather(0, local)
    filled = low_values < float("inf")
    return TopK(
        low_values,
        torch.where(filled, doc[low_index], -1),
        torch.where(filled, pos[low_index], 0),
        torch.where(filled, token[low_index], 0),
    )
