"""The Neuronpedia export against a schema written from Neuronpedia's importer.

Required keys: what ``utils/neuronpedia-utils/neuronpedia_utils/convert-saedashboard-to-neuronpedia-export.py``
(Neuronpedia) indexes in each batch file, feature and activation; types from SAEDashboard's
``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``.
"""

import json

import pytest
import torch
from test_report import TEXTS

from patchscope.atlas.output_tokens import output_tokens
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.store import save_atlas
from patchscope.kernels.histogram import CENTER
from patchscope.report.neuronpedia import export_neuronpedia

NUMBER, TEXT = (int, float), str
NUMBERS, TEXTS_LIST, INTS = ("list", NUMBER), ("list", TEXT), ("list", int)
SCHEMA = {
    "batch": {"model_id": TEXT, "layer": int, "sae_id_suffix": (type(None), str), "features": list},
    "feature": {
        "feature_index": int,
        "neuron_alignment_indices": INTS,
        "neuron_alignment_values": NUMBERS,
        "neuron_alignment_l1": NUMBERS,
        "correlated_neurons_indices": INTS,
        "correlated_neurons_pearson": NUMBERS,
        "correlated_neurons_l1": NUMBERS,
        "correlated_features_indices": INTS,
        "correlated_features_pearson": NUMBERS,
        "correlated_features_l1": NUMBERS,
        "neg_str": TEXTS_LIST,
        "neg_values": NUMBERS,
        "pos_str": TEXTS_LIST,
        "pos_values": NUMBERS,
        "frac_nonzero": NUMBER,
        "freq_hist_data_bar_heights": NUMBERS,
        "freq_hist_data_bar_values": NUMBERS,
        "logits_hist_data_bar_heights": NUMBERS,
        "logits_hist_data_bar_values": NUMBERS,
        "decoder_weights_dist": NUMBERS,
        "activations": list,
    },
    "activation": {
        "tokens": TEXTS_LIST,
        "values": NUMBERS,
        "bin_min": NUMBER,
        "bin_max": NUMBER,
        "bin_contains": NUMBER,
        "qualifying_token_index": int,
    },
}


def check(record: dict, schema: dict, where: str) -> None:
    for key, kind in schema.items():
        assert key in record, f"{where}: missing {key!r}"
        value = record[key]
        if isinstance(kind, tuple) and kind and kind[0] == "list":
            assert isinstance(value, list) and all(isinstance(v, kind[1]) and not isinstance(v, bool) for v in value), (
                f"{where}.{key}"
            )
        else:
            assert isinstance(value, kind), f"{where}.{key}: {type(value).__name__}"


@pytest.fixture(scope="module")
def exported(gemma, tmp_path_factory):
    model, tokenizer = gemma
    root = tmp_path_factory.mktemp("neuronpedia")
    atlas = profile(model, tokenizer, TEXTS, ProfileConfig(layer=2, top_k=3, max_length=16, quantile_examples=2), progress=False)
    neurons = atlas.top_neurons("blocks.2.mlp.hook_post", 4)
    paths = export_neuronpedia(
        atlas, root / "np", model=model, tokenizer=tokenizer, texts=dict(enumerate(TEXTS)), neurons=neurons, model_id="tiny"
    )
    return atlas, neurons, [json.loads(p.read_text()) for p in paths], paths


def test_batch_files_have_the_importers_structure(exported):
    _, neurons, batches, paths = exported
    assert [p.name for p in paths] == ["batch-0.json"]  # the importer reads files named batch-*
    for batch in batches:
        check(batch, SCHEMA["batch"], "batch")
        for feature in batch["features"]:
            check(feature, SCHEMA["feature"], f"feature {feature['feature_index']}")
            assert feature["activations"]
            for activation in feature["activations"]:
                check(activation, SCHEMA["activation"], "activation")
                assert len(activation["tokens"]) == len(activation["values"])
                assert 0 <= activation["qualifying_token_index"] < len(activation["tokens"])
                assert activation["bin_min"] <= activation["bin_max"] and 0 < activation["bin_contains"] <= 1
    assert [f["feature_index"] for f in batches[0]["features"]] == neurons


def test_exported_numbers_are_the_atlas(exported, gemma):
    atlas, neurons, batches, _ = exported
    model, tokenizer = gemma
    stats = atlas["blocks.2.mlp.hook_post"]
    view = output_tokens(model, "blocks.2.mlp.hook_post", neurons, 10)
    for row, feature in enumerate(batches[0]["features"]):
        n = feature["feature_index"]
        assert feature["frac_nonzero"] == pytest.approx(float(stats.fire_rate[n]))
        assert sum(feature["freq_hist_data_bar_heights"]) == int(stats.histogram[n, CENTER + 1 :].sum())
        assert (
            feature["pos_values"] == view.top_values[row].tolist() and feature["neg_values"] == view.bottom_values[row].tolist()
        )
        assert feature["pos_str"] == tokenizer.batch_decode([[i] for i in view.top_ids[row].tolist()])
        assert sum(feature["logits_hist_data_bar_heights"]) == len(tokenizer)
        first = feature["activations"][0]  # the top example: its qualifying token holds the recorded maximum
        assert first["values"][first["qualifying_token_index"]] == pytest.approx(float(stats.max[n]), rel=1e-4, abs=1e-4)
        assert first["bin_max"] == pytest.approx(float(stats.max[n]))


def test_export_from_a_directory_reads_the_source_and_model(gemma, gemma_dir, tmp_path):
    model, tokenizer = gemma
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:8]))
    from patchscope.atlas.sources import SourceConfig, TextSource

    atlas = profile(
        model,
        tokenizer,
        TextSource(SourceConfig(dataset=str(corpus), split="")),
        ProfileConfig(layer=2, top_k=2, max_length=16),
        model_name=str(gemma_dir),
        progress=False,
    )
    save_atlas(atlas, tmp_path / "atlas")
    (path,) = export_neuronpedia(tmp_path / "atlas", tmp_path / "np", neurons=[3])
    feature = json.loads(path.read_text())["features"][0]
    assert feature["feature_index"] == 3 and feature["activations"]
    with pytest.raises(IndexError, match="out of range"):
        export_neuronpedia(atlas, tmp_path / "np2", model=model, tokenizer=tokenizer, texts={}, neurons=[10_000])
    assert torch.is_tensor(atlas["blocks.2.mlp.hook_post"].histogram)


def test_export_command_writes_the_neuronpedia_batches(gemma_dir, tmp_path):
    from patchscope.cli.main import main

    data = tmp_path / "corpus.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    atlas_dir = tmp_path / "atlas"
    argv = [
        "profile",
        "--model",
        str(gemma_dir),
        "--device",
        "cpu",
        "--dataset",
        str(data),
        "--layer",
        "1",
        "--top-k",
        "3",
        "--max-length",
        "16",
        "--out",
        str(atlas_dir),
    ]
    assert main(argv) == 0
    assert main(["export", "--format", "neuronpedia", str(atlas_dir), "--out", str(tmp_path / "np"), "--neurons", "0", "5"]) == 0
    batch = json.loads((tmp_path / "np" / "batch-0.json").read_text())
    assert [f["feature_index"] for f in batch["features"]] == [0, 5]
