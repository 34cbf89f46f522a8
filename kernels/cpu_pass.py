"""Every per-batch statistic of one site on the CPU: moments, histogram, top-k and bottom-k candidates.

Same results as the separate kernels (`topk_merge_fast.batch_stats`, `bottomk.bottomk_candidates`,
`histogram.batch_histogram`), which stay the plain-torch path for other devices and for batches
holding inf or nan. Three things make it cheaper, each measured on a 2-core CPU for a
``[1024, 2048]`` batch:

- **Reused buffers.** A fresh ``[tokens, n]`` temporary costs about 2 ms of page faults; the same
  elementwise op into a `Workspace` buffer costs about 0.1 ms. Every ``[tokens, n]`` intermediate
  lives in one (not the histogram's copy of one group of 128 columns, about 1 MB), and the moments
  are GEMVs over them (0.15-0.3 ms each).
- **Blocks below the running k-th value are skipped.** Once a neuron's state holds k examples, a
  value below its k-th one (``floor``) can never enter its top-k, so only the blocks of 8 rows
  whose maximum reaches the floor are read, and only their entries at or above it are kept
  (ties at the floor included: the merge ranks them). After the first batches that is a handful
  of entries per neuron, and the column-wise ``topk``/``gather`` of the dense selection (5-20 ms)
  go away. A neuron whose floor still leaves more than ``k + TIE_MARGIN`` blocks (early in a run,
  while the state is not yet full) gets the larger of it and the batch's own k-th largest block
  maximum; one tied at its floor in that many blocks (a dead neuron's zeros) takes the dense
  selection, with its exact tie fallback.
  Bottom-k is the same selection run on the negated activations.
- **The histogram is a ``bincount`` per group of 128 neurons** over int16 keys, the bin read from
  the float bits as in `histogram.bin_index` (about 12-15 ms for a ``[4096, 2048]`` float32 batch of
  Gemma 3 270M, against 16-20 ms for one ``bincount`` over the whole row, and more for the
  column-wise ``scatter_add`` over int64 indices).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from torch import Tensor

from patchscope.atlas.stats import Moments, TokenFields, TopK

from .bottomk import negated
from .fused import select_candidates
from .histogram import CENTER, LOG_BINS, LOW_KEY, MANTISSA_SHIFT, N_BINS
from .topk_merge_fast import BLOCK_ROWS, TIE_MARGIN

# Neurons per histogram bincount: 163 bins x 128 int64 counters = 167 KB, inside a core's L2; the int16
# keys reach N_BINS * 128 = 20,864 (at most 201 fit).
HISTOGRAM_GROUP = 128
assert N_BINS * HISTOGRAM_GROUP < 2**15, "the histogram's keys are int16"


class BatchPieces(NamedTuple):
    """What one batch leaves for one site, before it joins the running state."""

    top: TopK  # [rows, n] candidates, unordered (rows vary per batch; 0 when none can enter the top-k)
    moments: Moments  # [n]
    bottom: TopK | None  # [rows, n] bottom-k candidates (real values), or None when bottom-k is off
    histogram: Tensor | None  # [n, N_BINS] int64 (from `cpu_pass`, a transposed view: add it, do not save it), or None when off


class Workspace:
    """Named buffers reused from batch to batch; a request larger than the buffer grows it."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        numel = 1
        for size in shape:
            numel *= size
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            with torch.inference_mode(False):  # a plain tensor: usable inside inference mode and out of it
                buffer = self._buffers[name] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


def cpu_pass(
    acts: Tensor,
    fields: TokenFields,
    *,
    top_k: int,
    bottom_k: int,
    histogram: bool,
    workspace: Workspace,
    top_floor: Tensor | None = None,
    bottom_ceiling: Tensor | None = None,
) -> BatchPieces | None:
    """All statistics of one batch; None when an entry is inf or nan (the caller then takes the plain path).

    acts: ``[tokens, n]`` any float dtype, on the CPU, left untouched; ``fields``: each token's
    document, position, id and whether it counts (`TokenFields`). ``top_floor``: ``[n]`` the k-th largest value each neuron
    already holds (``-inf`` while it holds fewer than k), or None; ``bottom_ceiling`` mirrors it
    for the bottom-k. The top-k candidates hold every entry that can still enter the top-k (on the
    skipping path, every counted entry at or above the floor); the merge with the state ranks them.
    """
    tokens, n = acts.shape
    doc, pos, token, counted = fields.doc, fields.pos, fields.token, fields.counted
    values = workspace.get("values", (tokens, n), torch.float32).copy_(acts)  # [tokens, n]
    weight = counted.to(torch.float32)  # [tokens]
    total = weight @ values  # [n]; inf or nan in a column if any entry of it is (0 * inf is nan)
    if not bool(torch.isfinite(total).all()):
        return None
    scratch = workspace.get("scratch", (tokens, n), torch.float32)
    moments = Moments(
        fire_count=(weight @ torch.gt(values, 0, out=scratch)).round().long(),
        total=total.double(),
        total_sq=(weight @ torch.mul(values, values, out=scratch)).double(),
        nonfinite=torch.zeros(n, dtype=torch.long),
        n_tokens=counted.sum(),
    )
    uncounted = (~counted).nonzero().squeeze(1)  # [rows], usually BOS and padding
    counts = _histogram(acts, values, uncounted, workspace) if histogram else None

    values.index_fill_(0, uncounted, float("-inf"))
    top = _candidates(values, doc, pos, token, counted, top_k, top_floor)
    bottom = None
    if bottom_k:
        values.neg_().index_fill_(0, uncounted, float("-inf"))  # bottom-k = top-k of -x
        ceiling = None if bottom_ceiling is None else -bottom_ceiling
        bottom = negated(_candidates(values, doc, pos, token, counted, bottom_k, ceiling))
    return BatchPieces(top, moments, bottom, counts)


def _histogram(acts: Tensor, values: Tensor, uncounted: Tensor, workspace: Workspace) -> Tensor:
    """`histogram.batch_histogram` of finite activations: ``[n, N_BINS]`` int64 (a transposed view).

    The bin depends only on the sign, the exponent and the top two mantissa bits, all in the upper
    16 bits of a float32, which are a bfloat16's bits: so the bin arithmetic runs on int16 (half
    the memory traffic of int32). The counts are built `HISTOGRAM_GROUP` neurons at a time, one
    ``bincount`` of ``bin * HISTOGRAM_GROUP + column`` each, so that the counters it increments fit in
    a core's L2; with the whole row in one table (``bin * n + neuron``, 2.7 MB at 2,048 neurons) the
    same counts took about 1.6x as long on a 2-core EPYC. (Counting the groups on two threads was
    faster alone, but doubled the page faults of the forward around it: slower in a real run.)
    """
    tokens, n = values.shape
    if acts.dtype == torch.bfloat16 and acts.is_contiguous():
        high = acts.view(torch.int16)  # [tokens, n]
    else:  # the upper half of each float32 of the copy
        high = values.view(torch.int16)[:, 1::2] if sys.byteorder == "little" else values.view(torch.int16)[:, 0::2]
    key = workspace.get("key", (tokens, n), torch.int16)
    sign = workspace.get("sign", (tokens, n), torch.int16)
    key.copy_(high).bitwise_right_shift_(MANTISSA_SHIFT - 16)  # sign-extended sign, exponent, 2 mantissa bits
    torch.bitwise_right_shift(key, 10, out=sign)  # -1 where negative, else 0
    key.bitwise_and_(0x3FF).sub_(LOW_KEY - 1).clamp_(0, LOG_BINS + 1)  # magnitude bin: 0 near zero .. 81 overflow
    key.bitwise_xor_(sign).sub_(sign)  # the signed bin minus CENTER: -81 .. 81
    width = HISTOGRAM_GROUP
    column = (torch.arange(n) % width + CENTER * width).to(torch.int16)  # [n]
    torch.add(column, key, alpha=width, out=key)  # bin * width + the column inside its group
    key.index_fill_(0, uncounted, N_BINS * width)  # past the last real slot: dropped below

    def count(start: int) -> Tensor:  # [N_BINS, columns] of one group
        group = key[:, start : start + width].reshape(-1)  # a contiguous copy, [tokens * columns]
        counts = torch.bincount(group, minlength=N_BINS * width + 1)[: N_BINS * width]
        return counts.view(N_BINS, width)[:, : min(width, n - start)]

    return torch.cat([count(start) for start in range(0, n, width)], dim=1).T  # [n, N_BINS]


def _candidates(values: Tensor, doc: Tensor, pos: Tensor, token: Tensor, counted: Tensor, k: int, floor: Tensor | None) -> TopK:
    """Top-k candidates of ``values`` ``[tokens, n]`` (uncounted rows already ``-inf``)."""
    tokens, n = values.shape
    full = tokens // BLOCK_ROWS
    block_max = values[: full * BLOCK_ROWS].view(full, BLOCK_ROWS, n).amax(1)  # [blocks, n]
    if full * BLOCK_ROWS < tokens:  # the partial last block
        block_max = torch.cat([block_max, values[full * BLOCK_ROWS :].amax(0, keepdim=True)])
    limit = k + TIE_MARGIN  # the dense selection reads this many blocks per neuron
    if block_max.shape[0] <= limit:  # a short batch: every row is a candidate anyway
        return select_candidates(values, block_max, doc, pos, token, counted, k)
    floor = torch.full((n,), float("-inf")) if floor is None else floor
    hits = block_max >= floor  # [blocks, n]
    crowded = hits.sum(0) > limit  # [n]
    if bool(crowded.any()):  # a host read costs nothing on the CPU
        # The state's floor is too low for these neurons (early in a run): raise it to the batch's own
        # k-th largest block maximum. The k best blocks each hold a value at least that large, so no
        # value below it can enter the top-k either.
        columns = crowded.nonzero().squeeze(1)
        own = block_max[:, columns].topk(k, dim=0).values[-1]  # [columns]
        floor = floor.clone()
        floor[columns] = torch.maximum(floor[columns], own)
        hits[:, columns] = block_max[:, columns] >= floor[columns]
        crowded = hits.sum(0) > limit  # left: neurons tied at their floor in many blocks (a dead neuron's zeros)
    n_crowded = int(crowded.sum())
    if n_crowded * 2 > n:
        return select_candidates(values, block_max, doc, pos, token, counted, k)
    if n_crowded:
        hits[:, crowded] = False
    sparse = _entries_reaching(values, hits, floor, doc, pos, token)
    if not n_crowded:
        return sparse
    columns = crowded.nonzero().squeeze(1)
    dense = select_candidates(values[:, columns], block_max[:, columns], doc, pos, token, counted, k)
    out = TopK.empty(max(sparse.k, dense.k), n)
    for name in ("values", "doc", "pos", "token"):
        getattr(out, name)[: sparse.k] = getattr(sparse, name)
        getattr(out, name)[: dense.k, columns] = getattr(dense, name)
    return out


def _entries_reaching(values: Tensor, hits: Tensor, floor: Tensor, doc: Tensor, pos: Tensor, token: Tensor) -> TopK:
    """The entries at or above their neuron's floor inside the blocks flagged in ``hits`` ``[blocks, n]``,
    packed as ``[most, n]`` candidates (``most``: the largest count of any neuron), empty slots ``-inf``.

    Only these entries can still enter a top-k; usually about one per flagged block.
    """
    tokens, n = values.shape
    neuron, block = hits.T.contiguous().nonzero().unbind(1)  # [pairs], sorted by neuron, then block
    rows = (block.unsqueeze(1) * BLOCK_ROWS + torch.arange(BLOCK_ROWS)).view(-1)  # [pairs * 8]
    neuron = neuron.repeat_interleave(BLOCK_ROWS)  # still sorted by neuron
    inside = rows < tokens  # the partial last block points past the end
    rows = rows.clamp_(max=tokens - 1)
    found = values.view(-1).index_select(
        0, rows * n + neuron
    )  # [pairs * 8]; a flat gather: half the time of values[rows, neuron]
    keep = (inside & (found >= floor[neuron]) & (found > float("-inf"))).nonzero().squeeze(1)  # uncounted rows are -inf
    rows, neuron, found = rows[keep], neuron[keep], found[keep]  # [entries]
    per_neuron = torch.bincount(neuron, minlength=n)  # [n]
    slot = torch.arange(len(neuron)) - (per_neuron.cumsum(0) - per_neuron)[neuron]  # rank within the neuron
    out = TopK.empty(int(per_neuron.max()) if len(neuron) else 0, n)
    out.values[slot, neuron] = found
    out.doc[slot, neuron] = doc[rows]
    out.pos[slot, neuron] = pos[rows]
    out.token[slot, neuron] = token[rows]
    return out
