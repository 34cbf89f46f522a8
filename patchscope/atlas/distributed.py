"""Data-parallel profiling on torch.distributed: the world, each rank's share, and the final merge.

Launch with ``torchrun`` (one node or several); the world comes from the environment variables it
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Without them a run is a world of one, and every
function here is a no-op or the identity.

How a sharded atlas stays bit-identical to the single-process one:

- documents are grouped into *blocks* by absolute row index (``index // sort_buffer``); a block is
  the unit of length-sorting and batching (`batching.plan`) and the unit of sharding (block ``b``
  goes to rank ``b % world_size``). Every rank therefore runs exactly the batches a single process
  would run for those documents, so every activation is computed the same way;
- top-k examples merge exactly under the ranking rule (value, then document, then position). One
  exception is inherited from the fast kernel: when more than ``TIE_MARGIN + 1`` tokens tie exactly
  at a neuron's k-th value, which of them it keeps depends on the grouping of batches (measured on
  real text: position 1 of documents that start with the same token; see benchmarks/RESULTS.md);
- moments are kept as exact sums (`atlas.exact.ExactSum`), so their grouping does not matter.

Failures: the process group has a timeout (``PATCHSCOPE_DIST_TIMEOUT`` seconds, default 1800), and
the ranks meet in a monitored barrier before the merge, which names any rank that did not arrive.
Each rank's checkpoint is written before that barrier, so a resume of the whole job redoes only
the work that was lost.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from patchscope.atlas.atlas import Atlas, RankShare, SiteAtlas
from patchscope.atlas.exact import ExactSum
from patchscope.atlas.sources import Document
from patchscope.atlas.stats import Moments, TopK
from patchscope.atlas.store import optional_parts

log = logging.getLogger(__name__)
TIMEOUT_ENV = "PATCHSCOPE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
CHECKPOINT_STEM = "checkpoint"


class DistributedError(RuntimeError):
    """A rank of a data-parallel run failed or did not answer; the message names it."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run."""

    rank: int = 0
    """Global rank, 0 .. size - 1."""
    size: int = 1
    """Number of ranks (processes) in the run."""
    local_rank: int = 0
    """Rank on this node: which GPU this process uses."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> World:
    """The world torchrun describes in the environment; a world of one without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={size}; launch with torchrun")
    return World(rank, size, local_rank)


def rank_device(device: str, world: World) -> str:
    """``auto``/``cuda`` become this rank's GPU (``cuda:LOCAL_RANK``) in a multi-rank CUDA run.

    An explicit ``cuda:N`` is kept only where it names this rank's GPU: the same ``cuda:0`` on every
    rank puts them all on one GPU, which NCCL refuses at its first collective ("Duplicate GPU detected").
    """
    if world.size == 1:
        return device
    if device.startswith("cuda:") and device != f"cuda:{world.local_rank}":
        raise DistributedError(
            f"--device {device} on every one of {world.size} ranks would put them all on one GPU: pass "
            f"--device cuda, and each rank takes cuda:LOCAL_RANK (this one cuda:{world.local_rank})"
        )
    if device in ("auto", "cuda", f"cuda:{world.local_rank}") and torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return f"cuda:{world.local_rank}"
    return device


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


_joined: dict[str, object] = {}  # the process group this module created, and its gloo control group


def join(device: torch.device) -> World:
    """Detect the world and, when it has several ranks, join its process group (nccl on CUDA, gloo on CPU)."""
    world = detect()
    if world.size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout(), device_id=device if device.type == "cuda" else None)
        _joined["default"] = backend
        # The control group now, on every rank alike: created at the meeting, the early ranks would wait
        # in `new_group`, outside the monitored barrier that names a rank that never arrives.
        _control_group()
        log.info("rank %d of %d joined the %s process group", world.rank, world.size, backend)
    return world


def _control_group():
    """A gloo group for the barrier and the merge (small CPU tensors); the default group when that is gloo."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if "control" not in _joined:
        _joined["control"] = dist.new_group(backend="gloo", timeout=timeout())
    return _joined["control"]


# -- sharding


def block_of(document: Document, block_size: int) -> int:
    """The block a document belongs to: consecutive absolute indices, ``block_size`` per block."""
    return document.index // block_size


def shard(documents: Iterable[Document], block_size: int, world: World) -> Iterator[Document]:
    """This rank's documents: those of every block ``b`` with ``b % world.size == world.rank``.

    Every rank reads the whole source (cheap next to the model) and keeps its blocks, so streamed
    datasets shard by index just like files; only the share is tokenized.
    """
    for document in documents:
        if block_of(document, block_size) % world.size == world.rank:
            yield document


def checkpoint_name(world: World) -> str:
    """``checkpoint.safetensors`` for one process; ``checkpoint.rank{r}-of-{n}.safetensors`` per rank."""
    if world.size == 1:
        return f"{CHECKPOINT_STEM}.safetensors"
    return f"{CHECKPOINT_STEM}.rank{world.rank}-of-{world.size}.safetensors"


_RANK_CHECKPOINT = re.compile(rf"^{CHECKPOINT_STEM}\.rank(\d+)-of-(\d+)\.safetensors$")


def check_checkpoints(out: Path, world: World, resume: bool) -> None:
    """Refuse checkpoints of another world size (their shares differ), and this run's own without ``resume``."""
    if world.size > 1 and (out / checkpoint_name(world)).exists() and not resume:
        raise FileExistsError(
            f"{out} holds the checkpoints of an interrupted {world.size}-process run: pass `resume` to continue "
            f"it, or delete {CHECKPOINT_STEM}.rank*.safetensors to start over"
        )
    sizes = {int(m[2]) for p in out.glob(f"{CHECKPOINT_STEM}.*safetensors") if (m := _RANK_CHECKPOINT.match(p.name))}
    if (out / f"{CHECKPOINT_STEM}.safetensors").exists():
        sizes.add(1)
    others = sorted(sizes - {world.size})
    if others:
        raise DistributedError(
            f"{out} holds checkpoints of a run with {others[0]} process(es), and this run has {world.size}: "
            f"each rank's share depends on the number of ranks. Resume with {others[0]} processes "
            "(torchrun --nproc-per-node / --nnodes), or use a new `out`"
        )


# -- the end of a run: meet, merge, clean up


def meet(world: World) -> None:
    """Wait (up to the timeout) until every rank finished its share; name the ranks that did not."""
    if world.size == 1:
        return
    try:
        dist.monitored_barrier(group=_control_group(), timeout=timeout(), wait_all_ranks=True)
    except RuntimeError as error:
        failed = _failed_ranks(str(error), world)
        who = ", ".join(map(str, failed)) if failed else "another rank"
        raise DistributedError(
            f"rank {who} of {world.size} did not finish its share within {timeout().total_seconds():g} s "
            f"(it died, or hangs); this rank ({world.rank}) stops. Every rank that finished kept its checkpoint: "
            "fix the cause and rerun the same command with `resume` and the same number of processes.\n"
            f"  ({error})"
        ) from error


def _failed_ranks(message: str, world: World) -> list[int]:
    """Ranks named by gloo's monitored-barrier error (rank 0 lists them; others blame rank 0)."""
    listed = re.search(r"Ranks? ([\d, ]+) failed to pass", message)
    if listed:
        return sorted({int(r) for r in re.findall(r"\d+", listed[1])})
    sender = re.search(r"send/recv from rank (\d+)", message)
    return [int(sender[1])] if sender else []


def merge_ranks(atlas: Atlas, world: World) -> Atlas:
    """Every rank's atlas merged into one, on every rank (all-gathers of same-shaped CPU tensors)."""
    if world.size == 1:
        return atlas
    started = time.perf_counter()
    group = _control_group()
    atlas = Atlas(atlas.meta, {site: _exact(stats) for site, stats in atlas.sites.items()})
    mine = {name: tensor.cpu() for name, tensor in atlas.tensors().items()}  # the same names and shapes on every rank
    gathered = {name: _all_gather(tensor, world, group) for name, tensor in mine.items()}
    shares = atlas.meta.provenance
    counts = torch.tensor(
        [atlas.meta.n_documents, atlas.meta.skipped_empty] + [float(getattr(shares, key)) for key in _RANK_FIELDS],
        dtype=torch.float64,
    )
    all_counts = _all_gather(counts, world, group)
    parts = [_rank_atlas(atlas, {name: g[r] for name, g in gathered.items()}, all_counts[r]) for r in range(world.size)]
    merged = combine(parts)
    merged.meta.provenance.merge_seconds = round(time.perf_counter() - started, 4)
    return merged


_RANK_FIELDS = ("batches", "resumed_after_batches", "seconds", "tokens_this_run")


def _exact(stats: SiteAtlas) -> SiteAtlas:
    """Make sure the exact sums exist (a rank with an empty share never folded a batch)."""
    return stats if stats.sums is not None else stats.add(Moments.zeros(stats.n_neurons, stats.moments.total.device))


def _all_gather(tensor: torch.Tensor, world: World, group) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def _rank_atlas(template: Atlas, tensors: dict[str, torch.Tensor], counts: torch.Tensor) -> Atlas:
    """Another rank's atlas, from its gathered tensors and counts (same sites and shapes as ``template``)."""
    values = counts.tolist()
    batches, resumed, seconds, tokens = values[2:]
    share = dataclasses.replace(
        template.meta.provenance,
        batches=int(batches),
        resumed_after_batches=int(resumed),
        seconds=seconds,
        tokens_this_run=int(tokens),
    )
    meta = dataclasses.replace(template.meta, n_documents=int(values[0]), skipped_empty=int(values[1]), provenance=share)
    sites = {}
    for site in template.sites:
        top = TopK(*(tensors[f"{site}/{f.name}"] for f in dataclasses.fields(TopK)))
        moments = Moments(*(tensors[f"{site}/{f.name}"] for f in dataclasses.fields(Moments)))
        bottom, histogram, quantiles = optional_parts(tensors, site)
        sites[site] = SiteAtlas(top, moments, ExactSum(tensors[f"{site}/sums"]), bottom, histogram, quantiles)
    return Atlas(meta, sites)


def combine(parts: list[Atlas]) -> Atlas:
    """The ranks' atlases (in rank order) as one: exact top-k merge and exact sums.

    Every rank read the whole source, so each counted the same empty rows; documents add up.
    """
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    merged.meta.skipped_empty = parts[0].meta.skipped_empty
    ranks = [part.meta.provenance for part in parts]  # seconds: the slowest rank; tokens: all of them
    seconds = max(share.seconds for share in ranks)
    tokens = sum(share.tokens_this_run for share in ranks)
    merged.meta.provenance = dataclasses.replace(
        parts[0].meta.provenance,
        world_size=len(parts),
        batches=sum(share.batches for share in ranks),
        seconds=seconds,
        tokens_this_run=tokens,
        tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else None,
        ranks=[RankShare(s.batches, s.seconds, s.tokens_this_run, s.resumed_after_batches) for s in ranks],
    )
    return merged


def finish(world: World, checkpoint: Path | None) -> None:
    """After rank 0 saved the atlas: every rank drops its own checkpoint (all wait for the save first)."""
    if world.size > 1:
        dist.barrier(group=_control_group())
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    if world.size > 1 and "default" in _joined:  # leave as we came: a later run joins afresh
        _joined.clear()
        dist.destroy_process_group()
