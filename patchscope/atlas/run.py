"""Run a profile: read the source, plan batches, fold them, checkpoint, resume, save the atlas."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from patchscope.atlas import distributed
from patchscope.atlas.atlas import Atlas, AtlasError, AtlasMeta
from patchscope.atlas.batching import adds_bos, plan
from patchscope.atlas.config import ProfileConfig
from patchscope.atlas.corpora import builtin_version
from patchscope.atlas.engine import Profiler
from patchscope.atlas.exports import write_exports
from patchscope.atlas.prefetch import prefetch
from patchscope.atlas.quantiles import add_quantile_examples
from patchscope.atlas.sources import Document, SourceConfig, TextSource, count_documents
from patchscope.atlas.store import (
    ATLAS_JSON,
    ATLAS_TENSORS,
    METADATA_KEY,
    commit_atlas,
    is_committed,
    load_atlas_with_metadata,
    save_atlas,
    write_atlas,
)
from patchscope.util.identity import Identity, compare, path_identity
from patchscope.util.lock import output_lock
from patchscope.util.signals import Interrupted, InterruptFlag
from patchscope.util.storage import check_writable, remove_stale_temp_files
from patchscope.util.versions import versions

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.safetensors"


def fingerprint(model_name: str, source: SourceConfig | None, config: ProfileConfig, dtype: str) -> str:
    settings = dataclasses.asdict(config)
    settings.pop("checkpoint_every")
    payload = {"model": model_name, "source": dataclasses.asdict(source) if source else None, "profile": settings, "dtype": dtype}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_identity(model_name: str, source: SourceConfig | None, model: nn.Module | None = None) -> dict[str, Identity | None]:
    """What the model and the data *are* (not just where): see `patchscope.util.identity`."""
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    return {
        "model": path_identity(model_name, "model", commit) if model_name else None,
        "data": path_identity(source.dataset, "dataset") if source is not None else None,
    }


def identity_changes(
    recorded: dict[str, Identity | None] | None, current: dict[str, Identity | None], model_name: str, dataset: str
) -> list[str]:
    """What changed in the inputs since ``recorded`` was taken, in words."""
    recorded = recorded or {}
    return compare(f"the model {model_name}", recorded.get("model"), current.get("model")) + compare(
        f"the data {dataset}", recorded.get("data"), current.get("data")
    )


def _documents(
    source: TextSource | SourceConfig | Iterable[str] | Iterable[Document],
) -> tuple[Iterable[Document], TextSource | None]:
    if isinstance(source, SourceConfig):
        source = TextSource(source)
    if isinstance(source, TextSource):
        return source, source
    docs = [d if isinstance(d, Document) else Document(i, cast(str, d)) for i, d in enumerate(source)]
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
    exports: tuple[str, ...] = (),
) -> Atlas:
    """Profile every neuron of the configured sites over ``source`` and return the atlas (on the CPU).

    With ``out``, the atlas is saved there; with ``config.checkpoint_every`` a checkpoint is written
    every N batches, and ``resume=True`` continues from it, giving the same atlas as an
    uninterrupted run.

    ``exports`` names formats of `patchscope.atlas.exports.EXPORTS` to write
    beside the atlas before it is committed (``atlas.json`` comes last).

    With ``out`` the folder is locked for the run (a second run on it is refused), checked against
    the inputs' content (a changed data file or model folder is refused on resume), and a run
    killed after saving its tensors is finished instead of refused. SIGINT/SIGTERM finish the
    current batch, write a checkpoint and raise `patchscope.util.signals.Interrupted`.

    Args:
        model: a HF causal LM of a supported family (see `load_model`).
        tokenizer: its tokenizer.
        source: a `TextSource`, a `SourceConfig`, or an iterable of texts (indexed 0, 1, ...).
        config: sites, top-k, truncation and batching (`ProfileConfig`).
        out: folder for the atlas and its checkpoints (nothing is written when None).
        resume: continue from the checkpoint in ``out``.
        model_name: recorded in the atlas metadata (default: the model's ``name_or_path``).
        progress: show a progress bar.

    Returns:
        The `Atlas`: per site, the top-k examples of every neuron and its moments.

    Example:
        >>> atlas = profile(model, tokenizer, ["first text", "second text"], ProfileConfig(layer=6))
        >>> atlas.top_neurons("blocks.6.mlp.hook_post", 5)
    """
    config = config.capped_for(count_documents(source))
    if out is None:
        if resume:
            raise ValueError("`resume` needs the output directory (`out`) that holds the checkpoint")
        return _profile(model, tokenizer, source, config, None, False, model_name, progress, exports)
    out = check_writable(out)
    with _rank_zero_lock(out):
        for stale in remove_stale_temp_files(out):
            log.info("removed %s, left by a killed write", stale.name)
        return _profile(model, tokenizer, source, config, out, resume, model_name, progress, exports)


def _profile(model, tokenizer, source, config, out: Path | None, resume: bool, model_name, progress: bool, exports) -> Atlas:
    profiler = Profiler(model, config)
    documents, text_source = _documents(source)
    source_config = text_source.config if text_source else None
    model_name = model_name or getattr(model.config, "_name_or_path", "")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    key = fingerprint(model_name, source_config, config, dtype)
    identity = run_identity(model_name, source_config, model)
    dataset = source_config.dataset if source_config else "<texts>"
    world = distributed.join(profiler.device)  # torchrun's world; one process without it
    checkpoint = out / distributed.checkpoint_name(world) if out is not None else None
    if config.quantile_examples and world.size > 1:
        raise ValueError(
            "`quantile_examples` needs the maxima of the whole corpus before its second pass; run it in one process, "
            "or profile the shards and add the examples to the merged atlas"
        )
    if out is not None:
        if (out / ATLAS_TENSORS).exists() and not is_committed(out):  # killed after its tensors were saved
            return _finish(
                out,
                key,
                identity,
                model_name,
                dataset,
                lambda saved: _before_commit(saved, out, documents, text_source, tokenizer, exports),
            )
        guard_output(out, resume)
        distributed.check_checkpoints(out, world, resume)

    done = documents_done = 0
    if resume and checkpoint is not None and checkpoint.exists():
        done, documents_done = _restore(profiler, checkpoint, key, identity, model_name, dataset)
        log.info("resuming after %d batches (%d documents)", done, documents_done)
        if progress:
            print(f"resuming after {done} batches ({documents_done} documents)", file=sys.stderr)

    count = _Counter(distributed.shard(documents, config.sort_buffer, world))  # this rank's blocks
    batches = prefetch(
        plan(  # tokenized in a background thread, overlapping the forward
            count,
            tokenizer,
            max_length=config.max_length,
            overflow=config.overflow,
            exclude_bos=config.exclude_bos,
            batch_tokens=config.batch_tokens,
            sort_buffer=config.sort_buffer,
        )
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(
        desc=f"profiling {', '.join(profiler.sites)}", unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True
    )
    started = time.perf_counter()
    tokens = padded = index = 0
    stop = InterruptFlag()
    try:
        stop.install()  # SIGINT/SIGTERM: finish this batch, checkpoint, raise `Interrupted`
        for index, rows in enumerate(batches, start=1):
            if index <= done:
                continue
            profiler.fold(rows, pad_id)
            real = sum(len(r.ids) for r in rows)
            tokens += real
            padded += len(rows) * len(rows[0].ids)
            documents_done += sum(1 for r in rows if r.offset == 0)  # each document has one segment at offset 0
            bar.update(real)
            bar.set_postfix(docs=count.n, refresh=False)
            if checkpoint is not None and ((config.checkpoint_every and index % config.checkpoint_every == 0) or stop):
                _checkpoint(profiler, checkpoint, key, index, identity, documents_done)
            if stop:
                where = f" after {index} batches ({documents_done} documents)"
                raise Interrupted(cast(int, stop.signum), checkpoint, where)  # set when `stop` is true
    finally:
        stop.restore()
        bar.close()
    profiler.flush()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started

    meta = AtlasMeta(
        model=model_name,
        dataset=source_config.dataset if source_config else "<texts>",
        split=source_config.resolved_split if source_config else "",
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
            "identity": identity,
            "source": dataclasses.asdict(source_config) if source_config else None,
            "rows_read": list(text_source.rows_read) if text_source and text_source.rows_read else None,
        },
        has_bos=adds_bos(tokenizer),
        dataset_version=builtin_version(source_config.dataset) if source_config else "",
    )
    atlas = Atlas(meta, {site: stats.to("cpu") for site, stats in profiler.state.items()})
    if world.size > 1:  # keep this rank's finished share, meet the others, merge (atlas/distributed.py)
        if checkpoint is not None:
            _checkpoint(profiler, checkpoint, key, index, identity, documents_done)
        distributed.meet(world)
        atlas = distributed.merge_ranks(atlas, world)
    if config.quantile_examples:  # the optional second pass, cut from this pass's maxima
        atlas = add_quantile_examples(model, tokenizer, documents, atlas, config)
    nonfinite = atlas.nonfinite_total()
    atlas.meta.extra["nonfinite_activations"] = nonfinite
    if nonfinite:
        warnings.warn(
            f"{nonfinite} activations were inf/nan ({dtype} overflow?) and were left out of the atlas; "
            "profile in bfloat16 or float32",
            RuntimeWarning,
            stacklevel=2,
        )
    if out is not None and world.is_main:
        save_atlas(atlas, out, before_commit=lambda saved: _before_commit(saved, out, documents, text_source, tokenizer, exports))
    distributed.finish(world, checkpoint)
    return atlas


def _before_commit(
    atlas: Atlas, out: Path, documents, text_source: TextSource | None, tokenizer, exports: tuple[str, ...]
) -> None:
    """Between the tensors and ``atlas.json``: the exports; the checkpoint is no longer needed."""
    if exports:
        texts = text_source.fetch(atlas.documents()) if text_source is not None else {d.index: d.text for d in documents}
        write_exports(atlas, out, texts, tokenizer, exports)
    (out / CHECKPOINT).unlink(missing_ok=True)


def _finish(out: Path, key: str, identity: dict, model_name: str, dataset: str, before_commit) -> Atlas:
    """A run was killed after saving its tensors: check they are this run's, then exports and commit."""
    atlas, _ = load_atlas_with_metadata(out)
    changes = identity_changes(atlas.meta.extra.get("identity"), identity, model_name, dataset)
    if atlas.meta.extra.get("fingerprint") != key or changes:
        raise AtlasError(
            f"{out} holds an unfinished atlas (no {ATLAS_JSON}) made with other "
            f"{'inputs: ' + '; '.join(changes) if changes else 'settings'}; use another `out`, or delete it to profile again"
        )
    log.info("finishing the atlas in %s: a previous run stopped before its exports", out)
    return commit_atlas(out, before_commit=before_commit)


def _rank_zero_lock(out: Path):
    """The output lock, held by rank 0 alone: the ranks of one torchrun job share ``out``."""
    return output_lock(out) if distributed.detect().rank == 0 else contextlib.nullcontext(out)


def guard_output(out: Path, resume: bool) -> None:
    """Never overwrite finished or interrupted work in ``out`` without being told to.

    An atlas without its ``atlas.json`` is a run killed while finishing; `profile` completes it.
    """
    if (out / ATLAS_TENSORS).exists() and is_committed(out):
        raise FileExistsError(f"{out} already holds an atlas; load it with load_atlas, or pick another `out` (or delete it)")
    if (out / CHECKPOINT).exists() and not resume and not (out / ATLAS_TENSORS).exists():
        raise FileExistsError(
            f"{out} holds the checkpoint of an interrupted run: pass `resume` to continue it, or delete "
            f"{CHECKPOINT} to start over"
        )


def check_before_loading(out: Path, resume: bool, model_name: str, source: TextSource, config: ProfileConfig, dtype: str) -> None:
    """What `profile` would refuse, found before the model loads: unreadable or empty data, and
    finished, interrupted or unfinished work in ``out`` that this run may not touch."""
    check_source(source)
    if out.is_dir():
        with _rank_zero_lock(out):  # a live run on `out` is named as such, not taken for an interrupted one
            pass
    guard_output(out, resume)
    checkpoint = out / CHECKPOINT
    unfinished = (out / ATLAS_TENSORS).exists() and not is_committed(out)
    if not unfinished and not (resume and checkpoint.exists()):
        return
    key = fingerprint(model_name, source.config, config, dtype)
    identity = run_identity(model_name, source.config)
    if unfinished:
        try:
            _, metadata = load_atlas_with_metadata(out)
        except AtlasError as error:
            raise AtlasError(f"{error}. Delete {out / ATLAS_TENSORS} to profile again") from error
        recorded = json.loads(metadata[METADATA_KEY]).get("extra", {})
        problems = identity_changes(recorded.get("identity"), identity, model_name, source.config.dataset)
        if recorded.get("fingerprint") != key or problems:
            raise AtlasError(
                f"{out} holds an unfinished atlas (no {ATLAS_JSON}) made with other "
                f"{'inputs: ' + '; '.join(problems) if problems else 'settings'}; use another `out`, or delete it to profile again"
            )
        return
    try:
        with safe_open(str(checkpoint), framework="pt") as handle:
            cursor = handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 - safetensors raises several types on bad bytes
        raise AtlasError(
            f"the checkpoint {checkpoint} cannot be read ({type(error).__name__}: {error}); it was cut short. Delete it "
            "and run the same command without `resume` to start over"
        ) from error
    _check_cursor(cursor, checkpoint, key, identity, model_name, source.config.dataset)


def check_source(source: TextSource) -> None:
    """Read the source up to its first document, so a missing column, an unreadable file or an
    empty selection is reported before any model loads."""
    for _ in source:
        return


class _Counter:
    """Counts documents as the batch planner pulls them."""

    def __init__(self, documents: Iterable[Document]) -> None:
        self.documents = documents
        self.n = 0

    def __iter__(self) -> Iterator[Document]:
        for document in self.documents:
            self.n += 1
            yield document


def _checkpoint(profiler: Profiler, path: Path, key: str, batches: int, identity: dict | None = None, documents: int = 0) -> None:
    profiler.flush()
    partial = Atlas(AtlasMeta(model="", dataset="", split="", top_k=profiler.config.top_k), profiler.state)
    # the cursor lives inside the same file as the tensors: one rename makes both durable
    cursor = {
        "batches_done": str(batches),
        "documents_done": str(documents),
        "fingerprint": key,
        "identity": json.dumps(identity),
    }
    write_atlas(partial, path, cursor)


def _restore(
    profiler: Profiler, path: Path, key: str, identity: dict | None = None, model_name: str = "", dataset: str = ""
) -> tuple[int, int]:
    """Load a checkpoint into ``profiler``; returns (batches, documents) already done."""
    try:
        atlas, metadata = load_atlas_with_metadata(path, device=profiler.device)
    except AtlasError as error:
        raise AtlasError(
            f"the checkpoint {path} cannot be used ({error}). Delete {path} and run the same command without "
            "`resume` to start over"
        ) from error
    _check_cursor(metadata, path, key, identity, model_name, dataset)
    profiler.state = dict(atlas.sites)
    return int(metadata["batches_done"]), int(metadata.get("documents_done", 0))


def _check_cursor(metadata: dict[str, str], path: Path, key: str, identity: dict | None, model_name: str, dataset: str) -> None:
    """A checkpoint continues only the run that wrote it: same settings, same model and data content."""
    if metadata.get("fingerprint") != key:
        raise AtlasError(
            f"the checkpoint in {path.parent} was made with other settings (model, data or profile options); "
            "resume with the same options, or use a new `out`"
        )
    recorded = json.loads(metadata.get("identity", "null"))
    changes = identity_changes(recorded, identity or {}, model_name, dataset)
    if changes:
        raise AtlasError(
            f"the checkpoint in {path.parent} was made from other inputs: {'; '.join(changes)}. Resuming would mix "
            f"old and new data: delete {path} to start over, or use a new `out`"
        )
