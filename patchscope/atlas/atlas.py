"""The activation atlas: per-neuron top-k examples and moments for one or more sites.

The data model only; `store` reads and writes it, `exports` turns it into tables for people.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.batching import Overflow
from patchscope.atlas.exact import ExactSum
from patchscope.atlas.key import TEXTS, Inputs, RunKey
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.sources import SourceConfig, TextSource, parse_split
from patchscope.atlas.stats import Moments, TopK
from patchscope.kernels.bottomk import merge_bottomk
from patchscope.kernels.quantiles import QuantileExamples, merge_quantiles
from patchscope.kernels.topk_merge import merge_topk
from patchscope.util.display import html_view

CONTEXT_TOKENS = 5


class AtlasError(ValueError):
    """An atlas file is missing, corrupt, or inconsistent with what it is used for."""


@dataclass
class RankShare:
    """One torchrun rank's share of a run."""

    batches: int = 0
    seconds: float = 0.0
    tokens_this_run: int = 0
    resumed_after_batches: int = 0


@dataclass
class Provenance:
    """How the run that made an atlas went: never compared between runs, only reported."""

    batches: int = 0
    resumed_after_batches: int = 0
    """Batches restored from a checkpoint rather than run."""
    seconds: float = 0.0
    tokens_this_run: int = 0
    padding_fraction: float = 0.0
    tokens_per_second: float | None = None
    nonfinite_activations: int = 0
    """inf/nan activations left out (an fp16 overflow)."""
    world_size: int = 1
    ranks: list[RankShare] = field(default_factory=list)
    """Per rank, for a torchrun job (empty for one process)."""
    merge_seconds: float | None = None
    merged_from: list[str] = field(default_factory=list)
    """The splits of the atlases `patchscope merge` combined."""

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Provenance:
        known = {f.name for f in dataclasses.fields(cls)} - {"ranks"}
        ranks = [RankShare(**{k: v for k, v in r.items() if k in _RANK_KEYS}) for r in raw.get("ranks") or []]
        return cls(**{k: v for k, v in raw.items() if k in known and v is not None}, ranks=ranks)


_RANK_KEYS = {f.name for f in dataclasses.fields(RankShare)}


@dataclass
class AtlasMeta:
    """What produced an atlas; enough to re-run any entry."""

    model: str
    source: SourceConfig | None
    """The texts' source with its split as resolved; None for texts given in Python."""
    max_length: int = 128
    overflow: Overflow = "truncate"
    exclude_bos: bool = True
    dtype: str = "float32"
    top_k: int = 20
    n_documents: int = 0
    skipped_empty: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    has_bos: bool | None = None
    """Whether the tokenizer put a BOS token at position 0 (None: not recorded)."""
    model_type: str = ""
    """The model's HF ``config.model_type`` (``gemma2``, ``gemma3_text``, ``llama``); "" when not recorded."""
    dataset_version: str = ""
    """What a built-in dataset's text depends on, e.g. ``python 3.11.7`` for python-docs."""
    fingerprint: str = ""
    """`RunKey.fingerprint` of the run: a checkpoint or unfinished atlas continues only the same settings."""
    inputs: Inputs = field(default_factory=Inputs)
    """What the model and data were when profiled (content hashes or hub commits)."""
    rows_read: tuple[int, int] | None = None
    """First and last row index read from the source."""
    paused_at_tokens: int | None = None
    """Counted tokens after which a `max_tokens` budget paused the run (None: it read all its data). The
    folder keeps the checkpoint beside it, and a resumed run continues from there."""
    features: dict[str, str] = field(default_factory=dict)
    """``{feature site: SAE identity}`` of the SAEs profiled (`RunKey.features`): their file or hub location and content digest."""
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def dataset(self) -> str:
        return self.source.dataset if self.source is not None else TEXTS

    @property
    def split(self) -> str:
        return self.source.resolved_split if self.source is not None else ""

    @property
    def text_column(self) -> str:
        return self.source.text_column if self.source is not None else "text"

    def key(self) -> RunKey:
        """The recorded run's key, to compare a new run with (`RunKey.reuse_changes`); its statistics are
        only recorded as `fingerprint`."""
        reading = ProfileConfig(max_length=self.max_length, overflow=self.overflow, exclude_bos=self.exclude_bos)
        key = RunKey.of(self.model, self.source, reading, self.dtype, self.inputs)
        return dataclasses.replace(key, statistics=(), features=tuple(sorted(self.features.items())))

    def to_json(self) -> dict[str, Any]:
        """As written to ``atlas.json``: the fields, plus the source's dataset, split and column for people and tools."""
        return {**dataclasses.asdict(self), "dataset": self.dataset, "split": self.split, "text_column": self.text_column}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> AtlasMeta:
        """Read back `to_json`, or the layout before typed fields (an ``extra`` dict and flat source fields)."""
        extra = raw.get("extra") or {}
        source = raw["source"] if "source" in raw else extra.get("source")
        if source is None and raw.get("dataset", TEXTS) != TEXTS:
            source = {"dataset": raw["dataset"], "split": raw.get("split", ""), "text_column": raw.get("text_column", "text")}
        if isinstance(source, dict):
            known = {f.name for f in dataclasses.fields(SourceConfig)}
            source = SourceConfig(**{k: v for k, v in source.items() if k in known})
            source = dataclasses.replace(source, split=source.resolved_split)
        rows = raw["rows_read"] if "rows_read" in raw else extra.get("rows_read")
        fields = {f.name for f in dataclasses.fields(cls)} - {"source", "inputs", "rows_read", "provenance", "fingerprint"}
        return cls(
            **{k: v for k, v in raw.items() if k in fields},
            source=source,
            inputs=Inputs.from_json(raw["inputs"] if "inputs" in raw else extra.get("identity")),
            rows_read=(int(rows[0]), int(rows[1])) if rows else None,
            provenance=Provenance.from_json(raw.get("provenance") or extra),
            fingerprint=raw.get("fingerprint") or extra.get("fingerprint", ""),
        )


@dataclass
class SiteAtlas:
    """Statistics of every neuron at one site."""

    top: TopK  # [k, n]
    moments: Moments  # [n]
    sums: ExactSum | None = None
    """``moments.total`` and ``moments.total_sq`` kept exactly ([2, n]), so that how batches were
    grouped (one process, several ranks, several jobs) cannot change a bit of them. None in
    atlases written before it existed; their moments merge as plain float sums."""
    bottom: TopK | None = None  # [k, n], the most negative first (`patchscope.kernels.bottomk`)
    histogram: Tensor | None = None  # [n, N_BINS] int64 counts (`patchscope.kernels.histogram`)
    quantiles: QuantileExamples | None = None  # [INTERVALS, m, n] (`patchscope.kernels.quantiles`)

    @property
    def n_neurons(self) -> int:
        return self.top.values.shape[1]

    @property
    def max(self) -> torch.Tensor:  # [n]
        return self.top.values[0]

    @property
    def mean(self) -> torch.Tensor:  # [n]
        return self.moments.total / self.moments.n_tokens.clamp(min=1)

    @property
    def std(self) -> torch.Tensor:  # [n]
        mean = self.mean
        return (self.moments.total_sq / self.moments.n_tokens.clamp(min=1) - mean.square()).clamp(min=0).sqrt()

    @property
    def fire_rate(self) -> torch.Tensor:  # [n]
        return self.moments.fire_count / self.moments.n_tokens.clamp(min=1)

    def merge(self, other: SiteAtlas) -> SiteAtlas:
        if other.n_neurons != self.n_neurons or other.top.k != self.top.k:
            raise AtlasError(f"cannot merge atlases of shape {tuple(self.top.values.shape)} and {tuple(other.top.values.shape)}")
        merged = dataclasses.replace(
            self,
            top=merge_topk(self.top, other.top),
            moments=self.moments + other.moments,
            sums=None,
            bottom=_merge_optional("bottom-k", self.bottom, other.bottom, merge_bottomk),
            histogram=_merge_optional("histogram", self.histogram, other.histogram, torch.add),
            quantiles=_merge_optional("quantile examples", self.quantiles, other.quantiles, merge_quantiles),
        )
        if self.sums is not None and other.sums is not None:
            merged = merged._with_sums(self.sums + other.sums)
        return merged

    def add(self, batch: Moments) -> SiteAtlas:
        """Fold one batch's moments in; the float sums go through `ExactSum`."""
        current = self.sums if self.sums is not None else ExactSum.of(torch.stack([self.moments.total, self.moments.total_sq]))
        added = dataclasses.replace(self, moments=self.moments + batch)
        return added._with_sums(current + ExactSum.of(torch.stack([batch.total, batch.total_sq])))

    def _with_sums(self, sums: ExactSum) -> SiteAtlas:
        total, total_sq = sums.value()
        return dataclasses.replace(self, moments=dataclasses.replace(self.moments, total=total, total_sq=total_sq), sums=sums)

    def to(self, device: torch.device | str) -> SiteAtlas:
        move = lambda part: part.to(device) if part is not None else None  # noqa: E731
        return SiteAtlas(
            self.top.to(device),
            self.moments.to(device),
            move(self.sums),
            move(self.bottom),
            move(self.histogram),
            move(self.quantiles),
        )

    @property
    def min(self) -> torch.Tensor | None:  # [n]
        return self.bottom.values[0] if self.bottom is not None else None


def _merge_optional(what: str, first, second, merge):
    """Both present: merged; both absent: None; otherwise the two atlases were made differently."""
    if first is None and second is None:
        return None
    if first is None or second is None:
        raise AtlasError(f"cannot merge an atlas that has {what} with one that has none; profile both with the same options")
    return merge(first, second)


class SiteNeuron(NamedTuple):
    """A neuron named by its site, with its maximum (`Atlas.top_neurons_across`)."""

    site: str
    neuron: int
    max: float


@dataclass(frozen=True)
class AtlasEntry:
    """One recorded example: neuron ``neuron`` reached ``activation`` at (doc, position)."""

    site: str
    neuron: int
    rank: int
    activation: float
    doc: int
    position: int
    token: int

    _repr_html_ = html_view  # a card in Jupyter (patchscope.report.notebook)


@dataclass(frozen=True)
class AtlasNeuron:
    """One neuron of an atlas: its statistics and recorded examples (``atlas.neuron(site, n)``)."""

    site: str
    neuron: int
    max: float
    mean: float
    fire_rate: float
    """Fraction of counted tokens with an activation above 0."""
    n_tokens: int
    entries: tuple[AtlasEntry, ...]
    """Its filled top-k examples, best first."""
    model: str
    """The model the atlas was profiled on."""

    _repr_html_ = html_view  # a card in Jupyter (patchscope.report.notebook)


@dataclass
class Atlas:
    """The activation atlas of a profile: per site, every neuron's top-k examples and moments.

    Attributes:
        meta: what was profiled and how (`AtlasMeta`: model, data, truncation, top_k, versions).
        sites: ``{site: SiteAtlas}``; ``atlas[site]`` raises `AtlasError` for a site it lacks.

    Made by `profile`, saved and read with `save_atlas` / `load_atlas`.

    Example:
        >>> atlas = load_atlas("runs/gemma2-l12")
        >>> neuron = atlas.top_neurons("blocks.12.mlp.hook_post")[0]
        >>> atlas.entry("blocks.12.mlp.hook_post", neuron)  # doc, position, token and value of its top example
    """

    meta: AtlasMeta
    sites: dict[str, SiteAtlas]

    def __getitem__(self, site: str) -> SiteAtlas:
        if site not in self.sites:
            raise AtlasError(f"this atlas has no site {site!r}; it has {', '.join(self.sites)}")
        return self.sites[site]

    @property
    def n_tokens(self) -> int:
        first = next(iter(self.sites.values()))
        return int(first.moments.n_tokens)

    def merge(self, other: Atlas) -> Atlas:
        """The atlas of the union of both inputs (shards, or a checkpoint and the rest of a run)."""
        if self.sites.keys() != other.sites.keys():
            raise AtlasError(f"cannot merge atlases of different sites: {list(self.sites)} vs {list(other.sites)}")
        meta = dataclasses.replace(
            self.meta,
            n_documents=self.meta.n_documents + other.meta.n_documents,
            skipped_empty=self.meta.skipped_empty + other.meta.skipped_empty,
        )
        return Atlas(meta, {site: self.sites[site].merge(other.sites[site]) for site in self.sites})

    def to(self, device: torch.device | str) -> Atlas:
        return Atlas(self.meta, {site: stats.to(device) for site, stats in self.sites.items()})

    # -- queries

    def entry(self, site: str, neuron: int, rank: int = 0) -> AtlasEntry:
        stats = self[site]
        if not 0 <= neuron < stats.n_neurons:
            raise IndexError(f"neuron {neuron} is out of range: {site} has neurons 0..{stats.n_neurons - 1}")
        if not 0 <= rank < stats.top.k:
            raise IndexError(f"rank {rank} is out of range: the atlas keeps the top {stats.top.k}")
        doc = int(stats.top.doc[rank, neuron])
        if doc < 0:
            raise AtlasError(f"neuron {neuron} of {site} has no example at rank {rank}")
        return AtlasEntry(
            site,
            neuron,
            rank,
            float(stats.top.values[rank, neuron]),
            doc,
            int(stats.top.pos[rank, neuron]),
            int(stats.top.token[rank, neuron]),
        )

    def neuron(self, site: str, neuron: int) -> AtlasNeuron:
        """Neuron ``neuron`` of ``site``: maximum, mean, firing rate and its examples (shows as HTML in Jupyter)."""
        stats = self[site]
        if not 0 <= neuron < stats.n_neurons:
            raise IndexError(f"neuron {neuron} is out of range: {site} has neurons 0..{stats.n_neurons - 1}")
        ranks = [r for r in range(stats.top.k) if int(stats.top.doc[r, neuron]) >= 0]
        tokens = int(stats.moments.n_tokens)
        return AtlasNeuron(
            site,
            neuron,
            float(stats.max[neuron]),
            float(stats.mean[neuron]),
            int(stats.moments.fire_count[neuron]) / max(tokens, 1),
            tokens,
            tuple(self.entry(site, neuron, r) for r in ranks),
            self.meta.model,
        )

    def entries(self, site: str, ranks: int | None = None) -> list[AtlasEntry]:
        """Every filled example of every neuron, for ranks ``0..ranks-1`` (all by default)."""
        top = self[site].top
        ranks = top.k if ranks is None else ranks
        values, docs, positions, tokens = (t[:ranks].tolist() for t in (top.values, top.doc, top.pos, top.token))
        return [
            AtlasEntry(site, n, r, values[r][n], docs[r][n], positions[r][n], tokens[r][n])
            for n in range(top.values.shape[1])
            for r in range(ranks)
            if docs[r][n] >= 0
        ]

    def top_neurons(self, site: str, n: int = 1) -> list[int]:
        """Neurons with the largest maximum activation, best first (ties: lower index)."""
        maxima = self[site].max
        order = torch.sort(maxima, descending=True, stable=True).indices
        return order[:n].tolist()

    def top_neurons_across(self, n: int = 1, sites: Iterable[str] | None = None) -> list[SiteNeuron]:
        """The ``n`` neurons with the largest maxima over several sites (default: every site), best first.

        Ties: the site that comes first in ``sites`` (the atlas's order), then the lower index, as `top_neurons`.
        Maxima of sites of different kinds (an MLP neuron, a residual dimension) are compared as they are.
        """
        names = list(self.sites) if sites is None else list(sites)
        maxima = torch.cat([self[site].max.float() for site in names])  # [sum of n_neurons]
        owner = torch.cat([torch.full((self[site].n_neurons,), i) for i, site in enumerate(names)])
        index = torch.cat([torch.arange(self[site].n_neurons) for site in names])
        order = torch.sort(maxima, descending=True, stable=True).indices[:n]
        return [SiteNeuron(names[int(owner[i])], int(index[i]), float(maxima[i])) for i in order]

    def nonfinite_total(self) -> int:
        return int(sum(int(stats.moments.nonfinite.sum()) for stats in self.sites.values()))

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for site, stats in self.sites.items():
            for part in (stats.top, stats.moments):
                for spec in dataclasses.fields(part):
                    out[f"{site}/{spec.name}"] = getattr(part, spec.name)
            if stats.sums is not None:
                out[f"{site}/sums"] = stats.sums.parts
            for prefix, group in (("bottom", stats.bottom), ("quantile", stats.quantiles)):
                for spec in dataclasses.fields(group) if group is not None else ():
                    out[f"{site}/{prefix}_{spec.name}"] = getattr(group, spec.name)
            if stats.histogram is not None:
                out[f"{site}/histogram"] = stats.histogram
        return out

    def mean_without_first_slots(self, site: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Tensor:
        """``[d]``: the corpus mean of ``site`` without each segment's first slot (BOS or attention sink),
        which the corpus-mean control needs: see `patchscope.atlas.first_slots`."""
        from patchscope.atlas.first_slots import mean_without_first_slots

        return mean_without_first_slots(self, site, model, tokenizer)

    def texts(self, docs: Iterable[int] | None = None) -> dict[int, str]:
        """The texts of ``docs`` (default: every document among the examples), read again from the source
        the atlas names, once it is checked to be the data that was profiled (same content or commit)."""
        source = self.meta.source
        if source is None:
            raise AtlasError("this atlas was profiled from in-memory texts; its texts cannot be read again, pass them as `texts`")
        changes = Inputs.of("", source).changes_since(self.meta.inputs, self.meta.model, source.dataset)
        if changes:
            raise AtlasError(f"cannot read the atlas's texts again: {'; '.join(changes)} since the atlas was made")
        wanted = set(self.documents() if docs is None else docs)
        if "+" not in source.resolved_split:
            return TextSource(source).fetch(wanted)
        texts: dict[int, str] = {}  # a merged atlas of slices [a:b]+[c:d]: each document from its slice
        for part in source.resolved_split.split("+"):
            _, start, stop = parse_split(part)
            inside = {d for d in wanted if start <= d and (stop is None or d < stop)}
            texts.update(TextSource(dataclasses.replace(source, split=part)).fetch(inside) if inside else {})
        return texts

    def documents(self, site: str | None = None) -> set[int]:
        """Every document index that appears among the recorded examples."""
        chosen = [self[site]] if site else list(self.sites.values())
        return {int(d) for stats in chosen for d in stats.top.doc.unique().tolist() if d >= 0}
