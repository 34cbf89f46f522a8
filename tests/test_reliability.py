"""No silent wrong results, no lost runs, no tracebacks: each test here failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import child_runs
import pytest
import torch
from factories import FIXTURE_CORPUS

from patchscope import PatchscopeConfig
from patchscope.atlas.atlas import Atlas, AtlasError
from patchscope.atlas.config import ProfileConfig
from patchscope.atlas.run import CHECKPOINT, profile
from patchscope.atlas.sources import SourceConfig
from patchscope.atlas.store import ATLAS_JSON, ATLAS_TENSORS, CHECKSUM_KEY, METADATA_KEY, load_atlas
from patchscope.cli.main import main
from patchscope.experiment import ExperimentConfig, run_experiment
from patchscope.util.lock import LOCK_FILE, OutputBusyError, output_lock
from patchscope.util.signals import Interrupted
from patchscope.util.storage import atomic_write, remove_stale_temp_files, write_json

LAYER = 2
SITE = f"blocks.{LAYER}.mlp.hook_post"
TEXTS = [t for t in FIXTURE_CORPUS if t]


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    return path


def profile_argv(model_dir: Path, data: Path, out: Path, *flags: str) -> list[str]:
    """``patchscope profile`` of ``data`` (every row) on the CPU into ``out``, plus ``flags``."""
    return [
        "profile",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--dataset",
        str(data),
        "--split",
        "",
        *flags,
        "--out",
        str(out),
    ]


# -- atomic writes


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


# -- one writer per output folder


HOLDER = """
import sys
from patchscope.util.lock import output_lock
with output_lock(sys.argv[1]):
    print("READY", flush=True)
    sys.stdin.readline()
"""


def test_a_second_run_on_a_locked_folder_is_refused_and_the_lock_dies_with_its_process(gemma_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "READY"  # it holds the lock now
    with pytest.raises(OutputBusyError, match=rf"another patchscope run \(pid {holder.pid}\) is writing to"):
        with output_lock(out):
            pass
    data = write_corpus(tmp_path / "c.jsonl", TEXTS)
    argv = profile_argv(gemma_dir, data, out, "--layer", "1", "--max-length", "16")
    assert main(argv) == 2
    assert "another patchscope run" in capsys.readouterr().err and not (out / ATLAS_TENSORS).exists()
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    holder.wait()
    with output_lock(out):
        assert (out / LOCK_FILE).exists()
    assert list(out.iterdir()) == []  # no lock file is left behind


def test_a_lock_taken_on_a_new_folder_removes_it_when_nothing_was_written(tmp_path):
    with output_lock(tmp_path / "new" / "out"):
        pass
    assert not (tmp_path / "new" / "out").exists()


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with output_lock(tmp_path / "o"), output_lock(tmp_path / "o"):
        (tmp_path / "o" / "kept").write_text("x")
    assert (tmp_path / "o" / "kept").exists() and not (tmp_path / "o" / LOCK_FILE).exists()


# -- SIGINT / SIGTERM: finish the batch, checkpoint, one line, 130 / 143


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_prints_one_line(gemma_dir, tmp_path, signum, code, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(TEXTS * 3))
    out = tmp_path / "out"
    argv = profile_argv(
        gemma_dir,
        data,
        out,
        "--dtype",
        "float32",
        "--layer",
        str(LAYER),
        "--top-k",
        "3",
        "--max-length",
        "16",
        "--batch-tokens",
        "48",
        "--checkpoint-every",
        "50",
    )
    child = child_runs.start("before_batch", 3, argv)  # two batches folded, the third about to start
    child.send_signal(signum)
    returncode, err = child_runs.go_on(child)
    lines = [line for line in err.splitlines() if line.startswith("patchscope")]  # besides the progress bars
    assert returncode == code, err
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"patchscope profile: interrupted ({name}) after 3 batches (")
    assert lines[0].endswith(f"checkpoint saved to {out / CHECKPOINT}; rerun the same command with --resume")
    documents = int(lines[0].split("batches (")[1].split()[0])
    assert main(argv + ["--resume"]) == 0
    assert f"resuming after 3 batches ({documents} documents)" in capsys.readouterr().err
    assert load_atlas(out).meta.extra["resumed_after_batches"] == 3


def test_library_profile_raises_interrupted_after_checkpointing(gemma, tmp_path, monkeypatch):
    from patchscope.atlas.engine import Profiler

    model, tokenizer = gemma
    fold, calls = Profiler.fold, []

    def fold_then_ctrl_c(self, rows, pad_id):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        fold(self, rows, pad_id)

    monkeypatch.setattr(Profiler, "fold", fold_then_ctrl_c)
    config = ProfileConfig(layer=LAYER, top_k=2, max_length=16, batch_tokens=48, checkpoint_every=0)
    with pytest.raises(Interrupted) as stopped:
        profile(model, tokenizer, TEXTS * 2, config, out=tmp_path / "o", progress=False)
    assert stopped.value.checkpoint == tmp_path / "o" / CHECKPOINT and stopped.value.checkpoint.exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


# -- content identity: a changed input is never mistaken for the profiled one


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
    from patchscope.atlas.engine import Profiler

    model, tokenizer = gemma
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(TEXTS * 2))
    source = SourceConfig(dataset=str(data), split="")
    config = ProfileConfig(layer=LAYER, top_k=2, max_length=16, batch_tokens=48, checkpoint_every=1)
    fold, calls = Profiler.fold, []

    def fold_then_stop(self, rows, pad_id):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        fold(self, rows, pad_id)

    monkeypatch.setattr(Profiler, "fold", fold_then_stop)
    with pytest.raises(Interrupted):
        profile(model, tokenizer, source, config, out=tmp_path / "o", progress=False)
    monkeypatch.setattr(Profiler, "fold", fold)
    data.write_text("\n".join(t.upper() for t in TEXTS * 2))  # same size, other texts
    with pytest.raises(
        AtlasError, match=r"made from other inputs: the data .*corpus.txt changed.*Resuming would mix old and new data"
    ):
        profile(model, tokenizer, source, config, out=tmp_path / "o", resume=True, progress=False)


# -- run reuses a profile-made atlas; results are never overwritten


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
    assert reused.atlas["reused"] is True and "profile" not in reused.timings and "corpus_mean" in reused.timings
    assert any("corpus mean was computed in this run" in note for note in reused.notes)
    assert (out / ATLAS_TENSORS).read_bytes() == before
    (mine,), (theirs,) = reused.neurons, fresh.neurons
    assert mine.neuron == theirs.neuron
    for label in ("patched", "corpus_mean"):
        ours = mine.patched if label == "patched" else mine.controls[label]
        want = theirs.patched if label == "patched" else theirs.controls[label]
        assert ours["at_placeholder"] == pytest.approx(want["at_placeholder"], abs=1e-4)


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


# -- bad data is reported before the model loads, and leaves no --out behind


@pytest.mark.parametrize(
    "dataset, split, column, message",
    [
        ("missing.jsonl", "", "text", "no such file"),
        ("corpus.jsonl", "train[5:2]", "text", "selects no rows"),
        ("corpus.jsonl", "[500:900]", "text", "no non-empty documents"),
        ("corpus.jsonl", "", "body", "no column 'body'"),
    ],
)
def test_run_checks_the_data_before_loading_the_model(gemma_dir, tmp_path, monkeypatch, capsys, dataset, split, column, message):
    write_corpus(tmp_path / "corpus.jsonl", TEXTS)
    monkeypatch.setattr("patchscope.experiment.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("patchscope.model.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    common = [
        "--model",
        str(gemma_dir),
        "--device",
        "cpu",
        "--dataset",
        str(tmp_path / dataset),
        "--split",
        split,
        "--text-column",
        column,
        "--layer",
        str(LAYER),
        "--out",
        str(out),
    ]
    assert main(["run", "--sae", "none", *common]) == 2
    assert message in capsys.readouterr().err and not out.exists()
    assert main(["profile", *common]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_failed_model_load_leaves_no_empty_out(tmp_path, gemma_dir, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS)

    def broken(*args, **kwargs):
        raise OSError("disk read error")

    monkeypatch.setattr("patchscope.experiment.load_model", broken)
    with pytest.raises(OSError, match="disk read error"):
        run_experiment(_config(gemma_dir, corpus, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


# -- atlas files: every corruption is named, none loads silently


@pytest.fixture(scope="module")
def small_atlas(gemma, tmp_path_factory):
    model, tokenizer = gemma
    out = tmp_path_factory.mktemp("atlas")
    profile(model, tokenizer, TEXTS, ProfileConfig(layer=LAYER, top_k=3, max_length=16), out=out, progress=False)
    return out / ATLAS_TENSORS


def _header(raw: bytes) -> tuple[int, dict]:
    (size,) = struct.unpack("<Q", raw[:8])
    return size, json.loads(raw[8 : 8 + size])


def test_a_flipped_bit_is_detected(small_atlas, tmp_path):
    raw = bytearray(small_atlas.read_bytes())
    size, header = _header(bytes(raw))
    begin, end = header[f"{SITE}/values"]["data_offsets"]
    raw[8 + size + (begin + end) // 2] ^= 0x04  # one bit of one float
    (tmp_path / ATLAS_TENSORS).write_bytes(bytes(raw))
    with pytest.raises(AtlasError, match="fails its checksum"):
        load_atlas(tmp_path)


def _rewrite(tmp_path: Path, atlas: Atlas, metadata_edit=None, tensor_edit=None) -> Path:
    """Write ``atlas`` with edited tensors/metadata, as a buggy tool or a hand edit would (no checksum)."""
    from patchscope.util.storage import write_tensors

    tensors = atlas.tensors()
    if tensor_edit:
        tensor_edit(tensors)
    import dataclasses

    meta = dataclasses.asdict(atlas.meta) | {"sites": list(atlas.sites)}
    if metadata_edit:
        metadata_edit(meta)
    write_tensors(tmp_path / ATLAS_TENSORS, tensors, {METADATA_KEY: json.dumps(meta)})
    return tmp_path


@pytest.mark.parametrize(
    "metadata_edit, tensor_edit, message",
    [
        (lambda m: m.pop("sites"), None, "lists no `sites`"),
        (None, lambda t: t.pop(f"{SITE}/doc"), f"is missing the tensor '{SITE}/doc'"),
        (
            None,
            lambda t: t.__setitem__(f"{SITE}/pos", t[f"{SITE}/pos"][:, :50]),
            rf"{SITE}/pos has shape \(3, 50\), expected \(3, 128\)",
        ),
        (
            None,
            lambda t: t.__setitem__(f"{SITE}/values", t[f"{SITE}/values"].index_fill(1, torch.tensor([7]), float("nan"))),
            "nan or inf",
        ),
        (None, lambda t: t.__setitem__(f"{SITE}/doc", t[f"{SITE}/doc"].float()), "expected an integer dtype"),
        (lambda m: m.__setitem__("top_k", 20), None, r"expected \[top_k=20, neurons\]"),
    ],
)
def test_inconsistent_atlas_files_raise_atlas_error_naming_file_and_fault(
    small_atlas, tmp_path, metadata_edit, tensor_edit, message
):
    folder = _rewrite(tmp_path, load_atlas(small_atlas), metadata_edit, tensor_edit)
    with pytest.raises(AtlasError, match=message) as error:
        load_atlas(folder)
    assert str(folder / ATLAS_TENSORS) in str(error.value)


def test_checksum_is_stored_in_both_metadata_copies(small_atlas):
    from safetensors import safe_open

    with safe_open(str(small_atlas), framework="pt") as handle:
        inside = handle.metadata()[CHECKSUM_KEY]
    assert json.loads((small_atlas.parent / ATLAS_JSON).read_text())["checksum"] == inside and len(inside) == 64


def test_a_truncated_checkpoint_says_exactly_what_to_do(gemma_dir, tmp_path, capsys):
    data = write_corpus(tmp_path / "c.jsonl", TEXTS)
    out = tmp_path / "out"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')  # cut short mid-header
    argv = profile_argv(gemma_dir, data, out, "--layer", "1", "--max-length", "16", "--resume")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Delete it and run the same command without --resume to start over" in err and str(out / CHECKPOINT) in err


# -- exports: hook_embed, and rebuilding them from an atlas


def test_profile_with_hook_embed_and_export_rebuilds_the_exports(gemma_dir, tmp_path, capsys):
    data = write_corpus(tmp_path / "c.jsonl", TEXTS)
    out = tmp_path / "out"
    argv = profile_argv(gemma_dir, data, out, "--site", "hook_embed", SITE, "--top-k", "2", "--max-length", "16")
    assert main(argv) == 0, capsys.readouterr().err
    files = [
        out / "top_examples_hook_embed.parquet",
        out / f"top_examples_{SITE}.parquet",
        out / f"gemma2_neuron_mapping_layer_{LAYER}.json",
    ]
    originals = [f.read_bytes() for f in files]
    for f in files:
        f.unlink()
    assert main(["export", str(out), "--format", "mapping"]) == 0
    assert files[2].read_bytes() == originals[2] and not files[0].exists()
    assert main(["export", str(out)]) == 0
    import pandas as pd

    for f, before in zip(files[:2], originals[:2]):
        assert pd.read_parquet(f).equals(pd.read_parquet(__import__("io").BytesIO(before)))
    write_corpus(data, TEXTS[::-1])  # the texts behind the atlas are gone
    assert main(["export", str(out)]) == 2
    assert "changed" in capsys.readouterr().err


def test_export_finishes_an_atlas_whose_run_stopped_before_its_exports(gemma, gemma_dir, tmp_path, capsys):
    model, tokenizer = gemma
    data = write_corpus(tmp_path / "c.jsonl", TEXTS)
    out = tmp_path / "out"
    profile(
        model,
        tokenizer,
        SourceConfig(dataset=str(data), split=""),
        ProfileConfig(layer=LAYER, top_k=2, max_length=16),
        out=out,
        model_name=str(gemma_dir),
        progress=False,
    )
    (out / ATLAS_JSON).unlink()  # as if killed before the commit marker
    assert main(["export", str(out)]) == 0
    assert (out / ATLAS_JSON).exists() and (out / f"gemma2_neuron_mapping_layer_{LAYER}.json").exists()


# -- inject leaves the caller's random generators as they were


def test_inject_restores_every_generator_and_reseeds_no_gpu(gemma, monkeypatch):
    from patchscope import Row, inject, plan_prompt

    model, tokenizer = gemma
    reseeded = []
    monkeypatch.setattr(
        torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed)
    )  # would change a caller's GPU generator
    plan = plan_prompt(tokenizer, PatchscopeConfig())
    rows = [Row("p", 3, torch.randn(64))]
    torch.manual_seed(123)
    reseeded.clear()
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    reseeded.clear()
    first = inject(
        model,
        tokenizer,
        rows,
        plan,
        target_site="blocks.1.hook_resid_pre",
        observe_site=SITE,
        max_new_tokens=4,
        temperature=1.0,
        seed=7,
    )
    assert torch.equal(torch.rand(3), expected_next)  # the caller's CPU stream goes on as if inject never ran
    second = inject(
        model,
        tokenizer,
        rows,
        plan,
        target_site="blocks.1.hook_resid_pre",
        observe_site=SITE,
        max_new_tokens=4,
        temperature=1.0,
        seed=7,
    )
    assert first[0].generated_tokens == second[0].generated_tokens  # the seed decides the sample
    assert reseeded == []


def test_run_refuses_to_resume_a_checkpoint_of_other_data_before_loading(gemma_dir, tmp_path, monkeypatch):
    from patchscope.atlas.engine import Profiler

    corpus = write_corpus(tmp_path / "corpus.jsonl", TEXTS * 3)
    config = _config(
        gemma_dir, corpus, tmp_path / "o", profile=ProfileConfig(layer=LAYER, max_length=16, batch_tokens=48, checkpoint_every=1)
    )
    fold, calls = Profiler.fold, []

    def fold_then_stop(self, rows, pad_id):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        fold(self, rows, pad_id)

    monkeypatch.setattr(Profiler, "fold", fold_then_stop)
    with pytest.raises(Interrupted, match="rerun the same command to continue from it"):
        run_experiment(config, progress=False)
    monkeypatch.setattr(Profiler, "fold", fold)
    write_corpus(corpus, TEXTS[::-1] * 3)
    monkeypatch.setattr("patchscope.experiment.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(AtlasError, match="made from other inputs: the data .*corpus.jsonl changed"):
        run_experiment(config, progress=False)


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
