"""The batched atlas against a one-document-at-a-time brute force, plus storage and resume."""

import dataclasses
import json
from contextlib import contextmanager

import child_runs
import pytest
import torch
from factories import FIXTURE_CORPUS

from patchscope import load_model
from patchscope.atlas.atlas import AtlasError
from patchscope.atlas.exports import export_original, export_parquet
from patchscope.atlas.folder import CHECKPOINT
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import DataError, SourceConfig
from patchscope.atlas.store import load_atlas
from patchscope.cli.main import main
from patchscope.model.sites import SiteError

LAYER = 2
SITE = f"blocks.{LAYER}.mlp.hook_post"
CORPUS = [t for t in FIXTURE_CORPUS if t] + [t.upper() for t in FIXTURE_CORPUS if t][:5] + [" ".join(FIXTURE_CORPUS[:6])]


def reference_rows(model, tokenizer, texts, max_length, overflow, exclude_bos):
    """Every counted token: (acts[n] list, doc, position, token), one document at a time, full forward."""
    rows = []
    store = {}
    handle = model.model.layers[LAYER].mlp.down_proj.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0]))
    try:
        for doc, text in enumerate(texts):
            ids = tokenizer(text).input_ids
            bos, body = ids[0], ids[1:]
            if overflow == "truncate":
                windows = [(0, ids[:max_length], 1 if exclude_bos else 0)]
            else:  # window: BOS + (max_length - 1) body tokens per window; later windows' BOS never counted
                width = max_length - 1
                windows = [
                    (i, [bos] + body[i : i + width], (1 if exclude_bos else 0) if i == 0 else 1)
                    for i in range(0, len(body), width)
                ]
            for offset, window, first in windows:
                model(torch.tensor([window]))  # no early exit: the whole model runs
                acts = store["x"][0]
                for j in range(first, len(window)):
                    rows.append((acts[j].tolist(), doc, offset + j, window[j]))
    finally:
        handle.remove()
    return rows


def check_against_reference(atlas, rows, k):
    top = atlas[SITE].top
    n = top.values.shape[1]
    by_location = {(r[1], r[2]): r for r in rows}
    for neuron in range(n):
        ranked = sorted(((r[0][neuron], r[1], r[2], r[3]) for r in rows), key=lambda c: (-c[0], c[1], c[2]))[: k + 1]
        ours_values = top.values[:, neuron].tolist()
        torch.testing.assert_close(torch.tensor(ours_values), torch.tensor([c[0] for c in ranked[:k]]), rtol=1e-5, atol=1e-5)
        for rank in range(k):
            doc, pos = int(top.doc[rank, neuron]), int(top.pos[rank, neuron])
            row = by_location[(doc, pos)]  # the recorded location exists and holds the recorded value and token
            assert abs(row[0][neuron] - ours_values[rank]) < 1e-5 and row[3] == int(top.token[rank, neuron])
            # equal up to float rounding (same tokens, other padding): either order is right
            near_tie = any(abs(ranked[rank][0] - ranked[j][0]) < 1e-5 for j in (rank - 1, rank + 1) if 0 <= j < len(ranked))
            if not near_tie:
                assert (doc, pos) == ranked[rank][1:3], (neuron, rank)
    moments = atlas[SITE].moments
    assert int(moments.n_tokens) == len(rows)
    expected_sum = torch.tensor([sum(r[0][i] for r in rows) for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(moments.total, expected_sum, rtol=1e-4, atol=1e-3)
    assert moments.fire_count.tolist() == [sum(r[0][i] > 0 for r in rows) for i in range(n)]


@pytest.mark.parametrize("overflow", ["truncate", "window"])
@pytest.mark.parametrize("exclude_bos", [True, False])
def test_atlas_matches_brute_force(gemma, overflow, exclude_bos):
    model, tokenizer = gemma
    config = ProfileConfig(layer=LAYER, top_k=5, max_length=12, overflow=overflow, exclude_bos=exclude_bos, batch_tokens=40)
    atlas = profile(model, tokenizer, CORPUS, config, progress=False)
    rows = reference_rows(model, tokenizer, CORPUS, 12, overflow, exclude_bos)
    check_against_reference(atlas, rows, 5)
    if exclude_bos:
        assert int(atlas[SITE].top.pos.min()) >= 1
    assert atlas.meta.provenance.padding_fraction < 0.5


def _rerun(model, tokenizer, text, position, max_length, overflow):
    from patchscope.atlas.batching import segment_at

    segment, local = segment_at(tokenizer, text, position, max_length, overflow)
    store = {}
    handle = model.model.layers[LAYER].mlp.down_proj.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0]))
    try:
        model(torch.tensor([segment.ids]))
    finally:
        handle.remove()
    return store["x"][0, local], segment.ids[local]


def test_round_trip_and_slice_offsets(gemma, tmp_path):
    model, tokenizer = gemma
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in FIXTURE_CORPUS + CORPUS))
    source = SourceConfig(dataset=str(path), split="[4:24]", text_column="body")
    config = ProfileConfig(layer=LAYER, top_k=3, max_length=10, overflow="window", batch_tokens=64)
    atlas = profile(model, tokenizer, source, config, out=tmp_path / "out", progress=False)
    rows = FIXTURE_CORPUS + CORPUS
    assert min(atlas.documents()) >= 4 and max(atlas.documents()) < 24
    assert atlas.meta.n_documents == sum(1 for t in rows[4:24] if t.strip()) and atlas.meta.skipped_empty == 1
    for neuron in range(0, 128, 9):
        for rank in (0, 2):
            entry = atlas.entry(SITE, neuron, rank)
            value, token = _rerun(model, tokenizer, rows[entry.doc], entry.position, 10, "window")
            assert abs(value[neuron].item() - entry.activation) < 1e-5 and token == entry.token


def test_save_load_and_exports(gemma, tmp_path):
    model, tokenizer = gemma
    atlas = profile(
        model,
        tokenizer,
        CORPUS,
        ProfileConfig(layer=LAYER, top_k=3, max_length=16),
        out=tmp_path,
        progress=False,
        model_name="tiny",
    )
    loaded = load_atlas(tmp_path)
    for name, tensor in atlas.tensors().items():
        assert torch.equal(tensor, loaded.tensors()[name]), name
    meta = json.loads((tmp_path / "atlas.json").read_text())
    assert (
        meta["model"] == "tiny"
        and meta["max_length"] == 16
        and meta["n_tokens"] == atlas.n_tokens
        and "torch" in meta["versions"]
    )
    texts = dict(enumerate(CORPUS))
    original = json.loads(
        export_original(atlas, tmp_path / f"gemma2_neuron_mapping_layer_{LAYER}.json", SITE, texts, tokenizer).read_text()
    )
    assert len(original) == 128
    first = original["7"]
    entry = atlas.entry(SITE, 7)
    assert first["text_index"] == entry.doc and first["token_position"] == entry.position
    assert first["activation_score"] == pytest.approx(entry.activation)
    assert first["trigger_token"] == tokenizer.decode([entry.token]) and first["trigger_token"] in first["context"]
    import pandas as pd

    table = pd.read_parquet(export_parquet(atlas, tmp_path / "top.parquet", SITE, texts, tokenizer))
    assert len(table) == 128 * 3 and set(table.columns) >= {"neuron", "rank", "activation", "doc", "position", "token", "context"}
    row = table[(table.neuron == 7) & (table["rank"] == 0)].iloc[0]
    assert row.doc == entry.doc and row.activation == pytest.approx(entry.activation)


def test_corrupt_atlas_file_is_reported(tmp_path):
    (tmp_path / "atlas.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(AtlasError, match="not a readable atlas"):
        load_atlas(tmp_path)
    with pytest.raises(AtlasError, match="no atlas"):
        load_atlas(tmp_path / "nowhere")


def test_merge_of_shards_equals_one_run(gemma):
    model, tokenizer = gemma
    config = ProfileConfig(layer=LAYER, top_k=4, max_length=16, batch_tokens=48)
    docs = list(enumerate(CORPUS))
    from patchscope.atlas.sources import Document

    whole = profile(model, tokenizer, [Document(i, t) for i, t in docs], config, progress=False)
    first = profile(model, tokenizer, [Document(i, t) for i, t in docs[:9]], config, progress=False)
    second = profile(model, tokenizer, [Document(i, t) for i, t in docs[9:]], config, progress=False)
    merged = second.merge(first)
    torch.testing.assert_close(merged[SITE].top.values, whole[SITE].top.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(merged[SITE].top.doc, whole[SITE].top.doc) and torch.equal(merged[SITE].top.pos, whole[SITE].top.pos)
    torch.testing.assert_close(merged[SITE].moments.total, whole[SITE].moments.total, rtol=1e-5, atol=1e-4)
    assert merged.n_tokens == whole.n_tokens and merged.meta.n_documents == whole.meta.n_documents


def test_several_sites_in_one_pass(gemma):
    model, tokenizer = gemma
    sites = ("blocks.0.hook_resid_post", SITE)
    atlas = profile(model, tokenizer, CORPUS[:5], ProfileConfig(sites=sites, top_k=2, max_length=16), progress=False)
    assert set(atlas.sites) == set(sites) and atlas["blocks.0.hook_resid_post"].n_neurons == 64


def test_fp16_overflow_is_counted_and_reported(gemma_dir):
    model, tokenizer = load_model(str(gemma_dir), dtype="float16", device="cpu")
    with torch.no_grad():
        model.model.layers[LAYER].mlp.up_proj.weight[:8] *= 5e4  # neurons 0..7 overflow to inf
    with pytest.warns(RuntimeWarning, match="inf/nan"):
        atlas = profile(model, tokenizer, CORPUS[:6], ProfileConfig(layer=LAYER, top_k=3, max_length=16), progress=False)
    stats = atlas[SITE]
    assert int(stats.moments.nonfinite[:8].sum()) > 0 and int(stats.moments.nonfinite[8:].sum()) == 0
    filled = stats.top.doc >= 0
    assert torch.isfinite(stats.top.values[filled]).all()
    assert atlas.meta.provenance.nonfinite_activations == int(stats.moments.nonfinite.sum())


def test_out_of_memory_halves_the_batch(gemma, monkeypatch):
    model, tokenizer = gemma
    config = ProfileConfig(layer=LAYER, top_k=3, max_length=16, batch_tokens=128)
    expected = profile(model, tokenizer, CORPUS, config, progress=False)
    limit = {"rows": 3}
    original = type(model).forward

    def forward(self, input_ids=None, **kwargs):  # stands in for the allocator failing on big batches
        if input_ids.shape[0] > limit["rows"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward)
    atlas = profile(model, tokenizer, CORPUS, config, progress=False)
    torch.testing.assert_close(atlas[SITE].top.values, expected[SITE].top.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(atlas[SITE].top.doc, expected[SITE].top.doc)


def test_bad_input_fails_before_work(gemma, tmp_path):
    model, tokenizer = gemma
    with pytest.raises(SiteError, match="layer 9 is out of range"):
        profile(model, tokenizer, CORPUS, ProfileConfig(layer=9), progress=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="cannot write to output directory"):
        profile(model, tokenizer, CORPUS, ProfileConfig(layer=LAYER), out=blocker / "out", progress=False)
    table = tmp_path / "t.csv"
    table.write_text("body\nsome text\n")
    with pytest.raises(DataError, match="no column 'text'"):
        profile(model, tokenizer, SourceConfig(dataset=str(table), split=""), ProfileConfig(layer=LAYER), progress=False)
    with pytest.raises(DataError, match="no non-empty documents"):
        profile(
            model,
            tokenizer,
            SourceConfig(dataset=str(table), split="[5:9]", text_column="body"),
            ProfileConfig(layer=LAYER),
            progress=False,
        )


KILL_CONFIG = dict(layer=LAYER, top_k=4, max_length=16, batch_tokens=48, checkpoint_every=1, sort_buffer=7)


def kill_argv(gemma_dir, data, out):
    c = KILL_CONFIG
    return [
        "profile",
        "--model",
        str(gemma_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--dataset",
        str(data),
        "--split",
        "",
        "--layer",
        str(c["layer"]),
        "--top-k",
        str(c["top_k"]),
        "--max-length",
        str(c["max_length"]),
        "--batch-tokens",
        str(c["batch_tokens"]),
        "--checkpoint-every",
        "1",
        "--sort-buffer",
        str(c["sort_buffer"]),
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def kill_corpus(tmp_path_factory):
    data = tmp_path_factory.mktemp("kill") / "corpus.txt"
    data.write_text("\n".join(CORPUS * 3))
    return data


@pytest.fixture(scope="module")
def uninterrupted(gemma_dir, kill_corpus):
    with torch_threads(1):
        model, tokenizer = load_model(str(gemma_dir), dtype="float32", device="cpu")
        return profile(
            model, tokenizer, SourceConfig(dataset=str(kill_corpus), split=""), ProfileConfig(**KILL_CONFIG), progress=False
        )


@contextmanager
def torch_threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("point", ["after_checkpoint", "mid_checkpoint", "before_commit"])
def test_sigkill_at_any_point_then_the_same_command_gives_the_same_atlas(
    gemma_dir, kill_corpus, uninterrupted, tmp_path, point, capsys
):
    """SIGKILL when a checkpoint is durable, while the next one is half written (its temporary
    file exists, the rename has not happened), and after the atlas tensors but before the exports
    and atlas.json. The child waits at the point, so the kill lands there every time."""
    out = tmp_path / "run"
    argv = kill_argv(gemma_dir, kill_corpus, out)
    child = child_runs.start(point, 3, argv)
    child.kill()
    child.wait()
    if point == "before_commit":
        assert (out / "atlas.safetensors").exists() and not (out / "atlas.json").exists()
        rerun = argv  # the same command finishes the exports
    else:
        assert (out / CHECKPOINT).exists() and not (out / "atlas.safetensors").exists()
        rerun = argv + ["--resume"]
    if point == "mid_checkpoint":
        assert list(out.glob(".checkpoint.safetensors.*.tmp")), "the kill should leave the half-written checkpoint"
    with torch_threads(1):
        assert main(rerun) == 0, capsys.readouterr().err
    resumed = load_atlas(out)
    for name, tensor in uninterrupted.tensors().items():
        assert torch.equal(resumed.tensors()[name], tensor), name
    assert resumed.meta.n_documents == uninterrupted.meta.n_documents
    if point == "after_checkpoint":
        assert resumed.meta.provenance.resumed_after_batches == 3
        assert "resuming after 3 batches" in capsys.readouterr().err
    if point == "mid_checkpoint":  # the durable checkpoint before the cut one was used
        assert resumed.meta.provenance.resumed_after_batches == 2
    assert not (out / CHECKPOINT).exists() and (out / "atlas.json").exists()
    assert (out / f"gemma2_neuron_mapping_layer_{LAYER}.json").exists() and (out / f"top_examples_{SITE}.parquet").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tmp") or p.name.endswith(".lock")]


def test_resume_with_other_settings_is_refused(gemma, tmp_path):
    model, tokenizer = gemma
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(CORPUS))
    source = SourceConfig(dataset=str(data), split="")
    from patchscope.atlas.engine import Profiler
    from patchscope.atlas.folder import AtlasFolder, Cursor
    from patchscope.atlas.key import Inputs, RunKey

    config = ProfileConfig(layer=LAYER, max_length=16, checkpoint_every=1)
    key = RunKey.of("m", source, config, "float32", Inputs())
    AtlasFolder(tmp_path).write_checkpoint(Profiler(model, config).state, config.top_k, Cursor(1, 0, key.fingerprint, key.inputs))
    with pytest.raises(AtlasError, match="other settings"):
        profile(model, tokenizer, source, ProfileConfig(layer=LAYER, max_length=20), out=tmp_path, resume=True, progress=False)


def test_finished_or_interrupted_work_is_never_overwritten(gemma, tmp_path):
    model, tokenizer = gemma
    config = ProfileConfig(layer=LAYER, max_length=16)
    profile(model, tokenizer, CORPUS[:4], config, out=tmp_path / "done", progress=False)
    before = (tmp_path / "done" / "atlas.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds an atlas"):
        profile(model, tokenizer, CORPUS[4:8], config, out=tmp_path / "done", progress=False)
    assert (tmp_path / "done" / "atlas.safetensors").read_bytes() == before
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / CHECKPOINT).write_bytes(b"hours of work")
    with pytest.raises(FileExistsError, match="pass `resume`"):
        profile(model, tokenizer, CORPUS, config, out=tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / CHECKPOINT).read_bytes() == b"hours of work"


@pytest.mark.parametrize("reduction", ["one_pass", "separate", "inductor"])
def test_every_reduction_gives_the_atlas_auto_gives(gemma, reduction):
    """`ProfileConfig.reduction` picks the kernels, never the result: the same atlas as ``auto``, tensor by tensor."""
    model, tokenizer = gemma
    config = ProfileConfig(layer=LAYER, top_k=3, max_length=16, batch_tokens=64)
    want = profile(model, tokenizer, CORPUS, config, progress=False).tensors()
    got = profile(model, tokenizer, CORPUS, dataclasses.replace(config, reduction=reduction), progress=False).tensors()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m, name=name: f"{name}: {m}")


def test_a_reduction_the_device_cannot_run_is_refused(gemma):
    from patchscope.atlas.engine import Profiler, _resolve_reduction

    model, _ = gemma
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="the `triton` reduction runs on CUDA devices only"):
            Profiler(model, ProfileConfig(layer=LAYER, reduction="triton"))
    with pytest.raises(ValueError, match="the `one_pass` reduction runs on the CPU only"):
        _resolve_reduction(ProfileConfig(reduction="one_pass"), torch.device("cuda"))
