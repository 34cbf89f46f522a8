"""Atlas files: ``atlas.safetensors`` (tensors, with the metadata JSON inside the same file so the
two can never disagree) plus ``atlas.json`` (the same metadata, for people and tools).

``atlas.json`` is written last, after the exports: it is the commit marker. A folder with the
tensors but no ``atlas.json`` is a run killed while finishing, which `profile` (and
``patchscope export``) complete. Every load checks the tensors against a sha256 stored beside
them, their names, shapes, dtypes and values, and names the file and the fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from patchscope.atlas.atlas import Atlas, AtlasError, AtlasMeta, SiteAtlas
from patchscope.atlas.exact import ExactSum
from patchscope.atlas.feature_site import reads_of
from patchscope.atlas.stats import Moments, TopK
from patchscope.kernels.quantiles import QuantileExamples
from patchscope.model.sites import SiteError, parse_site
from patchscope.util.storage import write_json, write_tensors

ATLAS_TENSORS = "atlas.safetensors"
ATLAS_JSON = "atlas.json"
METADATA_KEY = "patchscope_atlas"
CHECKSUM_KEY = "patchscope_checksum"
FORMAT = 2
"""Atlas file format: 2 added the checksum, which a format-2 file must carry."""

_INTEGER_FIELDS = {"doc", "pos", "token", "fire_count", "nonfinite", "n_tokens"}


def tensor_checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order, then the metadata
    (the atlas description, a checkpoint's cursor), so no byte that a load uses goes unchecked."""
    digest = hashlib.sha256()
    entries = metadata or {}
    for key in sorted(entries):
        if key != CHECKSUM_KEY:
            digest.update(f"{key}={entries[key]}|".encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # numpy's stubs declare the buffer protocol only for Python >= 3.12
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    return digest.hexdigest()


def write_atlas(atlas: Atlas, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write the tensors, with the metadata and checksum inside the same file, atomically; returns that metadata."""
    meta = atlas.meta.to_json()
    meta["sites"] = list(atlas.sites)
    meta["n_tokens"] = atlas.n_tokens
    meta["format"] = FORMAT
    tensors = atlas.tensors()
    metadata = {METADATA_KEY: json.dumps(meta), **(extra_metadata or {})}
    meta["checksum"] = metadata[CHECKSUM_KEY] = tensor_checksum(tensors, metadata)  # atlas.json's copy is for people
    write_tensors(path, tensors, metadata)
    return meta


def save_atlas(atlas: Atlas, directory: str | Path, before_commit: Callable[[Atlas], None] | None = None) -> Path:
    """``atlas.safetensors``, then ``before_commit(atlas)`` (the exports), then ``atlas.json``."""
    directory = Path(directory)
    meta = write_atlas(atlas, directory / ATLAS_TENSORS)
    if before_commit is not None:
        before_commit(atlas)
    write_json(directory / ATLAS_JSON, meta)
    return directory


def is_committed(directory: str | Path) -> bool:
    """Whether the atlas in ``directory`` was finished: its ``atlas.json`` (written last) exists."""
    return (Path(directory) / ATLAS_JSON).is_file()


def commit_atlas(directory: str | Path, before_commit: Callable[[Atlas], None] | None = None) -> Atlas:
    """Finish an atlas whose run was killed after its tensors were written: exports, then ``atlas.json``."""
    directory = Path(directory)
    atlas, metadata = load_atlas_with_metadata(directory)
    if before_commit is not None:
        before_commit(atlas)
    write_json(directory / ATLAS_JSON, json.loads(metadata[METADATA_KEY]))
    return atlas


def load_atlas(path: str | Path, device: torch.device | str = "cpu") -> Atlas:
    """Read ``atlas.safetensors`` (a directory holding it, or the file itself)."""
    atlas, _ = load_atlas_with_metadata(path, device)
    return atlas


def read_header(path: str | Path) -> tuple[AtlasMeta, list[str]]:
    """The metadata and site names of an atlas file (or a folder holding ``atlas.safetensors``), without
    reading its tensors: enough to decide what a run may do with it."""
    file = Path(path)
    file = file / ATLAS_TENSORS if file.is_dir() else file
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        raw = json.loads(metadata[METADATA_KEY])
        return AtlasMeta.from_json(raw), list(raw.get("sites") or [])
    except Exception as error:  # noqa: BLE001 - safetensors raises several types on bad bytes
        raise AtlasError(
            f"{file} cannot be read ({type(error).__name__}: {error}); it was cut short or is not an atlas"
        ) from error


def load_atlas_with_metadata(path: str | Path, device: torch.device | str = "cpu") -> tuple[Atlas, dict[str, str]]:
    """The atlas and the raw safetensors metadata (which also holds a checkpoint's cursor)."""
    path = Path(path)
    file = path / ATLAS_TENSORS if path.is_dir() else path
    if not file.is_file():
        raise AtlasError(f"no atlas at {str(path)!r} (expected {ATLAS_TENSORS}); run `patchscope profile` first")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(file), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises several types on bad bytes
        raise AtlasError(
            f"{file} is not a readable atlas ({type(error).__name__}: {error}); it is damaged or was cut short"
        ) from error
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and tensor_checksum(tensors, metadata) != expected:
        raise AtlasError(
            f"{file} fails its checksum: its tensors or metadata changed after they were written (a flipped bit, a "
            "partial copy, an edit); profile again or restore the file"
        )
    if METADATA_KEY not in metadata:
        raise AtlasError(
            f"{file} holds tensors but no patchscope metadata ({METADATA_KEY!r}); it is not an atlas written by patchscope"
        )
    try:
        raw = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise AtlasError(f"{file}: its metadata is not valid JSON ({error})") from error
    if isinstance(raw, dict) and raw.get("format", 1) >= 2 and expected is None:
        raise AtlasError(f"{file} lost its checksum ({CHECKSUM_KEY!r}); it was damaged after it was written, profile again")
    if not isinstance(raw, dict) or not isinstance(raw.get("sites"), list) or not raw["sites"]:
        raise AtlasError(f"{file}: its metadata lists no `sites`, so its tensors cannot be read; profile again")
    sites = raw.pop("sites")
    meta = AtlasMeta.from_json(raw)
    stats = {}
    for site in sites:
        try:
            parse_site(reads_of(site))  # an SAE feature site is named after the site it reads
        except SiteError as error:
            raise AtlasError(f"{file}: {error}") from error
        top = TopK(*(_tensor(file, tensors, site, f.name) for f in dataclasses.fields(TopK)))
        moments = Moments(*(_tensor(file, tensors, site, f.name) for f in dataclasses.fields(Moments)))
        sums = ExactSum(tensors[f"{site}/sums"]) if f"{site}/sums" in tensors else None
        bottom, histogram, quantiles = optional_parts(tensors, site)
        stats[site] = SiteAtlas(top, moments, sums, bottom, histogram, quantiles)
        _check_site(file, site, stats[site], meta.top_k)
    return Atlas(meta, {site: s.to(device) for site, s in stats.items()}), metadata


def _tensor(file: Path, tensors: Mapping[str, torch.Tensor], site: str, name: str) -> torch.Tensor:
    key = f"{site}/{name}"
    if key not in tensors:
        raise AtlasError(f"{file} is missing the tensor {key!r}; the atlas is incomplete, profile again")
    tensor = tensors[key]
    if (name in _INTEGER_FIELDS) == tensor.dtype.is_floating_point or tensor.is_complex():
        raise AtlasError(
            f"{file}: tensor {key!r} has dtype {tensor.dtype}, expected {'an integer' if name in _INTEGER_FIELDS else 'a float'} dtype"
        )
    return tensor


def _check_site(file: Path, site: str, stats: SiteAtlas, top_k: int) -> None:
    """Shapes agree with each other and with ``top_k``; every value a reader will use is sane."""
    top, moments = stats.top, stats.moments
    shape = tuple(top.values.shape)
    if len(shape) != 2 or shape[0] != top_k:
        raise AtlasError(f"{file}: {site}/values has shape {shape}, expected [top_k={top_k}, neurons]")
    n = shape[1]
    for spec in dataclasses.fields(TopK):
        if tuple(getattr(top, spec.name).shape) != shape:
            raise AtlasError(f"{file}: {site}/{spec.name} has shape {tuple(getattr(top, spec.name).shape)}, expected {shape}")
    for spec in dataclasses.fields(Moments):
        want = () if spec.name == "n_tokens" else (n,)
        if tuple(getattr(moments, spec.name).shape) != want:
            raise AtlasError(
                f"{file}: {site}/{spec.name} has shape {tuple(getattr(moments, spec.name).shape)}, expected {list(want)}"
            )
    filled = top.doc >= 0
    if not torch.isfinite(top.values[filled]).all():
        raise AtlasError(
            f"{file}: {site}/values holds nan or inf among its recorded examples; the atlas is damaged, profile again"
        )
    if bool((top.doc < -1).any()) or bool((top.pos < 0).any()):
        raise AtlasError(f"{file}: {site} holds negative document or position indices; the atlas is damaged, profile again")
    if not (torch.isfinite(moments.total).all() and torch.isfinite(moments.total_sq).all()):
        raise AtlasError(f"{file}: {site} moments hold nan or inf; the atlas is damaged, profile again")


def optional_parts(tensors: Mapping[str, torch.Tensor], site: str) -> tuple:
    """Bottom-k, histogram and quantile examples where the file has them (older atlases do not)."""

    def group(cls, prefix: str):
        names = [f"{site}/{prefix}_{f.name}" for f in dataclasses.fields(cls)]
        return cls(*(tensors[name] for name in names)) if names[0] in tensors else None

    return group(TopK, "bottom"), tensors.get(f"{site}/histogram"), group(QuantileExamples, "quantile")
