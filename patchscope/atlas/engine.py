"""Fill an activation atlas: batched, early-exit, resumable, reductions on the device.

Per batch the forward pass stops right after the deepest requested site; a hook at each site folds
``[batch, pos, n]`` into top-k candidates and moments (`patchscope.kernels.fused.batch_stats`, checked
against the plain reference in `topk_merge`), which join the running state only once the whole
batch succeeded. Nothing is copied to the host until a
checkpoint or the end of the run.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from patchscope.atlas.atlas import SiteAtlas
from patchscope.atlas.batching import Batch, Segment, collate
from patchscope.atlas.compiled import CompiledLayers
from patchscope.atlas.config import ProfileConfig
from patchscope.atlas.extras import ExtraReductions
from patchscope.kernels.fused import batch_stats, resolve_backend
from patchscope.kernels.topk_merge import Moments, TopK
from patchscope.kernels.topk_merge_fast import merge_topk_fast
from patchscope.model.hooks import add_hooks, stop_after
from patchscope.model.loading import model_device
from patchscope.model.sites import check_layer, resolve, site_width

log = logging.getLogger(__name__)
MERGE_EVERY = 4


@dataclass
class _BatchFields:
    """The current batch, flattened to ``[tokens]`` for the site hooks."""

    doc: Tensor | None = None
    position: Tensor | None = None
    token: Tensor | None = None
    counted: Tensor | None = None

    def to(self, device: torch.device) -> _BatchFields:
        return _BatchFields(*(None if t is None else t.to(device) for t in (self.doc, self.position, self.token, self.counted)))


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class Profiler:
    """Holds the running state; `run` folds batches into it."""

    def __init__(self, model: nn.Module, config: ProfileConfig) -> None:
        config.validate()
        self.model = model
        self.config = config
        self.sites = config.site_names()
        if not config.sites:
            check_layer(model, config.layer)
        refs = [resolve(model, site) for site in self.sites]  # fails on any bad site, before work
        self.deepest = max(refs, key=lambda ref: ref.order).name
        self.device = model_device(model)
        config.check_atlas_size({site: site_width(model, site) for site in self.sites}, self.device)
        self.state = {
            site: SiteAtlas(
                TopK.empty(config.top_k, site_width(model, site), self.device),
                Moments.zeros(site_width(model, site), self.device),
            )
            for site in self.sites
        }
        self.splits = 0  # each OOM doubles how many pieces a planned batch is cut into
        self._fields = _BatchFields()
        self._pending: dict[str, list[tuple[TopK, Moments]]] = {}  # this batch's pieces, per site
        # Per-batch top-k candidates wait here and are merged into the state MERGE_EVERY at a time:
        # one sort of all of them costs much less than MERGE_EVERY small sorts.
        self._unmerged: dict[str, list[TopK]] = {site: [] for site in self.sites}
        self._scratch = torch.empty(0, device=self.device)  # float32 copy of bf16/fp16 activations, reused
        # --compile: the layers before the first site run compiled, and so does the fused reduction
        self._compiled = CompiledLayers(model, min(ref.layer for ref in refs)) if config.compile else None
        self._reduction = resolve_backend("inductor" if config.compile else "auto", self.device)
        self.extras = ExtraReductions(config)  # bottom-k and histograms (patchscope.atlas.extras)

    def _site_hook(self, site: str):
        def reduce(value: Tensor, step) -> None:
            acts = value.reshape(-1, value.shape[-1])  # [tokens, n]
            f = self._fields
            if self._reduction == "eager" and acts.dtype != torch.float32 and self._scratch.numel() < acts.numel():
                self._scratch = torch.empty(acts.numel(), dtype=torch.float32, device=acts.device)
            self._pending.setdefault(site, []).append(
                batch_stats(
                    acts, f.doc, f.position, f.token, f.counted, self.config.top_k, backend=self._reduction, scratch=self._scratch
                )
            )
            # the batch fields are set by `_forward` before any hook runs
            self.extras.observe(
                site, acts, cast(Tensor, f.doc), cast(Tensor, f.position), cast(Tensor, f.token), cast(Tensor, f.counted)
            )

        return reduce

    def _on_site_device(self, hook):
        """Under a device_map a site may live on another GPU than the inputs: reduce its activations
        there (only the ``[tokens]`` fields travel), then bring the small results to the state's device."""

        def reduce_where_it_lives(value: Tensor, step) -> None:
            if value.device == self.device:
                return hook(value, step)
            fields, scratch = self._fields, self._scratch
            self._fields, self._scratch = fields.to(value.device), torch.empty(0, device=value.device)
            try:
                hook(value, step)
            finally:
                self._fields, self._scratch = fields, scratch
            pieces = self._pending[step.site]
            pieces[-1] = tuple(part.to(self.device) for part in pieces[-1])

        return reduce_where_it_lives

    def _forward(self, batch: Batch) -> None:
        batch = batch.to(self.device)
        self._fields = _BatchFields(
            batch.doc.flatten(), batch.position.flatten(), batch.input_ids.flatten(), batch.counted.flatten()
        )
        compiled = self._compiled.active() if self._compiled else nullcontext()
        with (
            torch.inference_mode(),
            compiled,
            add_hooks(self.model, {s: self._on_site_device(self._site_hook(s)) for s in self.sites}),
            stop_after(self.model, self.deepest),
        ):
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    def fold(self, rows: list[Segment], pad_id: int) -> None:
        """Profile one planned batch, cutting it into smaller pieces after out-of-memory errors."""
        self._pending = {}
        while True:
            pieces = 2**self.splits
            size = max(1, -(-len(rows) // pieces))
            try:
                for start in range(0, len(rows), size):
                    self._forward(collate(rows[start : start + size], pad_id))
                break
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not _is_oom(error) or size == 1:
                    raise
                self._pending = {}
                self.extras.discard()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.splits += 1
                log.warning("out of memory on %d rows; halving the batch token budget and retrying", size)
        for site, pieces in self._pending.items():
            stats = self.state[site]
            for candidates, piece_moments in pieces:
                stats = stats.add(piece_moments)  # exact sums: the grouping of batches cannot change them
                self._unmerged[site].append(candidates)
            self.state[site] = stats
            if len(self._unmerged[site]) >= MERGE_EVERY:
                self.flush(site)
        self._pending = {}
        self.extras.fold_into(self.state)

    def flush(self, site: str | None = None) -> None:
        """Merge the waiting per-batch top-ks into the state (before a checkpoint, and at the end)."""
        for name in [site] if site else self.sites:
            if self._unmerged[name]:
                current = self.state[name]
                self.state[name] = dataclasses.replace(current, top=merge_topk_fast(current.top, *self._unmerged[name]))
                self._unmerged[name] = []
