"""The exports against a reference that decodes every entry on its own, one `tokenizer.decode` each."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import run_inputs
from factories import FIXTURE_CORPUS
from run_inputs import profile_argv, write_corpus

from patchscope.atlas.atlas import CONTEXT_TOKENS
from patchscope.atlas.batching import segment_at
from patchscope.atlas.exports import contexts, decode_all, export_original, export_parquet
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import SourceConfig
from patchscope.atlas.store import ATLAS_JSON
from patchscope.cli.main import main

LAYER = 2
SITE = f"blocks.{LAYER}.mlp.hook_post"
TEXTS = dict(enumerate([t for t in FIXTURE_CORPUS if t] + [" ".join(FIXTURE_CORPUS[:5])]))


def reference_strings(atlas, entry, tokenizer) -> tuple[str, str]:
    """The entry's token, and ±5 tokens of the segment the profiler saw it in."""
    segment, local = segment_at(tokenizer, TEXTS[entry.doc], entry.position, atlas.meta.max_length, atlas.meta.overflow)
    assert segment.ids[local] == entry.token
    lo = max(segment.first_counted, local - CONTEXT_TOKENS)
    return tokenizer.decode([entry.token]), tokenizer.decode(list(segment.ids[lo : local + CONTEXT_TOKENS + 1]))


@pytest.fixture(params=["truncate", "window"])
def atlas(request, gemma):
    model, tokenizer = gemma
    config = ProfileConfig(layer=LAYER, top_k=4, max_length=10, overflow=request.param, batch_tokens=64)
    return profile(model, tokenizer, list(TEXTS.values()), config, progress=False)


def test_contexts_equal_one_decode_per_entry(atlas, gemma):
    _, tokenizer = gemma
    entries = atlas.entries(SITE)
    assert len({(e.doc, e.position) for e in entries}) < len(entries)  # neurons share positions: the case deduplicated
    assert contexts(atlas, entries, TEXTS, tokenizer) == [reference_strings(atlas, e, tokenizer) for e in entries]


@pytest.mark.parametrize("clean_up", [False, True])  # the Rust backend alone, or transformers' own decode
def test_decode_all_equals_decode_one_by_one(gemma, clean_up, monkeypatch):
    _, tokenizer = gemma
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", clean_up)
    pieces = [tokenizer(text).input_ids[:12] for text in TEXTS.values()] + [[5], [tokenizer.bos_token_id, 7, 9]]
    assert decode_all(tokenizer, pieces) == [tokenizer.decode(piece) for piece in pieces]


def test_parquet_rows_equal_the_entries(atlas, gemma, tmp_path):
    _, tokenizer = gemma
    table = pq.read_table(export_parquet(atlas, tmp_path / "top.parquet", SITE, TEXTS, tokenizer))
    layer = int(SITE.split(".")[1])
    expected = [
        {
            "site": SITE,
            "layer": layer,
            "neuron": e.neuron,
            "rank": e.rank,
            "activation": e.activation,
            "doc": e.doc,
            "position": e.position,
            "token_id": e.token,
            "token": token,
            "context": context,
        }
        for e in atlas.entries(SITE)
        for token, context in [reference_strings(atlas, e, tokenizer)]
    ]
    schema = pa.Table.from_pylist(expected).schema.set(1, pa.field("layer", pa.int16()))
    assert table.equals(pa.Table.from_pylist(expected, schema))  # values, order and column types (int16, int64, double, string)


def test_mapping_equals_the_top_entries(atlas, gemma, tmp_path):
    _, tokenizer = gemma
    mapping = json.loads(export_original(atlas, tmp_path / "mapping.json", SITE, TEXTS, tokenizer).read_text())
    expected = {}
    for e in atlas.entries(SITE, ranks=1):
        token, context = reference_strings(atlas, e, tokenizer)
        expected[str(e.neuron)] = {
            "text_index": e.doc,
            "token_position": e.position,
            "trigger_token": token,
            "activation_score": e.activation if math.isfinite(e.activation) else None,
            "context": context,
        }
    assert mapping == expected


def test_profile_with_hook_embed_and_export_rebuilds_the_exports(gemma_dir, tmp_path, capsys):
    data = write_corpus(tmp_path / "c.jsonl", run_inputs.TEXTS)
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
    write_corpus(data, run_inputs.TEXTS[::-1])  # the texts behind the atlas are gone
    assert main(["export", str(out)]) == 2
    assert "changed" in capsys.readouterr().err


def test_export_finishes_an_atlas_whose_run_stopped_before_its_exports(gemma, gemma_dir, tmp_path, capsys):
    model, tokenizer = gemma
    data = write_corpus(tmp_path / "c.jsonl", run_inputs.TEXTS)
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


def test_the_mapping_file_is_named_for_the_model_family(llama_dir, tmp_path, capsys):
    """Gemma-2 keeps the original's gemma2_neuron_mapping_layer_L.json (above); other families use their model_type."""
    data = write_corpus(tmp_path / "c.jsonl", run_inputs.TEXTS)
    out = tmp_path / "out"
    argv = profile_argv(llama_dir, data, out, "--layer", str(LAYER), "--top-k", "2", "--max-length", "16")
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((out / ATLAS_JSON).read_text())["model_type"] == "llama"
    assert [p.name for p in out.glob("*_neuron_mapping_layer_*.json")] == [f"llama_neuron_mapping_layer_{LAYER}.json"]
