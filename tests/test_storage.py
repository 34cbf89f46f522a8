"""Atomic writes (`patchscope/util/storage.py`): an ordinary file's mode, a durable rename, and only our own temp files cleaned."""

from __future__ import annotations

import json
import os
import stat

import pytest

from patchscope.util.storage import atomic_write, remove_stale_temp_files, write_json


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_mode_an_ordinary_write_would(tmp_path, umask):
    previous = os.umask(umask)
    try:
        ordinary = tmp_path / "ordinary.json"
        ordinary.write_text("{}")
        ours = write_json(tmp_path / "ours.json", {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(ours.stat().st_mode) == stat.S_IMODE(ordinary.stat().st_mode) == 0o666 & ~umask


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{}")
    path.chmod(0o640)
    write_json(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and json.loads(path.read_text()) == {"a": 1}


def test_atomic_write_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"1"))
    assert synced == [False, True]  # the file's data, then the folder entry


def test_only_our_own_temp_files_are_cleaned(tmp_path):
    ours = [".checkpoint.safetensors.k2j_x9a.tmp", ".tmpAb3xZ9", ".atlas.json.abc123.tmp"]
    theirs = [".tmpnotes.txt", "draft.tmp", ".tmp", "notes", ".tmpABCDEFG"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x")
    removed = {p.name for p in remove_stale_temp_files(tmp_path)}
    assert removed == set(ours) and sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)
