"""One owner of an atlas folder: what a run may do with it, decided before any model loads.

A folder holds at most one run's work, in one of four states, and this module alone decides what a
new run may do with each (every caller, `profile`, ``patchscope run``, ``export`` and ``merge``, asks it):

    state of the folder                         plan            when the run's `RunKey` ...
    empty, or no atlas files                    FRESH
    checkpoint*.safetensors                     RESUME          has the checkpoint's fingerprint and inputs
    atlas + atlas.json + checkpoint             RESUME          as above: a run paused by its `max_tokens` budget
    atlas.safetensors without atlas.json        FINISH          has the atlas's fingerprint and inputs
    atlas.safetensors + atlas.json              REUSE           reads the same (`RunKey.reuse_changes`)

Anything else is refused with the reason and what to do (`FolderRefused`). `AtlasFolder.plan` reads
only metadata; carrying the plan out is the caller's step: `load` for REUSE, and for the rest the
profiling loop, which restores (`read_checkpoint`), saves (`write_checkpoint`) and commits (`finish`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from safetensors import safe_open

from patchscope.atlas import distributed
from patchscope.atlas.atlas import Atlas, AtlasError, AtlasMeta, SiteAtlas
from patchscope.atlas.exports import write_exports
from patchscope.atlas.feature_site import FeatureSite
from patchscope.atlas.key import Inputs, RunKey
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.sources import TextSource, count_documents
from patchscope.atlas.store import (
    ATLAS_JSON,
    ATLAS_TENSORS,
    commit_atlas,
    is_committed,
    load_atlas,
    load_atlas_with_metadata,
    read_header,
    write_atlas,
)
from patchscope.model.loading import load_tokenizer
from patchscope.util.lock import output_lock

CHECKPOINT = f"{distributed.CHECKPOINT_STEM}.safetensors"


class FolderRefused(FileExistsError):
    """The folder holds work this run may not touch; the message says why and what to do."""


class Action(Enum):
    FRESH = "fresh"
    """Nothing to keep: profile from the start."""
    RESUME = "resume"
    """Continue the checkpoint of this same run."""
    FINISH = "finish"
    """This run's tensors are saved; write the exports, then ``atlas.json``."""
    REUSE = "reuse"
    """A finished atlas that serves this run as it is."""


@dataclass(frozen=True)
class Policy:
    """What the caller allows."""

    resume: bool = False
    """Continue a checkpoint of the same run (else a checkpoint is refused)."""
    reuse: bool = False
    """Let a finished atlas of the same reading serve the run (else it is refused)."""
    sites: tuple[str, ...] = ()
    """Sites a reused atlas must hold."""
    optional_sites: tuple[str, ...] = ()
    """Sites a reused atlas may lack (the caller computes what it needs of them)."""


@dataclass(frozen=True)
class Cursor:
    """Where a checkpoint stands, stored in the checkpoint file itself: one rename makes both durable."""

    batches_done: int
    documents_done: int
    fingerprint: str
    inputs: Inputs
    tokens_done: int = 0
    """Counted tokens folded so far (what a `max_tokens` budget counts)."""

    def to_metadata(self) -> dict[str, str]:
        return {
            "batches_done": str(self.batches_done),
            "documents_done": str(self.documents_done),
            "tokens_done": str(self.tokens_done),
            "fingerprint": self.fingerprint,
            "identity": json.dumps(self.inputs.to_json()),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Cursor:
        return cls(
            int(metadata.get("batches_done", 0)),
            int(metadata.get("documents_done", 0)),
            metadata.get("fingerprint", ""),
            Inputs.from_json(json.loads(metadata.get("identity", "null"))),
            int(metadata.get("tokens_done", 0)),
        )


@dataclass(frozen=True)
class Plan:
    """What a run will do with its folder, and the key it was decided for."""

    action: Action
    key: RunKey
    cursor: Cursor | None = None
    """The checkpoint's cursor, for RESUME."""
    missing_sites: tuple[str, ...] = ()
    """Optional sites a reused atlas lacks."""


class AtlasFolder:
    """The output folder of one profiling run (``checkpoint*.safetensors``, ``atlas.safetensors``, exports, ``atlas.json``)."""

    def __init__(self, path: str | Path, world: distributed.World | None = None) -> None:
        self.path = Path(path)
        self.world = world or distributed.World(0, 1)
        self.tensors = self.path / ATLAS_TENSORS
        self.checkpoint = self.path / distributed.checkpoint_name(self.world)

    @property
    def finished(self) -> bool:
        return self.tensors.exists() and is_committed(self.path)

    @property
    def unfinished(self) -> bool:
        """Tensors saved, ``atlas.json`` not: a run killed while writing its exports."""
        return self.tensors.exists() and not is_committed(self.path)

    def plan(self, key: RunKey, policy: Policy = Policy()) -> Plan:
        """Decide, from the files' metadata alone, what a run of ``key`` may do here; refuse the rest."""
        self._wait_for_no_live_run()
        if self.finished and self.checkpoint.exists():
            return self._plan_paused(key, policy)
        if self.finished:
            return self._plan_reuse(key, policy)
        if self.unfinished:
            try:
                meta, _ = read_header(self.tensors)
            except AtlasError as error:
                raise AtlasError(f"{error}. Delete {self.tensors} to profile again") from error
            self._check_same_run(key, meta, "an unfinished atlas (no atlas.json)")
            return Plan(Action.FINISH, key)
        distributed.check_checkpoints(self.path, self.world, policy.resume)
        if not self.checkpoint.exists():
            return Plan(Action.FRESH, key)
        if not policy.resume:
            raise FolderRefused(
                f"{self.path} holds the checkpoint of an interrupted run: pass `resume` to continue it, or delete "
                f"{self.checkpoint.name} to start over"
            )
        cursor = self._read_cursor()
        self._check_cursor(key, cursor)
        return Plan(Action.RESUME, key, cursor)

    def refuse_existing(self) -> None:
        """For a new atlas from elsewhere (``patchscope merge``): never write over finished or interrupted work."""
        self._wait_for_no_live_run()
        if self.finished:
            raise FolderRefused(
                f"{self.path} already holds an atlas; load it with load_atlas, or pick another `out` (or delete it)"
            )
        if self.checkpoint.exists():
            raise FolderRefused(f"{self.path} holds the checkpoint of an interrupted run; pick another `out` (or delete it)")

    # -- carrying a plan out

    def load(self) -> Atlas:
        return load_atlas(self.path)

    def finish(self, key: RunKey, before_commit: Callable[[Atlas], None]) -> Atlas:
        """FINISH: check the saved tensors are this run's, then the exports and ``atlas.json``."""
        self._check_same_run(key, read_header(self.tensors)[0], "an unfinished atlas (no atlas.json)")
        return commit_atlas(self.path, before_commit=before_commit)

    def write_checkpoint(self, state: dict[str, SiteAtlas], top_k: int, cursor: Cursor) -> None:
        partial = Atlas(AtlasMeta(model="", source=None, top_k=top_k), state)
        write_atlas(partial, self.checkpoint, cursor.to_metadata())

    def read_checkpoint(self, key: RunKey, device: torch.device | str) -> tuple[dict[str, SiteAtlas], Cursor]:
        """RESUME: the running state and its cursor, checked against ``key`` once more."""
        try:
            atlas, metadata = load_atlas_with_metadata(self.checkpoint, device=device)
        except AtlasError as error:
            raise AtlasError(
                f"the checkpoint {self.checkpoint} cannot be used ({error}). Delete {self.checkpoint} and run the same "
                "command without `resume` to start over"
            ) from error
        cursor = Cursor.from_metadata(metadata)
        self._check_cursor(key, cursor)
        return dict(atlas.sites), cursor

    def verify_saved(self) -> None:
        """Read the saved atlas whole (checksum, names, shapes, values), so that a damaged one is reported
        before a model loads, not after."""
        try:
            load_atlas_with_metadata(self.tensors)
        except AtlasError as error:
            raise AtlasError(f"{error}. Delete {self.tensors} to profile again") from error

    def drop_checkpoint(self) -> None:
        self.checkpoint.unlink(missing_ok=True)

    # -- the checks

    def _plan_reuse(self, key: RunKey, policy: Policy) -> Plan:
        if not policy.reuse:
            raise FolderRefused(
                f"{self.path} already holds an atlas; load it with load_atlas, or pick another `out` (or delete it)"
            )
        meta, held = read_header(self.tensors)
        problems = key.reuse_changes(meta.key())
        if problems:
            raise FolderRefused(
                f"{self.path} holds an atlas made with other settings or inputs: {'; '.join(problems)}. "
                "Use another `out`, or delete it to profile again"
            )
        missing = [site for site in policy.sites if site not in held]
        lacking = [site for site in missing if site not in policy.optional_sites]
        if lacking:
            many = len(lacking) > 1
            raise FolderRefused(
                f"the atlas in {self.path} lacks the site{'s' if many else ''} {', '.join(lacking)} this run needs "
                f"(it has {', '.join(held)}); profile {'them' if many else 'it'} into another `out`"
            )
        return Plan(Action.REUSE, key, missing_sites=tuple(missing))

    def _plan_paused(self, key: RunKey, policy: Policy) -> Plan:
        """An atlas saved when a `max_tokens` budget ran out, with the checkpoint to continue it."""
        if not policy.resume:
            raise FolderRefused(
                f"{self.path} holds an atlas paused at its `max_tokens` budget: pass `resume` (with a larger `max_tokens`, "
                "or none) to continue it, load it as it is with load_atlas, or pick another `out`"
            )
        cursor = self._read_cursor()
        self._check_cursor(key, cursor)
        return Plan(Action.RESUME, key, cursor)

    def reopen(self) -> None:
        """Before a paused atlas is continued: it is no longer finished (the checkpoint now leads)."""
        (self.path / ATLAS_JSON).unlink(missing_ok=True)

    def _check_same_run(self, key: RunKey, meta: AtlasMeta, what: str) -> None:
        changes = key.inputs.changes_since(meta.inputs, *key.names)
        if meta.fingerprint != key.fingerprint or changes:
            raise AtlasError(
                f"{self.path} holds {what} made with other {'inputs: ' + '; '.join(changes) if changes else 'settings'}; "
                "use another `out`, or delete it to profile again"
            )

    def _read_cursor(self) -> Cursor:
        try:
            with safe_open(str(self.checkpoint), framework="pt") as handle:
                return Cursor.from_metadata(handle.metadata() or {})
        except Exception as error:  # noqa: BLE001 - safetensors raises several types on bad bytes
            raise AtlasError(
                f"the checkpoint {self.checkpoint} cannot be read ({type(error).__name__}: {error}); it was cut short. "
                "Delete it and run the same command without `resume` to start over"
            ) from error

    def _check_cursor(self, key: RunKey, cursor: Cursor) -> None:
        """A checkpoint continues only the run that wrote it: same settings, same model and data content."""
        if cursor.fingerprint != key.fingerprint:
            raise AtlasError(
                f"the checkpoint in {self.path} was made with other settings (model, data or profile options); "
                "resume with the same options, or use a new `out`"
            )
        changes = key.inputs.changes_since(cursor.inputs, *key.names)
        if changes:
            raise AtlasError(
                f"the checkpoint in {self.path} was made from other inputs: {'; '.join(changes)}. Resuming would mix "
                f"old and new data: delete {self.checkpoint} to start over, or use a new `out`"
            )

    def _wait_for_no_live_run(self) -> None:
        """A live run on the folder is named as such (`OutputBusyError`), not taken for an interrupted one."""
        if self.path.is_dir():
            with rank_zero_lock(self.path):
                pass


def plan_before_loading(
    out: Path,
    world: distributed.World,
    model_name: str,
    source: TextSource,
    config: ProfileConfig,
    dtype: str,
    policy: Policy,
    *,
    features: Sequence[FeatureSite],
) -> Plan:
    """What a run would do with ``out``, or why it may not, found before the model loads: unreadable or
    empty data first, then the folder's work against this run's key (``dtype`` as it will resolve, the
    SAEs it will profile as ``features``: `RunKey.of` makes the key `profile` will make)."""
    source.check()
    config = config.capped_for(count_documents(source), warn=False)  # as `profile` will run it
    key = RunKey.of(model_name, source.config, config, dtype, Inputs.of(model_name, source.config), features)
    folder = AtlasFolder(out, world)
    plan = folder.plan(key, policy)
    if plan.action in (Action.REUSE, Action.FINISH):
        folder.verify_saved()
    return plan


def rebuild_exports(path: str | Path, formats: tuple[str, ...]) -> list[Path]:
    """Write the exports of the atlas in ``path`` again (`patchscope.atlas.exports.EXPORTS`); for a run killed
    after saving its tensors, then its ``atlas.json``. The texts and the tokenizer must still be the profiled ones."""
    folder = AtlasFolder(path)
    atlas = folder.load()
    meta = atlas.meta
    if meta.source is None:
        raise AtlasError(
            f"the atlas in {folder.path} was profiled from texts given in Python, so its exports cannot be rebuilt here"
        )
    changes = Inputs.of(meta.model, None).changes_since(meta.inputs, meta.model, meta.dataset)  # the tokenizer's model
    if changes:
        raise AtlasError(f"cannot rebuild the exports of {folder.path}: {'; '.join(changes)} since the atlas was made")
    texts = atlas.texts()  # checks the data against the atlas
    tokenizer = load_tokenizer(meta.model)
    with output_lock(folder.path):
        if folder.finished:
            return write_exports(atlas, folder.path, texts, tokenizer, formats)
        written: list[Path] = []
        commit_atlas(
            folder.path, before_commit=lambda saved: written.extend(write_exports(saved, folder.path, texts, tokenizer, formats))
        )
        return written


def rank_zero_lock(out: Path) -> contextlib.AbstractContextManager:
    """The output lock, held by rank 0 alone: the ranks of one torchrun job share ``out``."""
    return output_lock(out) if distributed.detect().rank == 0 else contextlib.nullcontext(out)
