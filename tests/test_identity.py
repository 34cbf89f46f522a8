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


def test_an_embedded_model_is_its_package_version_and_gguf_sha256(tmp_path, monkeypatch):
    import hashlib
    from importlib.metadata import version

    from patchscope.atlas.key import Inputs
    from patchscope.model import loading
    from patchscope.util.identity import compare

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF and some weights")
    preset = loading.ModelPreset("org/tiny", None, "tiny", lambda: gguf, "pytest")  # any installed distribution
    monkeypatch.setitem(loading.PRESETS, "tiny-embedded", preset)
    then = Inputs.of("tiny-embedded", None).model
    sha = hashlib.sha256(b"GGUF and some weights").hexdigest()
    assert then == {"kind": "package", "package": "pytest", "version": version("pytest"), "file": "tiny.gguf", "sha256": sha}
    assert compare("the model", then, then) == [] and compare("the model", {"kind": "hub", "revision": None}, then) == []
    gguf.write_bytes(b"other weights")
    (change,) = compare("the model", then, Inputs.of("tiny-embedded", None).model)
    assert change.startswith(f"the model changed: pytest {version('pytest')} (tiny.gguf, sha256 {sha[:12]}) then")
