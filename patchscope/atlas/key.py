"""What makes two profiling runs the same: their settings as resolved, and what their inputs *are*.

One key answers every "is this the same run?" question (`patchscope.atlas.folder` asks it for
reuse, resume and finishing; `merge` and the experiment's results file ask it too), so spellings
that mean the same thing can never be told apart in one place and not in another:

- an unset split, ``""``, ``"[0:]"`` and ``"train"`` all read every row of the default split;
- ``--layer 3`` and ``--site blocks.3.mlp.hook_post`` profile the same site, in any order;
- a local file or folder is known by its content, so ``data.jsonl`` and ``./data.jsonl`` agree;
- ``streaming``, ``checkpoint_every`` and ``reduction`` change how a run reads, reduces and saves, not what it measures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from pathlib import Path

from torch import nn

from patchscope.atlas.feature_site import FeatureSite, sae_digest
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.sources import SourceConfig, is_local, parse_split
from patchscope.model.gguf import GGUFError
from patchscope.model.loading import ModelLoadError, preset_for
from patchscope.util.identity import Identity, compare, package_identity, path_identity

TEXTS = "<texts>"
"""The dataset name of an atlas profiled from texts given in Python."""


@dataclass(frozen=True)
class Inputs:
    """What the model and the data are (content hashes, or the hub commit): `patchscope.util.identity`."""

    model: Identity | None = None
    data: Identity | None = None

    @classmethod
    def of(cls, model_name: str, source: SourceConfig | None, model: nn.Module | None = None) -> Inputs:
        """Identify the inputs; with the loaded ``model``, a hub model is known by the commit it came from."""
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
        return cls(
            model=_model_identity(model_name, commit) if model_name else None,
            data=path_identity(source.dataset, "dataset") if source is not None else None,
        )

    def changes_since(self, recorded: Inputs, model_name: str, dataset: str) -> list[str]:
        """What changed in the inputs since ``recorded`` was taken, in words."""
        return compare(f"the model {model_name}", recorded.model, self.model) + compare(
            f"the data {dataset}", recorded.data, self.data
        )

    def to_json(self) -> dict[str, Identity | None]:
        return {"model": self.model, "data": self.data}

    @classmethod
    def from_json(cls, raw: object) -> Inputs:
        return cls(raw.get("model"), raw.get("data")) if isinstance(raw, dict) else cls()


def _model_identity(model_name: str, commit: str | None) -> Identity:
    """An embedded preset by its package and GGUF file; anything else by `path_identity`."""
    preset = preset_for(model_name)
    if preset is not None and preset.package and preset.gguf is not None:
        try:
            return package_identity(preset.package, preset.gguf())
        except (GGUFError, PackageNotFoundError) as error:
            raise ModelLoadError(str(error)) from error
    return path_identity(model_name, "model", commit)


def canonical_split(split: str, *, named: bool = True) -> str:
    """One spelling per selection of rows: ``""``, ``"[0:]"`` and ``"train"`` all read ``train[0:]``.

    ``named=False`` for a local file, which has no split names (``validation[0:10]`` reads its first
    10 rows too). The slices of a merged atlas (``[0:5]+[7:10]``) are canonical one by one.
    """
    if "+" in split:
        return "+".join(canonical_split(part, named=named) for part in split.split("+"))
    name, start, stop = parse_split(split)
    return f"{name if named else ''}[{start}:{'' if stop is None else stop}]"


def _local(identity: Identity | None) -> bool:
    return identity is not None and identity.get("kind") in ("file", "folder")


@dataclass(frozen=True)
class RunKey:
    """A profiling run's identity: everything that decides what its atlas holds.

    ``reading`` is what the recorded examples depend on (so a run may reuse an atlas whose reading
    matches); ``statistics`` adds what shapes the running state batch by batch (so a run may resume a
    checkpoint only if that matches too).
    """

    model: str
    """The model's hub id or preset, or ``<local>`` for a file or folder known by its content."""
    source: tuple[tuple[str, str], ...]
    """The data: dataset (``<local>`` when known by content), canonical split, and the text column (a .txt file: its txt mode)."""
    reading: tuple[tuple[str, object], ...]
    """Truncation and dtype: max_length, overflow, exclude_bos, dtype."""
    statistics: tuple[tuple[str, object], ...] = ()
    """Sites, top-k, bottom-k, histogram, quantiles, batching, compile (empty when read back from an atlas)."""
    inputs: Inputs = field(default_factory=Inputs)
    names: tuple[str, str] = ("", TEXTS)
    """The model and dataset as given, for messages."""
    features: tuple[tuple[str, str], ...] = ()
    """``(feature site, SAE identity)`` of each SAE profiled (`patchscope.atlas.feature_site`): another SAE under
    the same site name is another run, so a resume, a reuse or a merge with it is refused."""

    @classmethod
    def of(
        cls,
        model_name: str,
        source: SourceConfig | None,
        config: ProfileConfig,
        dtype: str,
        inputs: Inputs,
        features: Sequence[FeatureSite] = (),
    ) -> RunKey:
        """The key of a run about to happen (``dtype`` as resolved, e.g. ``float32``), with the SAEs it profiles."""
        settings = dataclasses.asdict(config)
        # `layer` and `sites` are folded into `site_names`; the reductions give the same atlas bit for bit
        # (tests/test_profiler.py), so the one chosen, like how often to checkpoint, is no part of the run
        # `layers` and `site_kind` too (`ProfileConfig.for_model` expands them); `max_tokens` says where a run pauses,
        # and a larger budget continues it
        for how in ("checkpoint_every", "reduction", "layer", "sites", "layers", "site_kind", "max_tokens"):
            settings.pop(how)
        settings["sites"] = sorted(config.site_names())
        reading = {
            "max_length": config.max_length,
            "overflow": config.overflow,
            "exclude_bos": config.exclude_bos,
            "dtype": dtype,
        }
        preset = preset_for(model_name)  # a preset and its hub id are one model
        return cls(
            model="<local>" if _local(inputs.model) else (preset.hub_id if preset else model_name),
            source=_source(source, inputs),
            reading=tuple(reading.items()),
            statistics=tuple(sorted((k, v) for k, v in settings.items() if k not in reading)),
            inputs=inputs,
            names=(model_name, source.dataset if source is not None else TEXTS),
            features=tuple(sorted((feature.name, feature.identity) for feature in features)),
        )

    @property
    def fingerprint(self) -> str:
        """A digest of the settings a checkpoint may only be resumed with (the inputs are compared apart)."""
        settings = {"model": self.model, "source": self.source, "reading": self.reading, "statistics": self.statistics}
        saes = [(name, sae_digest(identity)) for name, identity in self.features]  # by content, not location
        return _digest({**settings, "features": saes} if saes else settings)  # a run without SAEs as before

    @property
    def reading_digest(self) -> str:
        """A digest of what the recorded examples depend on: model, data and reading, not how the state was kept."""
        return _digest({"model": self.model, "source": self.source, "reading": self.reading})

    def differences(self, recorded: RunKey, but: tuple[str, ...] = ()) -> list[tuple[str, object, object]]:
        """``(what, recorded, wanted)`` for each setting or input name in which the two reads differ;
        source fields named in ``but`` may differ (the slices of `merge_atlases`)."""
        found: list[tuple[str, object, object]] = []
        sides = {
            "model": (self.model, recorded.model, recorded.inputs.model),
            "data": (_get(self.source, "dataset"), _get(recorded.source, "dataset"), recorded.inputs.data),
        }
        for index, (what, (mine, theirs, identity)) in enumerate(sides.items()):
            # a local input is known by its content; one recorded without an identity (an older atlas) by its name
            same_name = identity is None and self.names[index] == recorded.names[index]
            if mine != theirs and not same_name:
                found.append((what, recorded.names[index], self.names[index]))
        old, new = dict(recorded.source), dict(self.source)
        found += [
            (f"`{n}`", old[n], new[n])
            for n in ("split", "text_column", "txt_mode")
            if n not in but and n in old and n in new and old[n] != new[n]
        ]
        reading, saes = dict(self.reading), dict(self.features)
        found += [(f"`{name}`", was, reading[name]) for name, was in recorded.reading if reading[name] != was]
        # a feature site both hold must be the same SAE (a site only one holds is the callers' `sites` check)
        return found + [
            (f"the SAE of {name}", was, saes[name])
            for name, was in recorded.features
            if sae_digest(saes.get(name, was)) != sae_digest(was)
        ]

    def reuse_changes(self, recorded: RunKey, but: tuple[str, ...] = ()) -> list[str]:
        """Why an atlas recorded under ``recorded`` cannot serve this run (empty: it can), in words."""
        problems = self.inputs.changes_since(recorded.inputs, *self.names)
        for what, old, new in self.differences(recorded, but):
            if what in ("model", "data"):
                problems.append(f"it was made with the {what} {old!r}, not {new!r}")
            else:
                problems.append(f"{what} was {old!r}, this run asks for {new!r}")
        return problems


def _get(pairs: tuple[tuple[str, str], ...], name: str) -> str | None:
    return dict(pairs).get(name)


def _digest(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _source(source: SourceConfig | None, inputs: Inputs) -> tuple[tuple[str, str], ...]:
    if source is None:
        return (("dataset", TEXTS),)
    local = is_local(source.dataset)
    fields = [
        ("dataset", "<local>" if _local(inputs.data) else source.dataset),
        ("split", canonical_split(source.resolved_split, named=not local)),
    ]
    if Path(source.dataset).suffix.lower() == ".txt":  # a text file has no columns, and only it has a txt mode
        fields.append(("txt_mode", source.txt_mode))
    else:
        fields.append(("text_column", source.text_column))
    return tuple(fields)
