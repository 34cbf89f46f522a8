"""Run a profile: ask the folder what to do, read the source, fold batches, checkpoint, save the atlas.

profile()  ->  _prepare (key, world, documents)  ->  AtlasFolder.plan  ->  FINISH: commit
                                                                       ->  FRESH / RESUME: _fold_all -> _conclude
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas import distributed
from patchscope.atlas.atlas import Atlas, AtlasMeta, Provenance
from patchscope.atlas.batching import adds_bos
from patchscope.atlas.corpora import builtin_version
from patchscope.atlas.engine import Profiler
from patchscope.atlas.exports import write_exports
from patchscope.atlas.feature_site import FeatureSite
from patchscope.atlas.folder import Action, AtlasFolder, Cursor, Plan, Policy, rank_zero_lock
from patchscope.atlas.key import Inputs, RunKey
from patchscope.atlas.prefetch import prefetch
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.progress import Progress
from patchscope.atlas.quantile_pass import add_quantile_examples
from patchscope.atlas.sources import Document, SourceConfig, TextSource, count_documents
from patchscope.atlas.store import save_atlas
from patchscope.model.sites import n_layers
from patchscope.util.heap import steady_heap
from patchscope.util.signals import Interrupted, InterruptFlag
from patchscope.util.storage import check_writable, remove_stale_temp_files
from patchscope.util.versions import versions

log = logging.getLogger(__name__)


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
    features: Sequence[FeatureSite] = (),
) -> Atlas:
    """Profile every neuron of the configured sites over ``source`` and return the atlas (on the CPU).

    With ``out``, the atlas is saved there; with ``config.checkpoint_every`` a checkpoint is written
    every N batches, and ``resume=True`` continues from it, giving the same atlas as an
    uninterrupted run.

    ``exports`` names formats of `patchscope.atlas.exports.EXPORTS` to write
    beside the atlas before it is committed (``atlas.json`` comes last).

    With ``out`` the folder is locked for the run (a second run on it is refused), and what the run
    may do with what it holds is `patchscope.atlas.folder.AtlasFolder`'s decision: a changed data
    file or model folder is refused on resume, and a run killed after saving its tensors is finished
    instead of refused. SIGINT/SIGTERM finish the current batch, write a checkpoint and raise
    `patchscope.util.signals.Interrupted`.

    Args:
        model: a HF causal LM of a supported family (see `load_model`).
        tokenizer: its tokenizer.
        source: a `TextSource`, a `SourceConfig`, or an iterable of texts (indexed 0, 1, ...).
        config: sites, top-k, truncation and batching (`ProfileConfig`).
        out: folder for the atlas and its checkpoints (nothing is written when None).
        resume: continue from the checkpoint in ``out``.
        model_name: recorded in the atlas metadata (default: the model's ``name_or_path``).
        progress: show a progress bar.
        exports: export formats written beside the atlas.
        features: SAE features profiled as sites of their own in the same pass (`patchscope.sae.features.feature_site`).

    Returns:
        The `Atlas`: per site, the top-k examples of every neuron and its moments.

    Example:
        >>> atlas = profile(model, tokenizer, ["first text", "second text"], ProfileConfig(layer=6))
        >>> atlas.top_neurons("blocks.6.mlp.hook_post", 5)
    """
    config = config.for_model(n_layers(model)).capped_for(count_documents(source))
    if out is None and resume:
        raise ValueError("`resume` needs the output directory (`out`) that holds the checkpoint")
    run = _prepare(model, tokenizer, source, config, model_name, features)
    if out is None:
        return _profile_into(run, None, Plan(Action.FRESH, run.key), progress, exports)
    out = check_writable(out)
    with rank_zero_lock(out):
        for stale in remove_stale_temp_files(out):
            log.info("removed %s, left by a killed write", stale.name)
        folder = AtlasFolder(out, run.world)
        return _profile_into(run, folder, folder.plan(run.key, Policy(resume=resume)), progress, exports)


@dataclass
class _Run:
    """One call of `profile`: its model, what it reads, its key and its place in a torchrun world."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    config: ProfileConfig
    profiler: Profiler
    documents: Iterable[Document]
    text_source: TextSource | None
    key: RunKey
    world: distributed.World


def _prepare(model, tokenizer, source, config: ProfileConfig, model_name: str | None, features=()) -> _Run:
    profiler = Profiler(model, config, features)
    documents, text_source = _documents(source)
    source_config = text_source.config if text_source else None
    model_name = model_name or str(getattr(model.config, "_name_or_path", ""))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    key = RunKey.of(model_name, source_config, config, dtype, Inputs.of(model_name, source_config, model), features)
    world = distributed.join(profiler.device)  # torchrun's world; one process without it
    if config.quantile_examples and world.size > 1:
        raise ValueError(
            "`quantile_examples` needs the maxima of the whole corpus before its second pass; run it in one process, "
            "or profile the shards and add the examples to the merged atlas"
        )
    return _Run(model, tokenizer, config, profiler, documents, text_source, key, world)


def _documents(
    source: TextSource | SourceConfig | Iterable[str] | Iterable[Document],
) -> tuple[Iterable[Document], TextSource | None]:
    if isinstance(source, SourceConfig):
        source = TextSource(source)
    if isinstance(source, TextSource):
        return source, source
    docs = [d if isinstance(d, Document) else Document(i, cast(str, d)) for i, d in enumerate(source)]
    return [d for d in docs if d.text.strip()], None


def _profile_into(run: _Run, folder: AtlasFolder | None, plan: Plan, progress: bool, exports: tuple[str, ...]) -> Atlas:
    """Carry the folder's plan out: finish saved tensors, or fold the batches (from the checkpoint on a resume)."""
    before_commit = lambda saved: _before_commit(saved, folder, run, exports)  # noqa: E731
    if folder is not None and plan.action is Action.FINISH:
        log.info("finishing the atlas in %s: a previous run stopped before its exports", folder.path)
        return folder.finish(run.key, before_commit)
    cursor = Cursor(0, 0, run.key.fingerprint, run.key.inputs)
    if folder is not None and plan.action is Action.RESUME:
        run.profiler.state, cursor = folder.read_checkpoint(run.key, run.profiler.device)
        folder.reopen()  # a run paused by its `max_tokens` budget continues: its saved atlas is no longer the end
        log.info("resuming after %d batches (%d documents)", cursor.batches_done, cursor.documents_done)
        if progress:
            print(f"resuming after {cursor.batches_done} batches ({cursor.documents_done} documents)", file=sys.stderr)
    with steady_heap(run.profiler.device.type == "cpu"):  # large tensors reused, not mapped afresh (util/heap.py)
        loop = _fold_all(run, folder, cursor, progress)
    atlas = _conclude(run, folder, loop)
    if folder is not None and run.world.is_main:
        save_atlas(atlas, folder.path, before_commit=before_commit)
    if loop.paused and progress:
        print(
            f"paused at the `max_tokens` budget after {loop.tokens_done} counted tokens ({loop.batches} batches)"
            + (": resume with a larger budget, or none, to continue" if folder is not None else ""),
            file=sys.stderr,
        )
    distributed.finish(run.world, folder.checkpoint if folder is not None and not loop.paused else None)
    return atlas


@dataclass
class _Loop:
    """What the batch loop did in this process."""

    restored: Cursor
    batches: int = 0
    documents: int = 0
    tokens: int = 0
    padded: int = 0
    seconds: float = 0.0
    n_documents: int = 0
    tokens_done: int = 0
    """Counted tokens folded, restored ones included (what `max_tokens` counts)."""
    paused: bool = False
    """The `max_tokens` budget ran out before the data did."""


def _fold_all(run: _Run, folder: AtlasFolder | None, restored: Cursor, progress: bool) -> _Loop:
    """Fold every batch of this rank's share, skipping those a checkpoint already holds."""
    config = run.config
    loop = _Loop(restored, restored.batches_done, restored.documents_done, tokens_done=restored.tokens_done)
    count = _Counter(distributed.shard(run.documents, config.sort_buffer, run.world))  # this rank's blocks
    batches = prefetch(config.plan(count, run.tokenizer))  # tokenized in a background thread, overlapping the forward
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    bar = Progress(
        _bar_title(run.profiler.sites),
        n_documents=count_documents(run.text_source or run.documents) if run.world.size == 1 else None,
        max_tokens=config.max_tokens,
        tokens_done=restored.tokens_done,
        documents_done=restored.documents_done,
        enabled=progress,
    )
    started, stop = time.perf_counter(), InterruptFlag()
    try:
        stop.install()  # SIGINT/SIGTERM: finish this batch, checkpoint, raise `Interrupted`
        for index, rows in enumerate(batches, start=1):
            if index <= restored.batches_done:
                continue
            if config.max_tokens is not None and loop.tokens_done >= config.max_tokens:
                loop.paused = True  # the budget is spent, the data is not: checkpoint where this batch would start
                break
            run.profiler.fold(rows, pad_id)
            real = sum(len(r.ids) for r in rows)
            loop.batches, loop.tokens, loop.padded = index, loop.tokens + real, loop.padded + len(rows) * len(rows[0].ids)
            begun = sum(1 for r in rows if r.offset == 0)  # each document has one segment at offset 0
            counted = sum(len(r.ids) - r.first_counted for r in rows)
            loop.documents, loop.tokens_done = loop.documents + begun, loop.tokens_done + counted
            bar.update(counted, begun, count.n)
            if folder is not None and ((config.checkpoint_every and index % config.checkpoint_every == 0) or stop):
                _checkpoint(run, folder, loop)
            if stop:
                where = f" after {index} batches ({loop.documents} documents)"
                raise Interrupted(cast(int, stop.signum), folder.checkpoint if folder else None, where)  # set when `stop` is true
    finally:
        stop.restore()
        bar.close()
        cast(Generator, batches).close()  # stops the tokenizing thread when the budget ends the loop early
    run.profiler.flush()
    if loop.paused and folder is not None:
        _checkpoint(run, folder, loop)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    loop.seconds, loop.n_documents = time.perf_counter() - started, loop.documents if loop.paused else count.n
    return loop


def _checkpoint(run: _Run, folder: AtlasFolder, loop: _Loop) -> None:
    run.profiler.flush()
    cursor = Cursor(loop.batches, loop.documents, run.key.fingerprint, run.key.inputs, loop.tokens_done)
    folder.write_checkpoint(run.profiler.state, run.config.top_k, cursor)


def _conclude(run: _Run, folder: AtlasFolder | None, loop: _Loop) -> Atlas:
    """The finished atlas: this rank's state, merged with the other ranks', with its quantile pass."""
    atlas = Atlas(_meta(run, loop), {site: stats.to("cpu") for site, stats in run.profiler.state.items()})
    if run.world.size > 1:  # keep this rank's finished share, meet the others, merge (atlas/distributed.py)
        if folder is not None:
            _checkpoint(run, folder, loop)
        distributed.meet(run.world)
        atlas = distributed.merge_ranks(atlas, run.world)
    if run.config.quantile_examples:  # the optional second pass, cut from this pass's maxima
        features = list(run.profiler.features.values())
        atlas = add_quantile_examples(run.model, run.tokenizer, run.documents, atlas, run.config, features)
    nonfinite = atlas.nonfinite_total()
    atlas.meta.provenance.nonfinite_activations = nonfinite
    if nonfinite:
        warnings.warn(
            f"{nonfinite} activations were inf/nan ({atlas.meta.dtype} overflow?) and were left out of the atlas; "
            "profile in bfloat16 or float32",
            RuntimeWarning,
            stacklevel=4,
        )
    return atlas


def _meta(run: _Run, loop: _Loop) -> AtlasMeta:
    source, config, text_source = run.text_source.config if run.text_source else None, run.config, run.text_source
    return AtlasMeta(
        model=run.key.names[0],
        source=dataclasses.replace(source, split=source.resolved_split) if source else None,
        max_length=config.max_length,
        overflow=config.overflow,
        exclude_bos=config.exclude_bos,
        dtype=dict(run.key.reading)["dtype"],  # type: ignore[arg-type]
        top_k=config.top_k,
        n_documents=loop.n_documents,
        skipped_empty=text_source.skipped_empty if text_source else 0,
        versions=versions(),
        has_bos=adds_bos(run.tokenizer),
        model_type=str(getattr(getattr(run.model, "config", None), "model_type", "") or ""),
        dataset_version=builtin_version(source.dataset) if source else "",
        fingerprint=run.key.fingerprint,
        inputs=run.key.inputs,
        rows_read=text_source.rows_read if text_source else None,
        paused_at_tokens=loop.tokens_done if loop.paused else None,
        features=dict(run.key.features),
        provenance=Provenance(
            batches=loop.batches,
            resumed_after_batches=loop.restored.batches_done,
            seconds=round(loop.seconds, 3),
            tokens_this_run=loop.tokens,
            padding_fraction=round(1 - loop.tokens / loop.padded, 4) if loop.padded else 0.0,
            tokens_per_second=round(loop.tokens / loop.seconds, 1) if loop.seconds > 0 else None,
        ),
    )


def _before_commit(atlas: Atlas, folder: AtlasFolder | None, run: _Run, exports: tuple[str, ...]) -> None:
    """Between the tensors and ``atlas.json``: the exports; the checkpoint is no longer needed."""
    if folder is None:
        return
    if exports:
        if run.text_source is not None:
            texts = run.text_source.fetch(atlas.documents())
        else:
            texts = {d.index: d.text for d in run.documents}
        write_exports(atlas, folder.path, texts, run.tokenizer, exports)
    if atlas.meta.paused_at_tokens is None:  # a paused atlas keeps the checkpoint that continues it
        folder.drop_checkpoint()


def _bar_title(sites: tuple[str, ...]) -> str:
    shown = ", ".join(sites) if len(sites) <= 3 else f"{len(sites)} sites ({sites[0]} .. {sites[-1]})"
    return f"profiling {shown}"


class _Counter:
    """Counts documents as the batch planner pulls them."""

    def __init__(self, documents: Iterable[Document]) -> None:
        self.documents = documents
        self.n = 0

    def __iter__(self) -> Iterator[Document]:
        for document in self.documents:
            self.n += 1
            yield document
