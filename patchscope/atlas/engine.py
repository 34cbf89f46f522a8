"""Fill an activation atlas: batched, early-exit, resumable, reductions on the device.

Per batch the forward pass stops right after the deepest requested site; a hook at each site folds
``[batch, pos, n]`` into top-k and bottom-k candidates, moments and histogram counts (on the CPU in
one pass, `patchscope.kernels.cpu_pass`; elsewhere `patchscope.kernels.fused.batch_stats` and its
neighbours; all checked against the plain references), which join the running state only once the
whole batch succeeded. Nothing is copied to the host until a checkpoint or the end of the run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Literal, cast

import torch
from torch import Tensor, nn

from patchscope.atlas.atlas import SiteAtlas
from patchscope.atlas.batching import Batch, Segment, collate
from patchscope.atlas.compiled import CompiledLayers
from patchscope.atlas.feature_site import FeatureSite, check_features, encoded_chunks, reads_of
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.stats import Moments, TokenFields, TopK
from patchscope.kernels.bottomk import bottomk_candidates, empty_bottomk, merge_bottomk_fast
from patchscope.kernels.cpu_pass import BatchPieces, Workspace, cpu_pass
from patchscope.kernels.fused import batch_stats, fused_pieces, resolve_backend
from patchscope.kernels.histogram import batch_histogram, empty_histogram
from patchscope.kernels.topk_merge_fast import merge_topk_fast
from patchscope.model.hooks import add_hooks, stop_after
from patchscope.model.loading import model_device
from patchscope.model.sites import check_layer, resolve, site_width, stop_site

log = logging.getLogger(__name__)
MERGE_EVERY = 4


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _resolve_reduction(config: ProfileConfig, device: torch.device) -> tuple[Literal["eager", "inductor", "triton"], bool]:
    """`config.reduction` as the `batch_stats` backend, and whether a CPU batch takes the one `cpu_pass`.

    ``auto`` keeps the measured choice: the one pass on the CPU (faster there than the compiled
    reduction: benchmarks/RESULTS.md, "Reaching the floor"), inductor under --compile off the CPU,
    else Triton on CUDA where it imports, else the separate eager kernels.
    """
    choice = config.reduction
    if choice == "auto":
        return resolve_backend("inductor" if config.compile and device.type != "cpu" else "auto", device), True
    if choice == "one_pass":
        if device.type != "cpu":
            raise ValueError(f"the `one_pass` reduction runs on the CPU only; the model is on {device}")
        return "eager", True
    if choice == "separate":
        return "eager", False
    return resolve_backend(choice, device), True


class Profiler:
    """Holds the running state; `run` folds batches into it."""

    def __init__(self, model: nn.Module, config: ProfileConfig, features: Sequence[FeatureSite] = ()) -> None:
        config.validate()
        self.model = model
        self.config = config
        self.features = {feature.name: feature for feature in features}  # SAE features: atlas/feature_site.py
        self.neuron_sites = config.site_names()
        self.sites = (*self.neuron_sites, *self.features)
        if not config.sites:
            check_layer(model, config.layer)
        refs = [resolve(model, reads_of(site)) for site in self.sites]  # fails on any bad site, before work
        # None: a raw site after the layers needs the whole pass
        self.deepest = stop_site(model, [reads_of(site) for site in self.sites])
        self.device = model_device(model)
        check_features(features, {f.reads: site_width(model, f.reads) for f in features})
        widths = {site: site_width(model, site) for site in self.neuron_sites} | {f.name: f.d_sae for f in features}
        block = max((f.block_bytes(config.batch_tokens) for f in features), default=0)
        config.check_atlas_size(widths, self.device, block_bytes=block)
        self.state = {site: self._empty_site(width) for site, width in widths.items()}
        self.splits = 0  # each OOM doubles how many pieces a planned batch is cut into
        self._fields: TokenFields | None = None  # the batch being folded, set by `_forward`
        self._pending: dict[str, list[BatchPieces]] = {}  # this batch's pieces, per site
        # Per-batch top-k and bottom-k candidates wait here and are merged into the state MERGE_EVERY at
        # a time: one sort of all of them costs much less than MERGE_EVERY small sorts.
        self._unmerged: dict[str, list[TopK]] = {site: [] for site in self.sites}
        self._unmerged_bottom: dict[str, list[TopK]] = {site: [] for site in self.sites}
        self._scratch = torch.empty(0, device=self.device)  # float32 copy of bf16/fp16 activations, reused
        self._workspace = Workspace()  # the CPU pass's buffers, reused
        # --compile: the layers before the first site run compiled, and off the CPU so does the fused reduction
        # (on the CPU `cpu_pass` measured faster than the compiled pass: benchmarks/RESULTS.md, "Reaching the floor")
        self._compiled = CompiledLayers(model, min(ref.layer for ref in refs)) if config.compile else None
        self._reduction, self._one_pass = _resolve_reduction(config, self.device)

    def _empty_site(self, n: int) -> SiteAtlas:
        config, device = self.config, self.device
        with torch.inference_mode(False):  # plain tensors: `fold` adds into them in place, inside inference mode or out
            return SiteAtlas(
                TopK.empty(config.top_k, n, device),
                Moments.zeros(n, device),
                bottom=empty_bottomk(config.bottom_k, n, device) if config.bottom_k else None,
                histogram=empty_histogram(n, device) if config.histogram else None,
            )

    def _site_hook(self, site: str):
        def reduce(value: Tensor, step) -> None:
            acts = value.reshape(-1, value.shape[-1])  # [tokens, n]
            self._pending.setdefault(site, []).append(self._reduce(site, acts))

        return reduce

    def _feature_hook(self, feature: FeatureSite):
        """Encode the site's activations a chunk of tokens at a time; reduce each chunk like a neuron site."""

        def reduce(value: Tensor, step) -> None:
            x = value.reshape(-1, value.shape[-1])  # [tokens, d_in]
            fields = cast(TokenFields, self._fields)
            try:
                for rows, acts in encoded_chunks(feature, x):  # acts: [chunk, d_sae] float32
                    self._fields = fields[rows]
                    self._pending.setdefault(feature.name, []).append(self._reduce(feature.name, acts))
            finally:
                self._fields = fields

        return reduce

    def _hooks(self) -> dict[str, Callable]:
        """One hook per hooked site: its neurons' reduction, then each SAE reading it."""
        by_site: dict[str, list[Callable]] = {}
        for site in self.neuron_sites:
            by_site.setdefault(site, []).append(self._on_site_device(self._site_hook(site), site))
        for feature in self.features.values():
            by_site.setdefault(feature.reads, []).append(self._on_site_device(self._feature_hook(feature), feature.name))

        def chain(hooks: list[Callable]) -> Callable:
            def run_all(value: Tensor, step) -> None:
                for hook in hooks:
                    hook(value, step)

            return hooks[0] if len(hooks) == 1 else run_all

        return {site: chain(hooks) for site, hooks in by_site.items()}

    def _reduce(self, site: str, acts: Tensor) -> BatchPieces:
        """Every statistic of one batch at one site: one CPU pass, one fused pass (Triton, inductor), or the separate kernels."""
        fields, config = cast(TokenFields, self._fields), self.config
        doc, pos, token, counted = fields.doc, fields.pos, fields.token, fields.counted
        if acts.device.type == "cpu" and self.device.type == "cpu" and self._reduction == "eager" and self._one_pass:
            state = self.state[site]
            pieces = cpu_pass(
                acts,
                fields,
                top_k=config.top_k,
                bottom_k=config.bottom_k,
                histogram=config.histogram,
                workspace=self._workspace,
                top_floor=state.top.values.amin(0),  # [n] the k-th value held so far (-inf until k are held)
                bottom_ceiling=state.bottom.values.amax(0) if state.bottom is not None else None,
            )
            if pieces is not None:
                return pieces
        if self._reduction != "eager":  # one fused pass for every statistic: no float copy, no host sync
            return fused_pieces(acts, fields, config.top_k, config.bottom_k, config.histogram, self._reduction)
        if acts.dtype != torch.float32 and self._scratch.numel() < acts.numel():
            self._scratch = torch.empty(acts.numel(), dtype=torch.float32, device=acts.device)
        top, moments = batch_stats(acts, doc, pos, token, counted, config.top_k, backend="eager", scratch=self._scratch)
        values = acts if acts.dtype == torch.float32 else acts.float()  # [tokens, n]
        bottom = bottomk_candidates(values, doc, pos, token, counted, config.bottom_k) if config.bottom_k else None
        counts = batch_histogram(values, counted) if config.histogram else None  # [n, N_BINS]
        return BatchPieces(top, moments, bottom, counts)

    def _on_site_device(self, hook, name: str):
        """Under a device_map a site may live on another GPU than the inputs: reduce its activations
        there (only the ``[tokens]`` fields travel; an SAE's encode follows them), then bring the small
        results of ``name`` (a neuron site, or the feature site reading it: one piece per chunk) to the state's device."""

        def reduce_where_it_lives(value: Tensor, step) -> None:
            if value.device == self.device:
                return hook(value, step)
            fields, scratch = self._fields, self._scratch
            self._fields, self._scratch = cast(TokenFields, fields).to(value.device), torch.empty(0, device=value.device)
            before = len(self._pending.get(name, []))
            try:
                hook(value, step)
            finally:
                self._fields, self._scratch = fields, scratch
            pieces = self._pending[name]
            pieces[before:] = [
                BatchPieces(*(part.to(self.device) if part is not None else None for part in piece)) for piece in pieces[before:]
            ]

        return reduce_where_it_lives

    def _forward(self, batch: Batch) -> None:
        batch = batch.to(self.device)
        self._fields = batch.fields()
        compiled = self._compiled.active() if self._compiled else nullcontext()
        with (
            torch.inference_mode(),
            compiled,
            add_hooks(self.model, self._hooks()),
            stop_after(self.model, self.deepest) if self.deepest else nullcontext(),
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
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.splits += 1
                log.warning("out of memory on %d rows; halving the batch token budget and retrying", size)
        for site, pieces in self._pending.items():
            stats = self.state[site]
            for piece in pieces:
                stats = stats.add(piece.moments)  # exact sums: the grouping of batches cannot change them
                if piece.top.k:
                    self._unmerged[site].append(piece.top)
                if piece.bottom is not None and piece.bottom.k:
                    self._unmerged_bottom[site].append(piece.bottom)
                if piece.histogram is not None:  # the state's own counts, added in place: no 2.7 MB copy per site and batch
                    counts = stats.histogram if stats.histogram is not None else empty_histogram(stats.n_neurons, self.device)
                    stats = dataclasses.replace(stats, histogram=counts.add_(piece.histogram))
            self.state[site] = stats
            # While a neuron holds fewer than k examples its floor is -inf and no block can be skipped:
            # merge at once until the state is full (on the CPU, where reading that costs no sync).
            filling = self.device.type == "cpu" and bool(torch.isneginf(stats.top.values[-1]).any())
            if filling or max(len(self._unmerged[site]), len(self._unmerged_bottom[site])) >= MERGE_EVERY:
                self.flush(site)
        self._pending = {}

    def flush(self, site: str | None = None) -> None:
        """Merge the waiting per-batch candidates into the state (before a checkpoint, and at the end)."""
        for name in [site] if site else self.sites:
            current = self.state[name]
            if self._unmerged[name]:
                current = dataclasses.replace(current, top=merge_topk_fast(current.top, *self._unmerged[name]))
                self._unmerged[name] = []
            if self._unmerged_bottom[name]:
                start = (
                    current.bottom
                    if current.bottom is not None
                    else empty_bottomk(self.config.bottom_k, current.n_neurons, self.device)
                )
                current = dataclasses.replace(current, bottom=merge_bottomk_fast(start, *self._unmerged_bottom[name]))
                self._unmerged_bottom[name] = []
            self.state[name] = current
