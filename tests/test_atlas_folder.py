"""An atlas folder (`patchscope.atlas.folder`): reuse, resume, finish or refuse, with the reason, before a model loads.

One owner decides; a changed input is never mistaken for the profiled one, `run` reuses an atlas
`profile` made, and earlier results are never overwritten.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
from run_inputs import TEXTS, ctrl_c_at_batch, profile_argv, write_corpus

from patchscope import PatchscopeConfig
from patchscope.atlas.atlas import AtlasError
from patchscope.atlas.folder import CHECKPOINT, Action, AtlasFolder, FolderRefused, Policy
from patchscope.atlas.key import Inputs, RunKey
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import SourceConfig
from patchscope.atlas.store import ATLAS_TENSORS
from patchscope.cli.main import main
from patchscope.experiment import ExperimentConfig, run_experiment
from patchscope.util.signals import Interrupted

LAYER = 2
SITE = f"blocks.{LAYER}.mlp.hook_post"
ROOT = Path(__file__).resolve().parents[1]
PLAN_CONFIG = ProfileConfig(layer=LAYER, top_k=3, max_length=16, batch_tokens=48, checkpoint_every=1)
SHORT_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Rain fell on the mountains.",
    "In 1994 the committee met 3 times.",
]


def _config(gemma_dir, corpus, out, **changes):
    base = dict(
        model=str(gemma_dir),
        device="cpu",
        out=str(out),
        sae="none",
        source=SourceConfig(dataset=str(corpus), split=""),
        profile=ProfileConfig(layer=LAYER, max_length=16),
        patchscope=PatchscopeConfig(max_new_tokens=2),
    )
    base.update(changes)
    return ExperimentConfig(**base)


def test_a_rewritten_data_file_is_not_reused(gemma_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    run_experiment(_config(gemma_dir, corpus, tmp_path / "o"), progress=False)
    write_corpus(corpus, TEXTS * 2)  # 14 -> 28 rows, same path
    with pytest.raises(
        FileExistsError, match=r"the data .*corpus.jsonl changed: \d+ bytes, sha256 \w+ then; \d+ bytes, sha256 \w+ now"
    ):
        run_experiment(_config(gemma_dir, corpus, tmp_path / "o"), progress=False)


def test_a_replaced_model_folder_is_not_reused(gemma_dir, tmp_path):
    from factories import tiny_gemma2

    model_dir = shutil.copytree(gemma_dir, tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    run_experiment(_config(model_dir, corpus, tmp_path / "o"), progress=False)
    shutil.rmtree(model_dir)
    tiny_gemma2(model_dir, seed=5)  # other weights at the same path
    with pytest.raises(FileExistsError, match=r"the model .*model changed: model.safetensors changed"):
        run_experiment(_config(model_dir, corpus, tmp_path / "o"), progress=False)


def test_resume_refuses_data_that_changed_since_the_checkpoint(gemma, tmp_path, monkeypatch):

    model, tokenizer = gemma
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(TEXTS * 2))
    source = SourceConfig(dataset=str(data), split="")
    config = ProfileConfig(layer=LAYER, top_k=2, max_length=16, batch_tokens=48, checkpoint_every=1)
    with ctrl_c_at_batch(2), pytest.raises(Interrupted):
        profile(model, tokenizer, source, config, out=tmp_path / "o", progress=False)
    data.write_text("\n".join(t.upper() for t in TEXTS * 2))  # same size, other texts
    with pytest.raises(
        AtlasError, match=r"made from other inputs: the data .*corpus.txt changed.*Resuming would mix old and new data"
    ):
        profile(model, tokenizer, source, config, out=tmp_path / "o", resume=True, progress=False)


def test_run_reuses_an_atlas_made_by_profile_and_recomputes_only_the_corpus_mean(gemma, gemma_dir, tmp_path):
    model, tokenizer = gemma
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    out = tmp_path / "profiled"
    profile(
        model,
        tokenizer,
        SourceConfig(dataset=str(corpus), split=""),
        ProfileConfig(layer=LAYER, max_length=16, top_k=5),
        out=out,
        model_name=str(gemma_dir),
        progress=False,
    )
    before = (out / ATLAS_TENSORS).read_bytes()
    reused = run_experiment(_config(gemma_dir, corpus, out), progress=False)
    fresh = run_experiment(_config(gemma_dir, corpus, tmp_path / "fresh"), progress=False)
    assert reused.atlas.reused is True and "profile" not in reused.timings and "corpus_mean" in reused.timings
    assert any("corpus mean was computed in this run" in note for note in reused.notes)
    assert (out / ATLAS_TENSORS).read_bytes() == before
    (mine,), (theirs,) = reused.neurons, fresh.neurons
    assert mine.neuron == theirs.neuron
    for label in ("patched", "corpus_mean"):
        ours = mine.patched if label == "patched" else mine.controls[label]
        want = theirs.patched if label == "patched" else theirs.controls[label]
        assert ours.at_placeholder == pytest.approx(want.at_placeholder, abs=1e-4)


def test_run_names_exactly_what_a_reused_atlas_lacks(gemma, gemma_dir, tmp_path, monkeypatch):
    model, tokenizer = gemma
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    out = tmp_path / "profiled"
    profile(
        model,
        tokenizer,
        SourceConfig(dataset=str(corpus), split=""),
        ProfileConfig(layer=1, max_length=16),
        out=out,
        model_name=str(gemma_dir),
        progress=False,
    )
    monkeypatch.setattr("patchscope.experiment.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(FileExistsError, match=rf"lacks the site {SITE} this run needs \(it has blocks.1.mlp.hook_post\)"):
        run_experiment(_config(gemma_dir, corpus, out), progress=False)
    with pytest.raises(FileExistsError, match=r"`max_length` was 16, this run asks for 12"):
        run_experiment(_config(gemma_dir, corpus, out, profile=ProfileConfig(layer=1, max_length=12)), progress=False)


def test_a_run_with_other_patchscope_settings_keeps_the_earlier_results(gemma_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    out = tmp_path / "o"
    first = run_experiment(_config(gemma_dir, corpus, out), progress=False)
    kept = (out / "results.json").read_text()
    second = run_experiment(_config(gemma_dir, corpus, out, patchscope=PatchscopeConfig(max_new_tokens=3)), progress=False)
    assert first.results_file == str(out / "results.json") and (out / "results.json").read_text() == kept
    assert Path(second.results_file).name.startswith("results-") and Path(second.results_file).exists()
    assert json.loads(Path(second.results_file).read_text())["config"]["patchscope"]["max_new_tokens"] == 3
    again = run_experiment(_config(gemma_dir, corpus, out, patchscope=PatchscopeConfig(max_new_tokens=3)), progress=False)
    assert again.results_file == second.results_file  # the same settings write the same file


def test_run_refuses_to_resume_a_checkpoint_of_other_data_before_loading(gemma_dir, tmp_path, monkeypatch):

    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS * 3)
    config = _config(
        gemma_dir, corpus, tmp_path / "o", profile=ProfileConfig(layer=LAYER, max_length=16, batch_tokens=48, checkpoint_every=1)
    )
    with ctrl_c_at_batch(2), pytest.raises(Interrupted, match="rerun the same command to continue from it"):
        run_experiment(config, progress=False)
    write_corpus(corpus, TEXTS[::-1] * 3)
    monkeypatch.setattr("patchscope.experiment.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(AtlasError, match="made from other inputs: the data .*corpus.jsonl changed"):
        run_experiment(config, progress=False)


def test_a_truncated_checkpoint_says_exactly_what_to_do(gemma_dir, tmp_path, capsys):
    data = write_corpus(tmp_path / "c.jsonl", TEXTS)
    out = tmp_path / "out"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')  # cut short mid-header
    argv = profile_argv(gemma_dir, data, out, "--layer", "1", "--max-length", "16", "--resume")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Delete it and run the same command without --resume to start over" in err and str(out / CHECKPOINT) in err


def test_a_failed_model_load_leaves_no_empty_out(tmp_path, gemma_dir, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)

    def broken(*args, **kwargs):
        raise OSError("disk read error")

    monkeypatch.setattr("patchscope.experiment.load_model", broken)
    with pytest.raises(OSError, match="disk read error"):
        run_experiment(_config(gemma_dir, corpus, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


# -- the plan itself


@pytest.fixture
def plain_corpus(tmp_path) -> SourceConfig:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SHORT_TEXTS * 3))
    return SourceConfig(dataset=str(path), split="")


def _key(gemma_dir, source: SourceConfig, config: ProfileConfig = PLAN_CONFIG) -> RunKey:
    return RunKey.of(str(gemma_dir), source, config, "float32", Inputs.of(str(gemma_dir), source))


def _profile(gemma, gemma_dir, source, out, **kwargs):
    model, tokenizer = gemma
    return profile(model, tokenizer, source, PLAN_CONFIG, out=out, model_name=str(gemma_dir), progress=False, **kwargs)


def test_each_state_of_a_folder_gets_its_plan(gemma, gemma_dir, plain_corpus, tmp_path):
    key = _key(gemma_dir, plain_corpus)
    assert AtlasFolder(tmp_path / "new").plan(key).action is Action.FRESH

    with ctrl_c_at_batch(2), pytest.raises(Interrupted):  # leaves a checkpoint and no atlas
        _profile(gemma, gemma_dir, plain_corpus, tmp_path / "cut")
    with pytest.raises(FolderRefused, match="pass `resume` to continue it"):
        AtlasFolder(tmp_path / "cut").plan(key)
    resumed = AtlasFolder(tmp_path / "cut").plan(key, Policy(resume=True))
    assert resumed.action is Action.RESUME and resumed.cursor is not None and resumed.cursor.batches_done == 2
    with pytest.raises(AtlasError, match="made with other settings"):
        AtlasFolder(tmp_path / "cut").plan(
            _key(gemma_dir, plain_corpus, ProfileConfig(**{**PLAN_CONFIG.__dict__, "top_k": 4})), Policy(resume=True)
        )

    _profile(gemma, gemma_dir, plain_corpus, tmp_path / "done")
    with pytest.raises(FolderRefused, match="already holds an atlas"):
        AtlasFolder(tmp_path / "done").plan(key)
    assert AtlasFolder(tmp_path / "done").plan(key, Policy(reuse=True, sites=(SITE,))).action is Action.REUSE
    (tmp_path / "done" / "atlas.json").unlink()  # as a run killed while writing its exports leaves it
    assert AtlasFolder(tmp_path / "done").plan(key).action is Action.FINISH
    with pytest.raises(AtlasError, match="unfinished atlas"):
        AtlasFolder(tmp_path / "done").plan(
            _key(gemma_dir, plain_corpus, ProfileConfig(**{**PLAN_CONFIG.__dict__, "max_length": 12}))
        )


def test_reuse_names_what_differs_and_what_is_missing(gemma, gemma_dir, plain_corpus, tmp_path):
    _profile(gemma, gemma_dir, plain_corpus, tmp_path / "done")
    folder = AtlasFolder(tmp_path / "done")
    other = _key(gemma_dir, plain_corpus, ProfileConfig(**{**PLAN_CONFIG.__dict__, "max_length": 12}))
    with pytest.raises(FolderRefused, match=r"other settings or inputs: `max_length` was 16, this run asks for 12"):
        folder.plan(other, Policy(reuse=True))
    wanted = ("blocks.1.hook_resid_pre", SITE)
    with pytest.raises(
        FolderRefused, match=r"lacks the site blocks.1.hook_resid_pre this run needs \(it has blocks.2.mlp.hook_post\)"
    ):
        folder.plan(_key(gemma_dir, plain_corpus), Policy(reuse=True, sites=wanted))
    plan = folder.plan(
        _key(gemma_dir, plain_corpus), Policy(reuse=True, sites=wanted, optional_sites=("blocks.1.hook_resid_pre",))
    )
    assert plan.action is Action.REUSE and plan.missing_sites == ("blocks.1.hook_resid_pre",)
    # top-k and batching change how the state was kept, not the examples: the atlas still serves
    assert (
        folder.plan(_key(gemma_dir, plain_corpus, ProfileConfig(layer=LAYER, max_length=16)), Policy(reuse=True)).action
        is Action.REUSE
    )


def test_planning_reads_no_tensors(gemma, gemma_dir, plain_corpus, tmp_path, monkeypatch):
    """The plan is made from metadata: it must not cost a load of the atlas (or a model)."""
    import patchscope.atlas.store as store

    _profile(gemma, gemma_dir, plain_corpus, tmp_path / "done")

    def refuse(*args, **kwargs):
        raise AssertionError("the plan loaded tensors")

    monkeypatch.setattr(store, "load_file", refuse)
    assert AtlasFolder(tmp_path / "done").plan(_key(gemma_dir, plain_corpus), Policy(reuse=True)).action is Action.REUSE


def _folder_state_reads(path: Path) -> set[str]:
    """The names of ours that read or write an atlas folder's state, used in ``path`` (names, attributes, imports)."""
    deciding = {"is_committed", "commit_atlas", "ATLAS_JSON", "ATLAS_TENSORS", "check_checkpoints", "CHECKPOINT"}
    tree = ast.parse(path.read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    return names & deciding


def test_only_the_folder_decides(tmp_path):
    """No module but `atlas/folder.py` (and `atlas/store.py`, which writes the files) reads the folder's state."""
    owners = {ROOT / "patchscope" / "atlas" / "folder.py", ROOT / "patchscope" / "atlas" / "store.py"}
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "patchscope").rglob("*.py"))
        if path not in owners
        for name in sorted(_folder_state_reads(path))
    ]
    assert offenders == []
    probe = tmp_path / "probe.py"  # the check can fail: a second decider, by attribute or by import
    probe.write_text(
        "from patchscope.atlas import distributed, store\nstore.is_committed(out)\ndistributed.check_checkpoints(out)\n"
    )
    assert _folder_state_reads(probe) == {"is_committed", "check_checkpoints"}
    assert CHECKPOINT == "checkpoint.safetensors"
