"""The atlas statistics beyond top-k and moments, folded in the same pass: bottom-k and histograms.

The profiler's site hook hands every batch to `ExtraReductions.observe`; once the whole planned
batch succeeded, `fold_into` adds the pieces to the running `SiteAtlas` state (a failed, retried
batch is dropped with `discard`). Both reductions merge exactly, so shards and resumed runs give
the same atlas as one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import Tensor

from patchscope.atlas.atlas import SiteAtlas
from patchscope.atlas.config import ProfileConfig
from patchscope.kernels.bottomk import bottomk_candidates, empty_bottomk, merge_bottomk_fast
from patchscope.kernels.histogram import batch_histogram, empty_histogram
from patchscope.kernels.topk_merge import TopK


class ExtraReductions:
    """Per-batch bottom-k candidates and histogram counts, per site, waiting for the batch to finish."""

    def __init__(self, config: ProfileConfig) -> None:
        self.bottom_k = config.bottom_k
        self.histogram = config.histogram
        self._pending: dict[str, list[tuple[TopK | None, Tensor | None]]] = {}

    @property
    def enabled(self) -> bool:
        return self.bottom_k > 0 or self.histogram

    def observe(self, site: str, acts: Tensor, doc: Tensor, pos: Tensor, token: Tensor, counted: Tensor) -> None:
        """``acts``: ``[tokens, n]`` in the model's dtype; the others ``[tokens]``."""
        if not self.enabled:
            return
        values = acts if acts.dtype == torch.float32 else acts.float()  # [tokens, n]
        bottom = bottomk_candidates(values, doc, pos, token, counted, self.bottom_k) if self.bottom_k else None
        counts = batch_histogram(values, counted) if self.histogram else None  # [n, N_BINS]
        self._pending.setdefault(site, []).append((bottom, counts))

    def discard(self) -> None:
        self._pending = {}

    def fold_into(self, state: dict[str, SiteAtlas]) -> None:
        """Add the pending pieces of every site to ``state`` (in place), then forget them."""
        for site, pieces in self._pending.items():
            stats = state[site]
            n, device = stats.n_neurons, stats.top.values.device
            bottom, histogram = stats.bottom, stats.histogram
            if self.bottom_k:
                start = bottom if bottom is not None else empty_bottomk(self.bottom_k, n, device)
                bottom = merge_bottomk_fast(start, *(piece for piece, _ in pieces))
            if self.histogram:
                start = histogram if histogram is not None else empty_histogram(n, device)
                histogram = start + sum(cast(Tensor, counts) for _, counts in pieces)  # set when histogram is on
            state[site] = dataclasses.replace(stats, bottom=bottom, histogram=histogram)
        self._pending = {}
