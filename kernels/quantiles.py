"""Quantile examples: a few examples from each of several activation intervals below the maximum.

For each neuron, ``(0, upper]`` is cut into `INTERVALS` equal intervals, where ``upper`` is the
neuron's maximum from a first pass; interval ``b`` is ``(upper * b / INTERVALS, upper * (b + 1) / INTERVALS]``.
In each interval we keep the ``m`` examples with the smallest `example_hash` of (document,
position), ties broken by document then position. Which examples are kept therefore does not
depend on the order or the sharding of the data: the union of two shards' picks, cut to ``m`` by
the same rule, is the pick of the union. The intervals follow Neuronpedia's quantile groups
(its dashboards show a few examples per interval, by increasing activation).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

INTERVALS = 5
HASH_PRIME = 2_147_483_629  # largest prime below 2**31: every product below stays inside int64
POSITION_BITS = 24
EMPTY_HASH = torch.iinfo(torch.int64).max


def example_hash(doc: Tensor, pos: Tensor) -> Tensor:
    """A fixed pseudo-random 31-bit number per (document, position), int64; the same on every device."""
    key = ((doc << POSITION_BITS) | pos) % HASH_PRIME
    h = (key * 1_103_515_245 + 12_345) % HASH_PRIME
    h = h ^ (h >> 13)
    h = (h * 69_069 + 1) % HASH_PRIME
    return h ^ (h >> 16)


@dataclass
class QuantileExamples:
    """``m`` examples per interval per neuron, smallest hash first; empty slots: hash `EMPTY_HASH`, doc -1."""

    upper: Tensor  # [n] float32, the maximum the intervals were cut from
    hash: Tensor  # [INTERVALS, m, n] int64
    values: Tensor  # [INTERVALS, m, n] float32
    doc: Tensor  # [INTERVALS, m, n] int64
    pos: Tensor  # [INTERVALS, m, n] int64
    token: Tensor  # [INTERVALS, m, n] int64
    count: Tensor  # [INTERVALS, n] int64, every counted token inside each interval (for "bin contains")

    @classmethod
    def empty(cls, upper: Tensor, m: int) -> QuantileExamples:
        shape = (INTERVALS, m, upper.shape[0])
        long = lambda fill: torch.full(shape, fill, dtype=torch.long, device=upper.device)  # noqa: E731
        count = torch.zeros(INTERVALS, upper.shape[0], dtype=torch.long, device=upper.device)
        return cls(upper.float(), long(EMPTY_HASH), torch.zeros(shape, device=upper.device), long(-1), long(0), long(0), count)

    @property
    def per_interval(self) -> int:
        return self.hash.shape[1]

    def to(self, device: torch.device | str) -> QuantileExamples:
        return QuantileExamples(*(getattr(self, f.name).to(device) for f in fields(self)))


def merge_quantiles(first: QuantileExamples, *rest: QuantileExamples) -> QuantileExamples:
    """The picks of the union of several sets with the same intervals."""
    for other in rest:
        if other.upper is not first.upper and not torch.equal(other.upper, first.upper):  # one object: no device read
            raise ValueError(
                "quantile examples cut from different maxima cannot be merged: run the quantile pass of every "
                "shard with the maxima of the merged atlas"
            )
    parts = (first, *rest)
    picked = [f.name for f in fields(first) if f.name not in ("upper", "count")]
    cat = {name: torch.cat([getattr(p, name) for p in parts], dim=1) for name in picked}
    # lexicographic (hash, doc, pos) as three stable sorts, least significant first
    order = cat["pos"].argsort(dim=1, stable=True)
    for name in ("doc", "hash"):
        order = order.gather(1, cat[name].gather(1, order).argsort(dim=1, stable=True))
    order = order[:, : first.per_interval]
    count = sum(p.count for p in rest) + first.count
    return QuantileExamples(first.upper, **{name: cat[name].gather(1, order) for name in picked}, count=count)


def batch_quantiles(
    values: Tensor, doc: Tensor, pos: Tensor, token: Tensor, counted: Tensor, upper: Tensor, m: int
) -> QuantileExamples:
    """The picks of one batch. ``values``: float ``[tokens, n]``; ``doc, pos, token, counted``: ``[tokens]``."""
    tokens, n = values.shape
    hashes = example_hash(doc, pos)  # [tokens]
    order = pos.argsort(stable=True)  # rows sorted by (hash, doc, pos): the rule of the merge
    order = order[doc[order].argsort(stable=True)]
    order = order[hashes[order].argsort(stable=True)]
    x = values.float()[order]  # [tokens, n], rows in pick order
    usable = counted[order].unsqueeze(1) & torch.isfinite(x) & (x > 0)
    scaled = torch.ceil(x / upper.clamp(min=torch.finfo(torch.float32).tiny) * INTERVALS) - 1
    interval = torch.where(usable & (upper > 0), scaled.clamp(0, INTERVALS - 1), -1).long()  # [tokens, n]
    rows = torch.arange(tokens, device=values.device)
    out = QuantileExamples.empty(upper, m)
    for b in range(INTERVALS):
        inside = interval == b
        out.count[b] = inside.sum(0)
        rank = inside.long().cumsum(0)  # 1-based rank among this interval's rows, in pick order
        slot = torch.where(inside & (rank <= m), rank - 1, m)  # slot m collects everything else
        picked = torch.full((m + 1, n), -1, dtype=torch.long, device=values.device)
        picked.scatter_(0, slot, rows.view(-1, 1).expand(tokens, n).contiguous())
        picked = picked[:m]  # [m, n] row in pick order, -1 where fewer than m
        filled = picked >= 0
        source = order[picked.clamp(min=0)]  # [m, n] original rows
        out.hash[b] = torch.where(filled, hashes[source], EMPTY_HASH)
        out.values[b] = torch.where(filled, x.gather(0, picked.clamp(min=0)), 0.0)
        out.doc[b] = torch.where(filled, doc[source], -1)
        out.pos[b] = torch.where(filled, pos[source], 0)
        out.token[b] = torch.where(filled, token[source], 0)
    return out
