"""Run a profile: read the source, plan batches, fold them, checkpoint, resume, save the atlas."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from patchscope.util.storage import check_writable
from patchscope.util.versions import versions
from patchscope.atlas.atlas import Atlas, AtlasError, AtlasMeta
from patchscope.atlas.batching import plan
from patchscope.atlas.config import ProfileConfig
from patchscope.atlas.engine import Profiler
from patchscope.atlas.quantiles import add_quantile_examples
from patchscope.atlas.sources import Document, SourceConfig, TextSource
from patchscope.atlas.store import ATLAS_TENSORS, load_atlas_with_metadata, save_atlas, write_atlas

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.safetensors"


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
        raise ValueError("`resume` needs the output directory (`out`) that holds the checkpoint")
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
    if config.quantile_examples:  # the optional second pass, cut from this pass's maxima
        atlas = add_quantile_examples(model, tokenizer, documents, atlas, config)
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
        save_atlas(atlas, out)
        (out / CHECKPOINT).unlink(missing_ok=True)
    return atlas


def guard_output(out: Path, resume: bool) -> None:
    """Never overwrite finished or interrupted work in ``out`` without being told to."""
    if (out / ATLAS_TENSORS).exists():
        raise FileExistsError(f"{out} already holds an atlas; load it with load_atlas, or pick another `out` (or delete it)")
    if (out / CHECKPOINT).exists() and not resume:
        raise FileExistsError(
            f"{out} holds the checkpoint of an interrupted run: pass `resume` to continue it, or delete "
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
    write_atlas(partial, path, {"batches_done": str(batches), "fingerprint": key})


def _restore(profiler: Profiler, path: Path, key: str) -> int:
    atlas, metadata = load_atlas_with_metadata(path, device=profiler.device)
    if metadata.get("fingerprint") != key:
        raise AtlasError(
            f"the checkpoint in {path.parent} was made with other settings (model, data or profile options); "
            "resume with the same options, or use a new `out`"
        )
    profiler.state = dict(atlas.sites)
    return int(metadata["batches_done"])
