"""The batch reduction in one pass over ``[tokens, n]``: block maxima and moments together, then a small top-k.

`batch_stats` is the profiler's entry point off the CPU (on the CPU it runs `cpu_pass`, and comes here
only for batches holding inf or nan). It returns the same candidates and moments
as `topk_merge_fast.batch_stats` (and, after `merge_topk`, the same `TopK` as the reference
`topk_merge.batch_topk`), computed by one of three backends:

- ``eager``: `topk_merge_fast` (plain torch ops, several passes, a float32 copy for bf16/fp16);
- ``inductor``: `block_pass` below compiled by ``torch.compile``. Inductor fuses the mask, the
  float conversion, the block maxima and the four column sums into generated C++ (CPU) or Triton
  (CUDA) loops that read the activations in their own dtype, with no float32 copy;
- ``triton``: the hand-written kernel in `triton_stats` (CUDA only; the interpreter runs it on CPU).

All three then pick candidates the same way (`exact_candidates`). Each entry gets a distinct 64-bit
*rank key* that orders entries exactly as the ranking rule does: the float32 value's bits, made
monotone, above the entry's rank by (document, position) within the batch (`rank_keys`). The pass
writes one maximum key per block of BLOCK_ROWS rows (and, for the bottom-k, one per block of the
negated values). The k blocks with the largest maxima hold the k largest keys, so ``topk`` runs on 8
rows per block instead of on every token, and the result is the exact batch top-k: ties included,
with no flagged neuron to recompute and nothing read back to the host.

`select_candidates` is the float-maxima selection with its exact tie fallback (a host read of the
flagged neurons), kept for `cpu_pass`, where a read costs no device sync.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from patchscope.atlas.stats import Moments, TokenFields, TopK

from .bottomk import negated
from .topk_merge import batch_topk as reference_batch_topk
from .topk_merge import order_key
from .topk_merge_fast import BLOCK_ROWS, TIE_MARGIN, exact_columns, overflowing_ties
from .topk_merge_fast import batch_stats as eager_batch_stats

Backend = Literal["auto", "eager", "inductor", "triton"]


NO_KEY = -(2**63)
"""The rank key of an entry that never enters (uncounted, non-finite, or past the end): below every real one."""


class BlockStats(NamedTuple):
    """What one pass over the activations leaves behind, per neuron."""

    block_top: Tensor  # [ceil(tokens / BLOCK_ROWS), n] int64, largest rank key per block (NO_KEY if none)
    total: Tensor  # [n] float32 or float64, sum over usable entries
    total_sq: Tensor  # [n]
    fire_count: Tensor  # [n] int64, usable entries > 0
    nonfinite: Tensor  # [n] int64, counted entries that are inf or nan
    block_bottom: Tensor | None = None  # [blocks, n] int64, the same keys of the negated values
    histogram: Tensor | None = None  # [n, N_BINS] int64 (the Triton pass only)


def rank_keys(doc: Tensor, pos: Tensor) -> Tensor:
    """``[tokens]`` int64 in ``[0, tokens)``: larger for an earlier (document, position), the rule's tie-break.

    Rows with equal (document, position) keep their batch order, as the reference's stable sorts do.
    """
    order = order_key(doc, pos).argsort(stable=True)  # [tokens], first in rank first
    low = torch.empty_like(order)
    low[order] = torch.arange(len(order) - 1, -1, -1, device=order.device)
    return low


def entry_keys(values: Tensor, usable: Tensor, low: Tensor) -> Tensor:
    """The rank key of every entry: ``[..., n]`` int64 from float32 ``values``, ``usable`` and ``low`` (broadcast).

    A larger key ranks first. The high 32 bits are the value's bits made monotone (-0.0 counts as
    0.0, which it equals), the low 32 bits the entry's `rank_keys`: ties on the value fall to the
    document and position, and no two entries of a batch share a key.
    """
    values = torch.where(values == 0, 0.0, values)
    bits = values.view(torch.int32)
    monotone = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()
    return torch.where(usable, (monotone << 32) | low, NO_KEY)


def block_pass(acts: Tensor, counted: Tensor, low: Tensor, bottom: bool = False) -> tuple[Tensor, ...]:
    """Block key maxima of the full blocks and the column sums of every row; written to be compiled.

    acts: [tokens, n] any float dtype; counted: [tokens] bool; low: [tokens] int64 (`rank_keys`).
    Rows after the last full block are left to `block_stats`, so the compiled graph never depends on
    ``tokens % BLOCK_ROWS``. With ``bottom`` it also returns the block maxima of the negated keys.
    """
    tokens, n = acts.shape
    x = acts.float()
    finite = torch.isfinite(x)
    usable = counted.unsqueeze(1) & finite  # [tokens, n]
    kept = torch.where(usable, x, 0.0)
    full = tokens // BLOCK_ROWS * BLOCK_ROWS
    top = entry_keys(x[:full], usable[:full], low[:full, None]).view(-1, BLOCK_ROWS, n).amax(1)  # [full blocks, n]
    sums = (kept.sum(0), (kept * kept).sum(0), (kept > 0).sum(0), (counted.unsqueeze(1) & ~finite).sum(0))
    if not bottom:
        return (top, *sums)
    under = entry_keys(-x[:full], usable[:full], low[:full, None]).view(-1, BLOCK_ROWS, n).amax(1)
    return (top, *sums, under)


_compiled: dict[str, Callable] = {}


def _inductor_pass(acts: Tensor, counted: Tensor, low: Tensor, bottom: bool) -> tuple[Tensor, ...]:
    if "pass" not in _compiled:
        _compiled["pass"] = torch.compile(block_pass, dynamic=False)
    for tensor in (acts, counted, low):
        torch._dynamo.mark_dynamic(tensor, 0)  # one graph for every batch length
    return _compiled["pass"](acts, counted, low, bottom)


def block_stats(
    acts: Tensor,
    counted: Tensor,
    low: Tensor,
    backend: Literal["eager", "inductor", "triton"] = "eager",
    *,
    bottom: bool = False,
    histogram: bool = False,
) -> BlockStats:
    """`BlockStats` of one batch by the chosen backend (``eager`` runs `block_pass` uncompiled).

    ``histogram`` is filled by the Triton pass only (the others leave it to `histogram.batch_histogram`).
    """
    if backend == "triton":
        from .triton_stats import triton_block_stats

        return triton_block_stats(acts, counted, low, bottom=bottom, histogram=histogram)
    tokens, n = acts.shape
    run = _inductor_pass if backend == "inductor" and tokens >= BLOCK_ROWS else block_pass
    top, total, total_sq, fire, nonfinite, *under = run(acts, counted, low, bottom)
    full = tokens // BLOCK_ROWS * BLOCK_ROWS
    if full < tokens:  # the partial last block, a few rows, in plain torch
        tail = acts[full:].float()
        usable = counted[full:].unsqueeze(1) & torch.isfinite(tail)
        top = torch.cat([top, entry_keys(tail, usable, low[full:, None]).amax(0, keepdim=True)])
        if bottom:
            under = [torch.cat([under[0], entry_keys(-tail, usable, low[full:, None]).amax(0, keepdim=True)])]
    return BlockStats(top, total, total_sq, fire.long(), nonfinite.long(), under[0] if bottom else None)


def exact_candidates(
    acts: Tensor,
    block_top: Tensor,
    low: Tensor,
    doc: Tensor,
    pos: Tensor,
    token: Tensor,
    counted: Tensor,
    k: int,
    sign: float = 1.0,
) -> TopK:
    """The exact top-k of one batch ``[tokens, n]`` of ``sign * acts``, rows unordered, by the ranking rule.

    ``block_top``: the largest rank key per block of ``sign * acts`` (`block_stats`). Every entry of
    the top-k lies in one of the k blocks with the largest maxima, since the keys are distinct; no
    data-dependent branch, so nothing is read back to the host.
    """
    tokens, n = acts.shape
    keep = min(k, tokens)
    if block_top.shape[0] <= keep:  # every row is a candidate
        rows = torch.arange(tokens, device=acts.device).unsqueeze(1).expand(tokens, n)  # [tokens, n]
    else:
        _, best = block_top.topk(keep, dim=0, sorted=False)  # [keep, n]
        offsets = torch.arange(BLOCK_ROWS, device=acts.device).view(1, -1, 1)
        rows = (best.unsqueeze(1) * BLOCK_ROWS + offsets).view(keep * BLOCK_ROWS, n)  # [keep * 8, n]
    inside = rows < tokens  # the partial last block points past the end
    rows = rows.clamp(max=tokens - 1)
    values = acts.gather(0, rows).float() * sign  # [rows, n]
    keys = entry_keys(values, inside & counted[rows] & torch.isfinite(values), low[rows])
    best_keys, local = keys.topk(keep, dim=0, sorted=False)  # [keep, n]
    index = rows.gather(0, local)
    filled = best_keys > NO_KEY
    return TopK(
        torch.where(filled, values.gather(0, local), float("-inf")),
        torch.where(filled, doc[index], -1),
        torch.where(filled, pos[index], 0),
        torch.where(filled, token[index], 0),
    )


def select_candidates(acts: Tensor, block_max: Tensor, doc: Tensor, pos: Tensor, token: Tensor, counted: Tensor, k: int) -> TopK:
    """The ``k + TIE_MARGIN`` best rows per neuron, unordered, read from the best blocks only.

    Exact by the ranking rule after `merge_topk`: every value above a neuron's worst candidate lies
    in a chosen block, and neurons whose tie group at the k-th value may have been cut are
    recomputed by the reference.
    """
    tokens, n = acts.shape
    keep = min(k + TIE_MARGIN, tokens)
    blocks = block_max.shape[0]
    if blocks <= keep:  # every row is a candidate
        rows = torch.arange(tokens, device=acts.device).unsqueeze(1).expand(tokens, n)  # [tokens, n]
    else:
        _, best = block_max.topk(keep, dim=0, sorted=False)  # [keep, n]
        offsets = torch.arange(BLOCK_ROWS, device=acts.device).view(1, -1, 1)
        rows = (best.unsqueeze(1) * BLOCK_ROWS + offsets).view(keep * BLOCK_ROWS, n)  # [keep * 8, n]
    inside = rows < tokens  # the partial last block points past the end
    rows = rows.clamp(max=tokens - 1)
    values = acts.gather(0, rows).float()  # [rows, n]
    usable = inside & counted[rows] & torch.isfinite(values)
    values = values.masked_fill_(~usable, float("-inf"))
    top_values, local = values.topk(keep, dim=0, sorted=False)  # [keep, n]
    top_index = rows.gather(0, local)
    filled = top_values > float("-inf")
    top = TopK(
        top_values,
        torch.where(filled, doc[top_index], -1),
        torch.where(filled, pos[top_index], 0),
        torch.where(filled, token[top_index], 0),
    )
    if keep >= tokens:
        return top
    columns = overflowing_ties(top_values, k).nonzero().squeeze(1)
    if len(columns):
        top = exact_columns(top, columns, reference_batch_topk(acts[:, columns], doc, pos, token, counted, k))
    return top


def resolve_backend(backend: Backend, device: torch.device) -> Literal["eager", "inductor", "triton"]:
    """``auto``: the Triton kernel on CUDA when Triton imports, else the eager torch kernels."""
    if backend != "auto":
        if backend == "triton" and device.type != "cuda" and not _interpreting():
            raise ValueError("the `triton` reduction runs on CUDA devices only (or under TRITON_INTERPRET=1)")
        return backend
    if device.type == "cuda" and triton_available():
        return "triton"
    return "eager"


def batch_stats(
    acts: Tensor,
    doc: Tensor,
    pos: Tensor,
    token: Tensor,
    counted: Tensor,
    k: int,
    *,
    backend: Backend = "auto",
    scratch: Tensor | None = None,
) -> tuple[TopK, Moments]:
    """Top-k candidates (unordered: ``k + TIE_MARGIN`` rows from the eager kernels, the exact k from a
    fused backend) and moments of one batch ``[tokens, n]``.

    Same contract as `topk_merge_fast.batch_stats`; ``scratch`` only serves the eager backend.
    """
    chosen = resolve_backend(backend, acts.device)
    if chosen == "eager":
        return eager_batch_stats(acts, doc, pos, token, counted, k, scratch)
    pieces = fused_pieces(acts, TokenFields(doc, pos, token, counted), k, 0, False, chosen)
    return pieces.top, pieces.moments


def fused_pieces(
    acts: Tensor, fields: TokenFields, top_k: int, bottom_k: int, histogram: bool, backend: Literal["eager", "inductor", "triton"]
):
    """Every statistic of one batch from one fused pass: `cpu_pass.BatchPieces` with the exact top-k and
    bottom-k of the batch (rows unordered) and, from the Triton pass, the histogram counts.

    acts: [tokens, n] in its own dtype (no float32 copy); ``eager`` runs the pass uncompiled (for the
    tests). The per-batch work is a fixed list of
    launches whatever the data; nothing waits for the device.
    """
    from .cpu_pass import BatchPieces
    from .histogram import batch_histogram

    doc, pos, token, counted = fields.doc, fields.pos, fields.token, fields.counted
    low = rank_keys(doc, pos)  # [tokens]
    stats = block_stats(acts, counted, low, backend, bottom=bottom_k > 0, histogram=histogram)
    moments = Moments(stats.fire_count, stats.total.double(), stats.total_sq.double(), stats.nonfinite, counted.sum())
    top = exact_candidates(acts, stats.block_top, low, doc, pos, token, counted, top_k)
    bottom = None
    if stats.block_bottom is not None:
        bottom = negated(exact_candidates(acts, stats.block_bottom, low, doc, pos, token, counted, bottom_k, sign=-1.0))
    counts = stats.histogram
    if histogram and counts is None:
        counts = batch_histogram(acts.float(), counted)  # [n, N_BINS]
    return BatchPieces(top, moments, bottom, counts)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
