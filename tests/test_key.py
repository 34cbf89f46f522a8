"""`patchscope.atlas.key`: one key says whether two runs are the same, on settings as resolved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import FIXTURE_CORPUS

from patchscope.atlas.key import Inputs, RunKey, canonical_split
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.sources import SourceConfig
from patchscope.cli.main import main

LAYER = 2
SITE3 = "blocks.3.mlp.hook_post"


def _key(source: SourceConfig, config: ProfileConfig = ProfileConfig(layer=LAYER), dtype: str = "float32") -> RunKey:
    return RunKey.of("m", source, config, dtype, Inputs.of("m", source))


@pytest.mark.parametrize("split", [None, "", "[0:]", "[:]", "train", "train[0:]", " train[0:] "])
def test_every_spelling_of_all_rows_is_one_key(split):
    assert canonical_split(split if split is not None else "") == "train[0:]"
    one, other = _key(SourceConfig("data.jsonl", split=None)), _key(SourceConfig("data.jsonl", split=split))
    assert one.fingerprint == other.fingerprint and one.reuse_changes(other) == []


def test_equivalent_settings_share_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"text": "a"}\n')
    pairs = [
        (SourceConfig("data.jsonl", split="[0:300]"), SourceConfig("data.jsonl", split="[:300]")),
        (SourceConfig("data.jsonl"), SourceConfig(str(tmp_path / "data.jsonl"))),  # a local file is known by its content
        (SourceConfig("data.jsonl"), SourceConfig("./data.jsonl", streaming=True)),
        (SourceConfig("NeelNanda/pile-10k"), SourceConfig("NeelNanda/pile-10k", split="train[100:250]")),  # its default slice
    ]
    for first, second in pairs:
        assert _key(first).fingerprint == _key(second).fingerprint, (first, second)
        assert _key(first).reuse_changes(_key(second)) == [], (first, second)
    source = SourceConfig("data.jsonl")
    configs = [
        (ProfileConfig(layer=3), ProfileConfig(sites=(SITE3,))),
        (ProfileConfig(sites=("blocks.1.hook_resid_pre", SITE3)), ProfileConfig(sites=(SITE3, "blocks.1.hook_resid_pre"))),
        (ProfileConfig(checkpoint_every=1), ProfileConfig(checkpoint_every=50)),
    ]  # fmt: skip
    for first_config, second_config in configs:
        assert _key(source, first_config).fingerprint == _key(source, second_config).fingerprint


def test_real_differences_are_named():
    base = _key(SourceConfig("data.jsonl", split="[0:10]"))
    changed = {
        "`split` was '[0:10]', this run asks for '[0:11]'": _key(SourceConfig("data.jsonl", split="[0:11]")),
        "`text_column` was 'text', this run asks for 'body'": _key(
            SourceConfig("data.jsonl", split="[0:10]", text_column="body")
        ),
        "`max_length` was 128, this run asks for 64": _key(
            SourceConfig("data.jsonl", split="[0:10]"), ProfileConfig(max_length=64)
        ),
        "`dtype` was 'float32', this run asks for 'bfloat16'": _key(SourceConfig("data.jsonl", split="[0:10]"), dtype="bfloat16"),
        "it was made with the data 'data.jsonl', not 'other.jsonl'": _key(SourceConfig("other.jsonl", split="[0:10]")),
    }
    for message, key in changed.items():
        assert key.reuse_changes(base) == [message]
        assert key.fingerprint != base.fingerprint
    # statistics change what a checkpoint holds, not what the examples are: resumable only with the same
    more = _key(SourceConfig("data.jsonl", split="[0:10]"), ProfileConfig(top_k=5))
    assert more.reuse_changes(base) == [] and more.fingerprint != base.fingerprint


def _write_corpus(path: Path) -> Path:
    path.write_text("\n".join(json.dumps({"text": t}) for t in FIXTURE_CORPUS if t))
    return path


def _flags(gemma_dir: Path, data: Path, out: Path, split: str | None) -> list[str]:
    flags = ["--model", str(gemma_dir), "--device", "cpu", "--dataset", str(data), "--layer", str(LAYER)]
    flags += ["--max-length", "16", "--out", str(out)]
    return flags + (["--split", split] if split is not None else [])


@pytest.mark.parametrize("profiled, ran", [(None, None), ("", None), (None, "[0:]")])
def test_run_reuses_the_atlas_profile_made_whatever_the_spelling_of_its_split(gemma_dir, tmp_path, capsys, profiled, ran):
    """Issue 19, bug 1: ``profile`` and then ``run`` on a local file, with no ``--split`` on either, reuse."""
    data, out = _write_corpus(tmp_path / "corpus.jsonl"), tmp_path / "out"
    assert main(["profile", *_flags(gemma_dir, data, out, profiled)]) == 0
    before = (out / "atlas.safetensors").read_bytes()
    assert main(["run", *_flags(gemma_dir, data, out, ran), "--sae", "none", "--max-new-tokens", "2"]) == 0, (
        capsys.readouterr().err
    )
    results = json.loads((out / "results.json").read_text())
    assert results["atlas"]["reused"] is True and "profile" not in results["timings"]
    assert (out / "atlas.safetensors").read_bytes() == before


def test_run_refuses_an_atlas_of_another_split_and_says_what_changed(gemma_dir, tmp_path, capsys):
    data, out = _write_corpus(tmp_path / "corpus.jsonl"), tmp_path / "out"
    assert main(["profile", *_flags(gemma_dir, data, out, None)]) == 0
    capsys.readouterr()
    assert main(["run", *_flags(gemma_dir, data, out, "[0:5]"), "--sae", "none"]) == 2
    error = capsys.readouterr().err
    assert "holds an atlas made with other settings or inputs: --split was '[0:]', this run asks for '[0:5]'" in error
    assert not (out / "results.json").exists()


def test_more_equivalent_spellings():
    assert canonical_split("[0:5]+[7:10]") == "train[0:5]+train[7:10]"  # a merged atlas's slices
    local = SourceConfig("data.jsonl", split="validation[0:10]")  # a local file has no split names
    assert _key(local).fingerprint == _key(SourceConfig("data.jsonl", split="[0:10]")).fingerprint
    hub = SourceConfig("some/dataset", split="validation[0:10]")
    assert _key(hub).fingerprint != _key(SourceConfig("some/dataset", split="[0:10]")).fingerprint
    preset = RunKey.of("gemma-2-2b", SourceConfig("d.jsonl"), ProfileConfig(), "float32", Inputs())
    hub_id = RunKey.of("google/gemma-2-2b", SourceConfig("d.jsonl"), ProfileConfig(), "float32", Inputs())
    assert preset.fingerprint == hub_id.fingerprint and hub_id.reuse_changes(preset) == []
    txt, other_column = SourceConfig("notes.txt"), SourceConfig("notes.txt", text_column="body")  # a .txt has no columns
    assert _key(txt).fingerprint == _key(other_column).fingerprint
    assert _key(txt).reuse_changes(_key(SourceConfig("notes.txt", txt_mode="file"))) == [
        "`txt_mode` was 'file', this run asks for 'lines'"
    ]


def test_an_input_recorded_without_an_identity_is_compared_by_its_name(tmp_path):
    """Atlases written before content identities (or merged by an older `merge`) recorded none."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a"}\n')
    source = SourceConfig(str(data))
    now = RunKey.of(str(tmp_path), source, ProfileConfig(), "float32", Inputs.of(str(tmp_path), source))
    then = RunKey.of(str(tmp_path), source, ProfileConfig(), "float32", Inputs())
    assert now.model == "<local>" and then.model != "<local>"
    assert now.reuse_changes(then) == []
    elsewhere = RunKey.of("other/model", SourceConfig("x.jsonl"), ProfileConfig(), "float32", Inputs())
    assert now.reuse_changes(elsewhere) == [
        f"it was made with the model 'other/model', not {str(tmp_path)!r}",
        f"it was made with the data 'x.jsonl', not {str(data)!r}",
    ]
