"""Data-parallel profiling (torchrun, 2 gloo processes), merging, and truncated loading.

The merged atlas of several ranks, or of several independent jobs, must equal the single-process
atlas bit for bit: every tensor is compared with `torch.equal`.
"""

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from factories import FIXTURE_CORPUS
from run_inputs import env, torchrun
from safetensors import safe_open

from patchscope import load_model
from patchscope.atlas import distributed
from patchscope.atlas.atlas import AtlasError
from patchscope.atlas.exact import ExactSum
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import Document, SourceConfig
from patchscope.atlas.store import load_atlas
from patchscope.cli.main import main
from patchscope.model.loading import load_model_until

LAYER = 2
CORPUS = FIXTURE_CORPUS + [t.upper() for t in FIXTURE_CORPUS if t][:5] + [" ".join(FIXTURE_CORPUS[:6])]
FLAGS = ["--layer", str(LAYER), "--top-k", "4", "--max-length", "16", "--batch-tokens", "48", "--sort-buffer", "3"]
CONFIG = dict(layer=LAYER, top_k=4, max_length=16, batch_tokens=48, sort_buffer=3)
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(CORPUS) + "\n")
    return path


def single_process(gemma_dir, source: SourceConfig, **changes):
    """The reference, with one thread like each torchrun rank: CPU kernels round differently with
    another thread count (measured: the window case differs in the last bit at 2 threads)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load_model(str(gemma_dir), dtype="float32", device="cpu")
        return profile(model, tokenizer, source, ProfileConfig(**{**CONFIG, **changes}), progress=False)
    finally:
        torch.set_num_threads(previous)


def assert_identical(ours, expected) -> None:
    mine, theirs = ours.tensors(), expected.tensors()
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name
    assert (ours.meta.n_documents, ours.meta.skipped_empty, ours.meta.split) == (
        expected.meta.n_documents,
        expected.meta.skipped_empty,
        expected.meta.split,
    )


# -- sharding and exact sums (no processes)


def test_shares_are_disjoint_blocks_whose_union_is_the_input():
    documents = [Document(i, f"text {i}") for i in range(100, 131) if i % 7]  # a slice, with gaps (empty rows)
    shares = [list(distributed.shard(documents, 4, distributed.World(r, 3))) for r in range(3)]
    assert sorted(d.index for share in shares for d in share) == [d.index for d in documents]
    for rank, share in enumerate(shares):
        assert share and all((d.index // 4) % 3 == rank for d in share)


def test_exact_sums_do_not_depend_on_grouping():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 50, generator=generator, dtype=torch.float64) * 10.0 ** (i % 13 - 6) for i in range(40)]
    in_order = ExactSum.zeros(2, 50)
    for batch in batches:
        in_order = in_order + ExactSum.of(batch)
    evens, odds = ExactSum.zeros(2, 50), ExactSum.zeros(2, 50)
    for i, batch in enumerate(batches):
        if i % 2:
            odds = odds + ExactSum.of(batch)
        else:
            evens = evens + ExactSum.of(batch)
    assert torch.equal((odds + evens).parts, in_order.parts)
    exact = torch.tensor([[math.fsum(float(b[r, c]) for b in batches) for c in range(50)] for r in range(2)], dtype=torch.float64)
    torch.testing.assert_close(in_order.value(), exact, rtol=1e-15, atol=1e-12)
    assert torch.equal(ExactSum.of(batches[3]).value(), batches[3])  # a single batch round-trips exactly


# -- torchrun with 2 gloo processes


@pytest.mark.parametrize(
    "overflow, split, launcher",
    [("truncate", "", "torchrun"), ("window", "[3:19]", "nproc")],
    ids=["truncate-whole-file-torchrun", "window-slice-nproc"],
)
def test_two_ranks_give_the_single_process_atlas(gemma_dir, corpus_file, tmp_path, overflow, split, launcher):
    out = tmp_path / "atlas"
    args = ["profile", "--model", str(gemma_dir), "--dtype", "float32", "--device", "cpu", "--dataset", str(corpus_file)]
    args += ["--split", split, "--overflow", overflow, *FLAGS, "--out", str(out)]
    if launcher == "torchrun":
        result = torchrun(args)
    else:  # patchscope's own --nproc, which calls torchrun's launcher
        result = subprocess.run(
            [sys.executable, "-m", "patchscope", *args, "--nproc", "2"], capture_output=True, text=True, env=env(), timeout=300
        )
    assert result.returncode == 0, result.stderr[-3000:]
    merged = load_atlas(out)
    assert merged.meta.provenance.world_size == 2 and all(r.batches > 0 for r in merged.meta.provenance.ranks)
    expected = single_process(gemma_dir, SourceConfig(dataset=str(corpus_file), split=split), overflow=overflow)
    assert_identical(merged, expected)
    assert (out / f"top_examples_blocks.{LAYER}.mlp.hook_post.parquet").exists()
    assert not list(out.glob("checkpoint*"))


SLOW_RANK = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
from patchscope import load_model
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import SourceConfig
model, tokenizer = load_model({model!r}, dtype="float32", device="cpu")
model.model.layers[0].register_forward_pre_hook(lambda *a: time.sleep(0.2))  # slow enough to be killed mid-run
profile(model, tokenizer, SourceConfig(dataset={data!r}, split=""), ProfileConfig(**{config!r}), out={out!r}, progress=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches_done(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return int(handle.metadata()["batches_done"])
    except Exception:  # noqa: BLE001 - missing, or being replaced under us
        return 0


def test_killed_rank_is_named_and_the_job_resumes(gemma_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "atlas"
    config = {**CONFIG, "batch_tokens": 16, "checkpoint_every": 1}
    world = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", PATCHSCOPE_DIST_TIMEOUT="30")
    cli = [
        "profile",
        "--model",
        str(gemma_dir),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--dataset",
        str(corpus_file),
        "--split",
        "",
    ]
    cli += [*FLAGS[:-4], "--batch-tokens", "16", "--sort-buffer", "3", "--checkpoint-every", "1", "--out", str(out)]
    survivor = subprocess.Popen(
        [sys.executable, "-m", "patchscope", *cli], stderr=subprocess.PIPE, text=True, env=env(RANK="0", LOCAL_RANK="0", **world)
    )
    script = SLOW_RANK.format(
        tests=str(Path(__file__).parent), model=str(gemma_dir), data=str(corpus_file), config=config, out=str(out)
    )
    victim = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, env=env(RANK="1", LOCAL_RANK="1", **world))
    victim_checkpoint = out / distributed.checkpoint_name(distributed.World(1, 2))
    deadline = time.time() + 180
    while time.time() < deadline and victim.poll() is None and batches_done(victim_checkpoint) < 2:
        time.sleep(0.05)
    assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = time.time()
    _, errors = survivor.communicate(timeout=120)
    assert time.time() - killed_at < 60  # the process-group timeout is 30 s
    assert survivor.returncode == 2, errors[-2000:]
    assert "rank 1 of 2 did not finish its share" in errors and "resume" in errors
    assert not (out / "atlas.safetensors").exists()
    survivor_checkpoint = out / distributed.checkpoint_name(distributed.World(0, 2))
    assert batches_done(survivor_checkpoint) > 0 and 2 <= batches_done(victim_checkpoint)

    # a different world size is refused, the same one resumes to the uninterrupted atlas
    assert main([*cli, "--resume"]) == 2  # this test process is a world of one
    assert "with 2 process(es), and this run has 1" in capsys.readouterr().err
    resumed = torchrun([*cli, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    merged = load_atlas(out)
    assert [r.resumed_after_batches for r in merged.meta.provenance.ranks][1] >= 2
    expected = single_process(gemma_dir, SourceConfig(dataset=str(corpus_file), split=""), batch_tokens=16)
    assert_identical(merged, expected)
    assert not list(out.glob("checkpoint*"))


# -- independent jobs: patchscope merge


def test_merge_of_slices_is_the_atlas_of_their_union(gemma, corpus_file, tmp_path):
    model, tokenizer = gemma
    config = ProfileConfig(**CONFIG)
    for split in ("[0:6]", "[6:12]", "[12:21]", "[4:9]"):
        profile(
            model, tokenizer, SourceConfig(dataset=str(corpus_file), split=split), config, out=tmp_path / split, progress=False
        )
    union = profile(model, tokenizer, SourceConfig(dataset=str(corpus_file), split="[0:21]"), config, progress=False)
    assert main(["merge", str(tmp_path / "merged"), *(str(tmp_path / s) for s in ("[12:21]", "[0:6]", "[6:12]"))]) == 0
    assert_identical(load_atlas(tmp_path / "merged"), union)

    assert main(["merge", str(tmp_path / "overlap"), str(tmp_path / "[0:6]"), str(tmp_path / "[4:9]")]) == 2
    other = SourceConfig(dataset=str(corpus_file), split="[9:12]")
    profile(model, tokenizer, other, ProfileConfig(**{**CONFIG, "top_k": 5}), out=tmp_path / "k5", progress=False)
    assert main(["merge", str(tmp_path / "mixed"), str(tmp_path / "[0:6]"), str(tmp_path / "k5")]) == 2
    assert not (tmp_path / "overlap" / "atlas.safetensors").exists() and not (tmp_path / "mixed" / "atlas.safetensors").exists()


def test_merge_refuses_overlaps_and_other_settings(gemma, corpus_file, tmp_path):
    from patchscope.atlas.merge import merge_atlases

    model, tokenizer = gemma
    atlases = {
        split: profile(
            model, tokenizer, SourceConfig(dataset=str(corpus_file), split=split), ProfileConfig(**CONFIG), progress=False
        )
        for split in ("[0:6]", "[5:9]", "[9:12]")
    }
    with pytest.raises(AtlasError, match="overlap"):
        merge_atlases([atlases["[0:6]"], atlases["[5:9]"]])
    k5 = profile(
        model,
        tokenizer,
        SourceConfig(dataset=str(corpus_file), split="[12:14]"),
        ProfileConfig(**{**CONFIG, "top_k": 5}),
        progress=False,
    )
    with pytest.raises(AtlasError, match="top_k=5"):
        merge_atlases([atlases["[9:12]"], k5])
    with pytest.raises(AtlasError, match="in-memory texts"):
        merge_atlases(
            [profile(model, tokenizer, texts, ProfileConfig(**CONFIG), progress=False) for texts in (CORPUS[:3], CORPUS[3:6])]
        )


# -- checkpoints of another world size


def test_resume_with_another_world_size_is_refused(gemma, corpus_file, tmp_path):
    model, tokenizer = gemma
    (tmp_path / "checkpoint.rank0-of-3.safetensors").write_bytes(b"a rank's work")
    with pytest.raises(distributed.DistributedError, match="with 3 process"):
        profile(
            model,
            tokenizer,
            SourceConfig(dataset=str(corpus_file), split=""),
            ProfileConfig(**CONFIG),
            out=tmp_path,
            resume=True,
            progress=False,
        )


# -- bigger models: truncated loading and a device map


def test_truncated_load_gives_the_full_models_values(gemma_dir, corpus_file):
    source = SourceConfig(dataset=str(corpus_file), split="")
    config = ProfileConfig(**CONFIG, sites=(f"blocks.{LAYER}.hook_resid_post", "blocks.0.mlp.hook_pre"))
    full, tokenizer = load_model(str(gemma_dir), dtype="float32", device="cpu")
    truncated, _ = load_model_until(str(gemma_dir), LAYER, dtype="float32", device="cpu")
    assert len(truncated.model.layers) == LAYER + 1 < len(full.model.layers)
    assert sum(p.numel() for p in truncated.parameters()) < sum(p.numel() for p in full.parameters())
    assert_identical(
        profile(truncated, tokenizer, source, config, progress=False), profile(full, tokenizer, source, config, progress=False)
    )
    with pytest.raises(RuntimeError, match="cannot produce logits"):
        truncated(input_ids=torch.tensor([[2, 5, 6]]))


def test_device_map_profile_matches(gemma_dir, corpus_file):
    source = SourceConfig(dataset=str(corpus_file), split="")
    mapped, tokenizer = load_model(str(gemma_dir), dtype="float32", device_map={"": "cpu"})
    plain, _ = load_model(str(gemma_dir), dtype="float32", device="cpu")
    assert_identical(
        profile(mapped, tokenizer, source, ProfileConfig(**CONFIG), progress=False),
        profile(plain, tokenizer, source, ProfileConfig(**CONFIG), progress=False),
    )


# -- each rank on its own GPU (no GPU needed: the decisions are checked with CUDA faked)


def test_every_rank_takes_its_own_gpu(monkeypatch):
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    world = distributed.World(rank=3, size=4, local_rank=1)
    assert [distributed.rank_device(d, world) for d in ("auto", "cuda", "cuda:1")] == ["cuda:1"] * 3
    assert chosen == [1, 1, 1]
    assert distributed.rank_device("cuda:0", distributed.World()) == "cuda:0"  # one process: as asked
    with pytest.raises(distributed.DistributedError, match=r"--device cuda:0 on every one of 4 ranks.*pass --device cuda"):
        distributed.rank_device("cuda:0", world)


def test_the_control_group_is_created_when_joining(monkeypatch):
    """Under NCCL the gloo group of the barrier exists before any rank can reach the meeting."""
    calls: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: calls.append(f"init {backend}"))
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(distributed.dist, "new_group", lambda backend, **kw: calls.append(f"group {backend}") or "group")
    monkeypatch.setattr(distributed, "_joined", {})
    distributed.join(torch.device("cuda:0"))
    assert calls == ["init nccl", "group gloo"]
    assert distributed._control_group() == "group" and calls == ["init nccl", "group gloo"]  # not created again
