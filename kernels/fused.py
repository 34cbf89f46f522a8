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

All three then pick candidates the same way (`select_candidates`): the k + TIE_MARGIN blocks with
the largest maxima per neuron hold its k + TIE_MARGIN largest values, so ``topk`` runs on 8 rows
per block instead of on every token, and only those rows are converted and masked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from patchscope.atlas.stats import Moments, TopK

from .topk_merge import batch_topk as reference_batch_topk
from .topk_merge_fast import BLOCK_ROWS, TIE_MARGIN, exact_columns, overflowing_ties
from .topk_merge_fast import batch_stats as eager_batch_stats

Backend = Literal["auto", "eager", "inductor", "triton"]


class BlockStats(NamedTuple):
    """What one pass over the activations leaves behind, per neuron."""

    block_max: Tensor  # [ceil(tokens / BLOCK_ROWS), n] float32, over usable entries (-inf if none)
    total: Tensor  # [n] float32, sum over usable entries
    total_sq: Tensor  # [n] float32
    fire_count: Tensor  # [n] int64, usable entries > 0
    nonfinite: Tensor  # [n] int64, counted entries that are inf or nan


def block_pass(acts: Tensor, counted: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Block maxima of the full blocks and the column sums of every row; written to be compiled.

    acts: [tokens, n] any float dtype; counted: [tokens] bool. Rows after the last full block are
    left to `block_stats`, so the compiled graph never depends on ``tokens % BLOCK_ROWS``.
    """
    tokens, n = acts.shape
    x = acts.float()
    finite = torch.isfinite(x)
    usable = counted.unsqueeze(1) & finite  # [tokens, n]
    kept = torch.where(usable, x, 0.0)
    full = tokens // BLOCK_ROWS
    masked = torch.where(usable, x, float("-inf"))[: full * BLOCK_ROWS]
    block_max = masked.view(full, BLOCK_ROWS, n).amax(1)  # [full, n]
    return (
        block_max,
        kept.sum(0),
        (kept * kept).sum(0),
        (kept > 0).sum(0),
        (counted.unsqueeze(1) & ~finite).sum(0),
    )


_compiled: dict[str, Callable] = {}


def _inductor_pass(acts: Tensor, counted: Tensor) -> tuple[Tensor, ...]:
    if "pass" not in _compiled:
        _compiled["pass"] = torch.compile(block_pass, dynamic=False)
    torch._dynamo.mark_dynamic(acts, 0)  # one graph for every batch length
    torch._dynamo.mark_dynamic(counted, 0)
    return _compiled["pass"](acts, counted)


def block_stats(acts: Tensor, counted: Tensor, backend: Literal["eager", "inductor", "triton"] = "eager") -> BlockStats:
    """`BlockStats` of one batch by the chosen backend (``eager`` runs `block_pass` uncompiled)."""
    if backend == "triton":
        from .triton_stats import triton_block_stats

        return triton_block_stats(acts, counted)
    tokens, n = acts.shape
    if tokens < BLOCK_ROWS:
        block_max, total, total_sq, fire, nonfinite = block_pass(acts, counted)
    else:
        block_max, total, total_sq, fire, nonfinite = (_inductor_pass if backend == "inductor" else block_pass)(acts, counted)
    full = tokens // BLOCK_ROWS * BLOCK_ROWS
    if full < tokens:  # the partial last block, a few rows, in plain torch
        tail = acts[full:].float()
        usable = counted[full:].unsqueeze(1) & torch.isfinite(tail)
        block_max = torch.cat([block_max, torch.where(usable, tail, float("-inf")).amax(0, keepdim=True)])
    return BlockStats(block_max, total, total_sq, fire.long(), nonfinite.long())


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
    """Top-k candidates (``k + TIE_MARGIN`` rows, unordered) and moments of one batch ``[tokens, n]``.

    Same contract as `topk_merge_fast.batch_stats`; ``scratch`` only serves the eager backend.
    """
    chosen = resolve_backend(backend, acts.device)
    if chosen == "eager":
        return eager_batch_stats(acts, doc, pos, token, counted, k, scratch)
    stats = block_stats(acts, counted, chosen)
    moments = Moments(
        fire_count=stats.fire_count,
        total=stats.total.double(),
        total_sq=stats.total_sq.double(),
        nonfinite=stats.nonfinite,
        n_tokens=counted.sum(),
    )
    return select_candidates(acts, stats.block_max, doc, pos, token, counted, k), moments


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
