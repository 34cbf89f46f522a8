"""`patchscope.atlas.folder`: one owner decides what a run may do with an atlas folder, before any model loads."""

from __future__ import annotations

import ast
import os
import signal
from pathlib import Path

import pytest

from patchscope.atlas.atlas import AtlasError
from patchscope.atlas.config import ProfileConfig
from patchscope.atlas.folder import CHECKPOINT, Action, AtlasFolder, FolderRefused, Policy
from patchscope.atlas.key import Inputs, RunKey
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import SourceConfig
from patchscope.util.signals import Interrupted

ROOT = Path(__file__).resolve().parents[1]
LAYER = 2
SITE = f"blocks.{LAYER}.mlp.hook_post"
CONFIG = ProfileConfig(layer=LAYER, top_k=3, max_length=16, batch_tokens=48, checkpoint_every=1)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Rain fell on the mountains.", "In 1994 the committee met 3 times."]


@pytest.fixture
def corpus(tmp_path) -> SourceConfig:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(TEXTS * 3))
    return SourceConfig(dataset=str(path), split="")


def _key(gemma_dir, source: SourceConfig, config: ProfileConfig = CONFIG) -> RunKey:
    return RunKey.of(str(gemma_dir), source, config, "float32", Inputs.of(str(gemma_dir), source))


def _profile(gemma, gemma_dir, source, out, **kwargs):
    model, tokenizer = gemma
    return profile(model, tokenizer, source, CONFIG, out=out, model_name=str(gemma_dir), progress=False, **kwargs)


def _interrupted(gemma, gemma_dir, source, out, monkeypatch) -> None:
    """Leave ``out`` as a SIGINT after the second batch leaves it: a checkpoint, no atlas."""
    from patchscope.atlas.engine import Profiler

    fold, calls = Profiler.fold, []

    def fold_then_stop(self, rows, pad_id):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        fold(self, rows, pad_id)

    monkeypatch.setattr(Profiler, "fold", fold_then_stop)
    with pytest.raises(Interrupted):
        _profile(gemma, gemma_dir, source, out)
    monkeypatch.setattr(Profiler, "fold", fold)


def test_each_state_of_a_folder_gets_its_plan(gemma, gemma_dir, corpus, tmp_path, monkeypatch):
    key = _key(gemma_dir, corpus)
    assert AtlasFolder(tmp_path / "new").plan(key).action is Action.FRESH

    _interrupted(gemma, gemma_dir, corpus, tmp_path / "cut", monkeypatch)
    with pytest.raises(FolderRefused, match="pass `resume` to continue it"):
        AtlasFolder(tmp_path / "cut").plan(key)
    resumed = AtlasFolder(tmp_path / "cut").plan(key, Policy(resume=True))
    assert resumed.action is Action.RESUME and resumed.cursor is not None and resumed.cursor.batches_done == 2
    with pytest.raises(AtlasError, match="made with other settings"):
        AtlasFolder(tmp_path / "cut").plan(
            _key(gemma_dir, corpus, ProfileConfig(**{**CONFIG.__dict__, "top_k": 4})), Policy(resume=True)
        )

    _profile(gemma, gemma_dir, corpus, tmp_path / "done")
    with pytest.raises(FolderRefused, match="already holds an atlas"):
        AtlasFolder(tmp_path / "done").plan(key)
    assert AtlasFolder(tmp_path / "done").plan(key, Policy(reuse=True, sites=(SITE,))).action is Action.REUSE
    (tmp_path / "done" / "atlas.json").unlink()  # as a run killed while writing its exports leaves it
    assert AtlasFolder(tmp_path / "done").plan(key).action is Action.FINISH
    with pytest.raises(AtlasError, match="unfinished atlas"):
        AtlasFolder(tmp_path / "done").plan(_key(gemma_dir, corpus, ProfileConfig(**{**CONFIG.__dict__, "max_length": 12})))


def test_reuse_names_what_differs_and_what_is_missing(gemma, gemma_dir, corpus, tmp_path):
    _profile(gemma, gemma_dir, corpus, tmp_path / "done")
    folder = AtlasFolder(tmp_path / "done")
    other = _key(gemma_dir, corpus, ProfileConfig(**{**CONFIG.__dict__, "max_length": 12}))
    with pytest.raises(FolderRefused, match=r"other settings or inputs: `max_length` was 16, this run asks for 12"):
        folder.plan(other, Policy(reuse=True))
    wanted = ("blocks.1.hook_resid_pre", SITE)
    with pytest.raises(
        FolderRefused, match=r"lacks the site blocks.1.hook_resid_pre this run needs \(it has blocks.2.mlp.hook_post\)"
    ):
        folder.plan(_key(gemma_dir, corpus), Policy(reuse=True, sites=wanted))
    plan = folder.plan(_key(gemma_dir, corpus), Policy(reuse=True, sites=wanted, optional_sites=("blocks.1.hook_resid_pre",)))
    assert plan.action is Action.REUSE and plan.missing_sites == ("blocks.1.hook_resid_pre",)
    # top-k and batching change how the state was kept, not the examples: the atlas still serves
    assert (
        folder.plan(_key(gemma_dir, corpus, ProfileConfig(layer=LAYER, max_length=16)), Policy(reuse=True)).action is Action.REUSE
    )


def test_planning_reads_no_tensors(gemma, gemma_dir, corpus, tmp_path, monkeypatch):
    """The plan is made from metadata: it must not cost a load of the atlas (or a model)."""
    import patchscope.atlas.store as store

    _profile(gemma, gemma_dir, corpus, tmp_path / "done")

    def refuse(*args, **kwargs):
        raise AssertionError("the plan loaded tensors")

    monkeypatch.setattr(store, "load_file", refuse)
    assert AtlasFolder(tmp_path / "done").plan(_key(gemma_dir, corpus), Policy(reuse=True)).action is Action.REUSE


def test_only_the_folder_decides():
    """No module but `atlas/folder.py` (and `atlas/store.py`, which writes the files) reads the folder's state."""
    owners = {ROOT / "patchscope" / "atlas" / "folder.py", ROOT / "patchscope" / "atlas" / "store.py"}
    deciding = {"is_committed", "commit_atlas", "ATLAS_JSON", "check_checkpoints", "CHECKPOINT"}
    offenders = []
    for path in (ROOT / "patchscope").rglob("*.py"):
        if path in owners:
            continue
        names = {n.id for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) for a in n.names}
        offenders += [f"{path.relative_to(ROOT)}: {name}" for name in sorted(names & deciding)]
    assert offenders == []
    assert CHECKPOINT == "checkpoint.safetensors"
