"""Fill an activation atlas: batched, early-exit, resumable, reductions on the device.

Per batch the forward pass stops right after the deepest requested site; a hook at each site folds
``[batch, pos, n]`` into top-k candidates and moments (`patchscope.kernels.topk_merge_fast`, checked
against the plain reference in `topk_merge`), which join the running state only once the whole
batch succeeded. Nothing is copied to the host until a
checkpoint or the end of the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from patchscope.kernels.topk_merge import Moments, TopK
from patchscope.kernels.topk_merge_fast import batch_stats, merge_topk_fast

from .atlas import Atlas, AtlasError, AtlasMeta, SiteAtlas
from .batching import Batch, Overflow, Segment, collate, plan
from .data import Document, SourceConfig, TextSource
from .hooks import hooks, stop_after
from .models import model_device
from .sites import check_layer, resolve, site_width
from .storage import check_writable
from .versions import versions

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.safetensors"
MERGE_EVERY = 4


@dataclass(frozen=True)
class ProfileConfig:
    """What to profile and how to batch it."""

    layer: int = 12
    """Layer whose MLP neurons (``blocks.L.mlp.hook_post``) are profiled when no --site is given."""
    sites: tuple[str, ...] = field(default=(), metadata={"flags": ("--site", "--sites")})
    """Explicit sites to profile instead of --layer; any number, any layers."""
    top_k: int = 20
    """Examples kept per neuron."""
    max_length: int = 128
    """Tokens per segment, BOS included (the original used 128)."""
    overflow: Overflow = "truncate"
    """Longer documents: truncate (as the original), or split into consecutive windows."""
    batch_tokens: int = 4096
    """Budget of padded tokens per batch."""
    exclude_bos: bool = True
    """Keep BOS positions out of the statistics (they dominate naive top lists)."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint to the output directory every N batches (0: never)."""
    sort_buffer: int = 4096
    """Documents buffered and length-sorted together; bounds memory for streamed sources."""

    def site_names(self) -> tuple[str, ...]:
        return self.sites or (f"blocks.{self.layer}.mlp.hook_post",)

    def validate(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {self.top_k}")
        if self.max_length < 2:
            raise ValueError(f"--max-length must be at least 2, got {self.max_length}")
        if self.batch_tokens < self.max_length:
            raise ValueError(f"--batch-tokens ({self.batch_tokens}) must be at least --max-length ({self.max_length})")


@dataclass
class _BatchFields:
    """The current batch, flattened to ``[tokens]`` for the site hooks."""

    doc: Tensor | None = None
    position: Tensor | None = None
    token: Tensor | None = None
    counted: Tensor | None = None


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
        self.state = {
            site: SiteAtlas(TopK.empty(config.top_k, site_width(model, site), self.device), Moments.zeros(site_width(model, site), self.device))
            for site in self.sites
        }
        self.splits = 0  # each OOM doubles how many pieces a planned batch is cut into
        self._fields = _BatchFields()
        self._pending: dict[str, list[tuple[TopK, Moments]]] = {}  # this batch's pieces, per site
        # Per-batch top-k candidates wait here and are merged into the state MERGE_EVERY at a time:
        # one sort of all of them costs much less than MERGE_EVERY small sorts.
        self._unmerged: dict[str, list[TopK]] = {site: [] for site in self.sites}
        self._scratch = torch.empty(0, device=self.device)  # float32 copy of bf16/fp16 activations, reused

    def _site_hook(self, site: str):
        def reduce(value: Tensor, step) -> None:
            acts = value.reshape(-1, value.shape[-1])  # [tokens, n]
            f = self._fields
            if acts.dtype != torch.float32 and self._scratch.numel() < acts.numel():
                self._scratch = torch.empty(acts.numel(), dtype=torch.float32, device=acts.device)
            self._pending.setdefault(site, []).append(
                batch_stats(acts, f.doc, f.position, f.token, f.counted, self.config.top_k, self._scratch)
            )

        return reduce

    def _forward(self, batch: Batch) -> None:
        batch = batch.to(self.device)
        self._fields = _BatchFields(
            batch.doc.flatten(), batch.position.flatten(), batch.input_ids.flatten(), batch.counted.flatten()
        )
        with torch.inference_mode(), hooks(self.model, {s: self._site_hook(s) for s in self.sites}), stop_after(
            self.model, self.deepest
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
            moments = self.state[site].moments
            for candidates, piece_moments in pieces:
                moments = moments + piece_moments
                self._unmerged[site].append(candidates)
            self.state[site] = SiteAtlas(self.state[site].top, moments)
            if len(self._unmerged[site]) >= MERGE_EVERY:
                self.flush(site)
        self._pending = {}

    def flush(self, site: str | None = None) -> None:
        """Merge the waiting per-batch top-ks into the state (before a checkpoint, and at the end)."""
        for name in [site] if site else self.sites:
            if self._unmerged[name]:
                current = self.state[name]
                self.state[name] = SiteAtlas(merge_topk_fast(current.top, *self._unmerged[name]), current.moments)
                self._unmerged[name] = []


def fingerprint(model_name: str, source: SourceConfig | None, config: ProfileConfig, dtype: str) -> str:
    settings = dataclasses.asdict(config)
    settings.pop("checkpoint_every")
    payload = {"model": model_name, "source": dataclasses.asdict(source) if source else None, "profile": settings, "dtype": dtype}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _documents(source: TextSource | SourceConfig | Iterable[str] | Iterable[Document]) -> tuple[Iterable[Document], TextSource | None]:
    if isinstance(source, SourceConfig):
        source = TextSource(source)
    if isinstance(source, TextSource):
        return source, source
    docs = [d if isinstance(d, Document) else Document(i, d) for i, d in enumerate(source)]
    return [d for d in docs if d.text.strip()], None


def profile(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    source: TextSource | SourceConfig | Iterable[str],
    config: ProfileConfig = ProfileConfig(),
    *,
    out: str | Path | None = None,
    resume: bool = False,
    model_name: str | None = None,
    progress: bool = True,
) -> Atlas:
    """Profile every neuron of the configured sites over ``source`` and return the atlas (on the CPU).

    With ``out``, the atlas is saved there; with ``config.checkpoint_every`` a checkpoint is written
    every N batches, and ``resume=True`` continues from it, giving the same atlas as an
    uninterrupted run.
    """
    profiler = Profiler(model, config)
    documents, text_source = _documents(source)
    source_config = text_source.config if text_source else None
    model_name = model_name or getattr(model.config, "_name_or_path", "")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    key = fingerprint(model_name, source_config, config, dtype)
    out = check_writable(out) if out is not None else None
    if resume and out is None:
        raise ValueError("--resume needs the output directory (--out) that holds the checkpoint")
    if out is not None:
        guard_output(out, resume)

    done = 0
    if resume and out is not None and (out / CHECKPOINT).exists():
        done = _restore(profiler, out / CHECKPOINT, key)
        log.info("resuming after %d batches", done)

    count = _Counter(documents)
    batches = plan(
        count,
        tokenizer,
        max_length=config.max_length,
        overflow=config.overflow,
        exclude_bos=config.exclude_bos,
        batch_tokens=config.batch_tokens,
        sort_buffer=config.sort_buffer,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(desc=f"profiling {', '.join(profiler.sites)}", unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    tokens = padded = index = 0
    try:
        for index, rows in enumerate(batches, start=1):
            if index <= done:
                continue
            profiler.fold(rows, pad_id)
            real = sum(len(r.ids) for r in rows)
            tokens += real
            padded += len(rows) * len(rows[0].ids)
            bar.update(real)
            bar.set_postfix(docs=count.n, refresh=False)
            if out is not None and config.checkpoint_every and index % config.checkpoint_every == 0:
                _checkpoint(profiler, out / CHECKPOINT, key, index)
    finally:
        bar.close()
    profiler.flush()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started

    meta = AtlasMeta(
        model=model_name,
        dataset=source_config.dataset if source_config else "<texts>",
        split=source_config.split if source_config else "",
        text_column=source_config.text_column if source_config else "text",
        max_length=config.max_length,
        overflow=config.overflow,
        exclude_bos=config.exclude_bos,
        dtype=dtype,
        top_k=config.top_k,
        n_documents=count.n,
        skipped_empty=text_source.skipped_empty if text_source else 0,
        versions=versions(),
        extra={
            "batches": index,
            "resumed_after_batches": done,
            "seconds": round(seconds, 3),
            "tokens_this_run": tokens,
            "padding_fraction": round(1 - tokens / padded, 4) if padded else 0.0,
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
            "fingerprint": key,
        },
    )
    atlas = Atlas(meta, {site: stats.to("cpu") for site, stats in profiler.state.items()})
    nonfinite = atlas.nonfinite_total()
    meta.extra["nonfinite_activations"] = nonfinite
    if nonfinite:
        warnings.warn(
            f"{nonfinite} activations were inf/nan ({dtype} overflow?) and were left out of the atlas; "
            "profile in bfloat16 or float32",
            RuntimeWarning,
            stacklevel=2,
        )
    if out is not None:
        atlas.save(out)
        (out / CHECKPOINT).unlink(missing_ok=True)
    return atlas


def guard_output(out: Path, resume: bool) -> None:
    """Never overwrite finished or interrupted work in ``out`` without being told to."""
    from .atlas import ATLAS_TENSORS

    if (out / ATLAS_TENSORS).exists():
        raise FileExistsError(f"{out} already holds an atlas; load it with Atlas.load, or pick another --out (or delete it)")
    if (out / CHECKPOINT).exists() and not resume:
        raise FileExistsError(
            f"{out} holds the checkpoint of an interrupted run: pass --resume to continue it, or delete "
            f"{CHECKPOINT} to start over"
        )


class _Counter:
    """Counts documents as the batch planner pulls them."""

    def __init__(self, documents: Iterable[Document]) -> None:
        self.documents = documents
        self.n = 0

    def __iter__(self) -> Iterator[Document]:
        for document in self.documents:
            self.n += 1
            yield document


def _checkpoint(profiler: Profiler, path: Path, key: str, batches: int) -> None:
    profiler.flush()
    partial = Atlas(AtlasMeta(model="", dataset="", split="", top_k=profiler.config.top_k), profiler.state)
    # the cursor lives inside the same file as the tensors: one rename makes both durable
    partial.write(path, {"batches_done": str(batches), "fingerprint": key})


def _restore(profiler: Profiler, path: Path, key: str) -> int:
    atlas, metadata = Atlas.load_with_metadata(path, device=profiler.device)
    if metadata.get("fingerprint") != key:
        raise AtlasError(
            f"the checkpoint in {path.parent} was made with other settings (model, data or profile options); "
            "resume with the same options, or use a new --out"
        )
    profiler.state = dict(atlas.sites)
    return int(metadata["batches_done"])
