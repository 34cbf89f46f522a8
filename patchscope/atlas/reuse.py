"""May an existing atlas serve a new run? Same inputs (by content), same tokenization, the sites it needs.

Batching options (`batch_tokens`, `sort_buffer`) and `top_k` do not change what an atlas records
at rank 0, so an atlas made by ``patchscope profile`` serves ``patchscope run`` whenever it holds
the sites the run reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.config import ProfileConfig
from patchscope.atlas.run import identity_changes
from patchscope.atlas.sources import SourceConfig
from patchscope.util.identity import Identity


@dataclass
class Reuse:
    """What stands between an atlas and a run that wants to reuse it."""

    problems: list[str] = field(default_factory=list)
    """Settings or inputs that differ: the atlas cannot be reused."""
    missing_sites: list[str] = field(default_factory=list)
    """Sites the run asks for that the atlas does not hold."""


def check_reuse(
    atlas: Atlas,
    *,
    model_name: str,
    source: SourceConfig,
    config: ProfileConfig,
    dtype: str,
    identity: dict[str, Identity | None],
) -> Reuse:
    meta = atlas.meta
    recorded = meta.extra.get("identity") or {}
    problems = identity_changes(recorded, identity, model_name, source.dataset)
    for what, old, new in (("model", meta.model, model_name), ("data", meta.dataset, source.dataset)):
        if old != new and not (_local(recorded.get(what)) and _local(identity.get(what))):  # local content was compared above
            problems.append(f"it was made with the {what} {old!r}, not {new!r}")
    recorded_source = meta.extra.get("source") or {}
    wanted = {
        "split": (meta.split, source.split),
        "text_column": (meta.text_column, source.text_column),
        "txt_mode": (recorded_source.get("txt_mode", source.txt_mode), source.txt_mode),
        "max_length": (meta.max_length, config.max_length),
        "overflow": (meta.overflow, config.overflow),
        "exclude_bos": (meta.exclude_bos, config.exclude_bos),
        "dtype": (meta.dtype, dtype),
    }
    problems += [f"`{name}` was {old!r}, this run asks for {new!r}" for name, (old, new) in wanted.items() if old != new]
    missing = [site for site in config.site_names() if site not in atlas.sites]
    return Reuse(problems, missing)


def _local(identity: Identity | None) -> bool:
    """Identified by content (a local file or folder), so a moved path does not matter."""
    return identity is not None and identity.get("kind") in ("file", "folder")
