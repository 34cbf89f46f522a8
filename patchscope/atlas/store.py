"""Atlas files: ``atlas.safetensors`` (tensors, with the metadata JSON inside the same file so the
two can never disagree) plus ``atlas.json`` (the same metadata, for people and tools)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from patchscope.kernels.quantiles import QuantileExamples
from patchscope.kernels.topk_merge import Moments, TopK

from patchscope.model.sites import parse_site
from patchscope.util.storage import write_json, write_tensors
from patchscope.atlas.atlas import Atlas, AtlasError, AtlasMeta, SiteAtlas

ATLAS_TENSORS = "atlas.safetensors"
ATLAS_JSON = "atlas.json"
METADATA_KEY = "patchscope_atlas"


def write_atlas(atlas: Atlas, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write the tensors, with the metadata inside the same file, atomically; returns that metadata."""
    meta = dataclasses.asdict(atlas.meta)
    meta["sites"] = list(atlas.sites)
    meta["n_tokens"] = atlas.n_tokens
    write_tensors(path, atlas.tensors(), {METADATA_KEY: json.dumps(meta), **(extra_metadata or {})})
    return meta


def save_atlas(atlas: Atlas, directory: str | Path) -> Path:
    """``atlas.safetensors`` plus ``atlas.json`` in ``directory``."""
    directory = Path(directory)
    write_json(directory / ATLAS_JSON, write_atlas(atlas, directory / ATLAS_TENSORS))
    return directory


def load_atlas(path: str | Path, device: torch.device | str = "cpu") -> Atlas:
    """Read ``atlas.safetensors`` (a directory holding it, or the file itself)."""
    atlas, _ = load_atlas_with_metadata(path, device)
    return atlas


def load_atlas_with_metadata(path: str | Path, device: torch.device | str = "cpu") -> tuple[Atlas, dict[str, str]]:
    """The atlas and the raw safetensors metadata (which also holds a checkpoint's cursor)."""
    path = Path(path)
    file = path / ATLAS_TENSORS if path.is_dir() else path
    if not file.is_file():
        raise AtlasError(f"no atlas at {str(path)!r} (expected {ATLAS_TENSORS}); run `patchscope profile` first")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(file), device=str(device))
        raw = json.loads(metadata[METADATA_KEY])
    except Exception as error:  # noqa: BLE001 - safetensors raises several types on bad bytes
        raise AtlasError(f"{file} is not a readable atlas ({type(error).__name__}: {error}); re-run the profile") from error
    sites = raw.pop("sites")
    raw.pop("n_tokens", None)
    meta = AtlasMeta(**{k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(AtlasMeta)}})
    stats = {}
    for site in sites:
        parse_site(site)
        top = TopK(*(tensors[f"{site}/{f.name}"] for f in dataclasses.fields(TopK)))
        moments = Moments(*(tensors[f"{site}/{f.name}"] for f in dataclasses.fields(Moments)))
        stats[site] = SiteAtlas(top, moments, *_optional_parts(tensors, site))
    return Atlas(meta, stats), metadata


def _optional_parts(tensors: Mapping[str, torch.Tensor], site: str) -> tuple:
    """Bottom-k, histogram and quantile examples where the file has them (older atlases do not)."""
    def group(cls, prefix: str):
        names = [f"{site}/{prefix}_{f.name}" for f in dataclasses.fields(cls)]
        return cls(*(tensors[name] for name in names)) if names[0] in tensors else None

    return group(TopK, "bottom"), tensors.get(f"{site}/histogram"), group(QuantileExamples, "quantile")
