"""Content identity of a run's inputs, so a changed file is never mistaken for the one profiled.

A path says where data was, not what it was. An atlas (and a checkpoint) records, for each input:

- a local file: its size and sha256 (streamed, so any size works);
- a local folder (a model, a data folder): each file's size and sha256, or size and modification
  time for files above `HASH_LIMIT` (weights of billions of parameters would take minutes to hash);
- a hub id: the commit the local HF cache resolved it to, when known;
- a model embedded in a pip package (``gemma-3-270m``): the package, its version, and the GGUF file's
  name and sha256.

`compare` lists what differs in words, for a refusal message.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

HASH_LIMIT = 256 * 2**20
"""Files up to this size are hashed; larger ones are identified by size and modification time."""
_CHUNK = 2**20

Identity = dict[str, Any]


_HASHED: dict[tuple, str] = {}
"""sha256 by (path, inode, size, mtime): a run checks the same inputs several times, hashing them once."""


def sha256_file(path: str | Path) -> str:
    info = os.stat(path)
    key = (str(Path(path).resolve()), info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def forget_hashes() -> None:
    """Forget every file hash this process computed, so the next check reads each file again, as a new process does."""
    _HASHED.clear()


def file_identity(path: str | Path) -> Identity:
    path = Path(path)
    return {"kind": "file", "size": path.stat().st_size, "sha256": sha256_file(path)}


def folder_identity(path: str | Path) -> Identity:
    path = Path(path)
    files = {}
    for file in sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ):
        info = file.stat()
        key = str(file.relative_to(path))
        if info.st_size <= HASH_LIMIT:
            files[key] = f"{info.st_size} bytes, sha256 {sha256_file(file)}"
        else:
            files[key] = f"{info.st_size} bytes, modified {info.st_mtime_ns}"
    return {"kind": "folder", "files": files}


def hub_revision(repo_id: str, repo_type: str = "model", revision: str = "main") -> str | None:
    """The commit hash the local HF cache holds for ``repo_id`` at ``revision``, if it has one."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        from huggingface_hub.file_download import repo_folder_name

        ref = Path(HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "refs" / revision
        return ref.read_text().strip() or None
    except (OSError, ImportError, ValueError):
        return None


def path_identity(name: str, repo_type: str = "model", commit: str | None = None) -> Identity:
    """The identity of a model or dataset given as a local file, a local folder or a hub id."""
    path = Path(name)
    if path.is_file():
        return file_identity(path)
    if path.is_dir():
        return folder_identity(path)
    return {"kind": "hub", "revision": commit or hub_revision(name, repo_type)}


def package_identity(package: str, file: str | Path) -> Identity:
    """A model file shipped in (or assembled from) the pip package ``package``."""
    from importlib.metadata import version

    path = Path(file)
    return {"kind": "package", "package": package, "version": version(package), "file": path.name, "sha256": sha256_file(path)}


def compare(label: str, recorded: Identity | None, current: Identity | None) -> list[str]:
    """What changed in ``label`` between two identities, in words; empty when nothing did (or it cannot be told)."""
    if not recorded or not current:
        return []
    if recorded.get("kind") == "hub" and current.get("kind") == "package":
        return []  # recorded before embedded models had their own identity: nothing to compare
    if current.get("kind") == "package" and recorded.get("kind") == "package":
        if recorded.get("sha256") == current.get("sha256"):
            return []
        return [
            f"{label} changed: {recorded.get('package')} {recorded.get('version')} ({recorded.get('file')}, sha256 "
            f"{str(recorded.get('sha256'))[:12]}) then; {current['version']} (sha256 {current['sha256'][:12]}) now"
        ]
    if recorded.get("kind") in ("file", "folder") and current.get("kind") == "hub":
        return [f"{label} is no longer there (it was a local {recorded['kind']})"]
    if recorded.get("kind") != current.get("kind"):
        return [f"{label} was a {recorded.get('kind')} and is now a {current.get('kind')}"]
    kind = current["kind"]
    if kind == "file":
        if recorded == current:
            return []
        return [
            f"{label} changed: {recorded['size']} bytes, sha256 {recorded['sha256'][:12]} then; "
            f"{current['size']} bytes, sha256 {current['sha256'][:12]} now"
        ]
    if kind == "folder":
        old, new = recorded["files"], current["files"]
        changes = [f"{name} is new" for name in new.keys() - old.keys()]
        changes += [f"{name} is gone" for name in old.keys() - new.keys()]
        changes += [f"{name} changed" for name in old.keys() & new.keys() if old[name] != new[name]]
        return [f"{label} changed: {', '.join(sorted(changes))}"] if changes else []
    if recorded.get("revision") and current.get("revision") and recorded["revision"] != current["revision"]:
        return [f"{label} is now at commit {current['revision'][:12]}; it was at {recorded['revision'][:12]}"]
    return []
