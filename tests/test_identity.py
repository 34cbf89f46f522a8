"""Content identity of a run's inputs (`patchscope/util/identity.py`)."""

from __future__ import annotations


def test_hub_ids_are_identified_by_the_commit_the_cache_resolved(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from patchscope.util.identity import compare, path_identity

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    ref = tmp_path / "models--org--tiny" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text("a" * 40)
    then = path_identity("org/tiny")
    ref.write_text("b" * 40)
    now = path_identity("org/tiny")
    assert then == {"kind": "hub", "revision": "a" * 40}
    assert compare("the model org/tiny", then, now) == [f"the model org/tiny is now at commit {'b' * 12}; it was at {'a' * 12}"]
    assert path_identity("org/tiny", commit="c" * 40)["revision"] == "c" * 40  # the loaded model's own commit wins
    assert compare("x", {"kind": "hub", "revision": None}, now) == []  # unknown then: nothing to compare


def test_forgotten_hashes_are_computed_again(tmp_path):
    import os

    from patchscope.util.identity import forget_hashes, sha256_file

    path = tmp_path / "data.txt"
    path.write_text("aaaa")
    then, stat = sha256_file(path), path.stat()
    with open(path, "r+") as handle:  # the same inode, size and (restored) mtime: the cache cannot tell
        handle.write("bbbb")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_file(path) == then
    forget_hashes()
    assert sha256_file(path) != then
