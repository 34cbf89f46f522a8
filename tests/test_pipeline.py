import json

import pytest
from factories import FIXTURE_CORPUS
from sae_files import sae_params, write_npz

from patchscope import PatchscopeConfig, Row, capture, extract, inject, patch, plan_prompt
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.sources import SourceConfig
from patchscope.atlas.store import load_atlas
from patchscope.cli.main import main
from patchscope.experiment import ExperimentConfig, run_experiment
from patchscope.sae.jumprelu import SAEError, top_features
from patchscope.sae.loaders import load_sae

LAYER = 2


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in FIXTURE_CORPUS * 2))
    return path


@pytest.fixture
def sae_file(tmp_path):
    return write_npz(tmp_path / "sae" / "layer_1/width_16k/average_l0_30/params.npz", sae_params(seed=7))


def test_run_command_end_to_end(gemma, gemma_dir, corpus, sae_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "run",
        "--model",
        str(gemma_dir),
        "--device",
        "cpu",
        "--dataset",
        str(corpus),
        "--split",
        "[2:25]",
        "--layer",
        str(LAYER),
        "--max-length",
        "16",
        "--top-k",
        "4",
        "--top-neurons",
        "2",
        "--sae",
        str(sae_file),
        "--max-new-tokens",
        "5",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "=== Experiment Results ===" in printed and "reactivation ratio" in printed and "control random_same_norm" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"config", "prompt", "neurons", "timings", "versions", "atlas"}
    assert set(results["timings"]) >= {"load_model", "profile", "extract", "sae", "patchscope"}
    assert results["prompt"]["position"] == 7 and len(results["neurons"]) == 2

    # every number against direct library calls
    model, tokenizer = gemma
    atlas = load_atlas(out)
    site, neuron_site = f"blocks.{LAYER}.hook_resid_pre", f"blocks.{LAYER}.mlp.hook_post"
    assert [n["neuron"] for n in results["neurons"]] == atlas.top_neurons(neuron_site, 2)
    sae = load_sae(sae_file)
    plan = plan_prompt(tokenizer, PatchscopeConfig())
    rows = FIXTURE_CORPUS * 2
    for record in results["neurons"]:
        entry = atlas.entry(neuron_site, record["neuron"])
        assert record["max_activation"] == pytest.approx(entry.activation)
        assert 2 <= record["source"]["doc"] < 25 and record["source"]["doc"] == entry.doc
        ex = extract(model, tokenizer, rows[entry.doc], site=site, position=entry.position, entry=entry, max_length=16)
        readout = top_features(sae, ex.vector, 10, position=ex.position)
        assert [f["index"] for f in record["sae"]["top_features"]] == [f.index for f in readout.features]
        assert record["sae"]["relative_error"] == pytest.approx(readout.relative_error, rel=1e-5)
        (direct,) = inject(
            model,
            tokenizer,
            [Row("p", entry.neuron, ex.vector)],
            plan,
            target_site=site,
            observe_site=neuron_site,
            max_new_tokens=5,
        )
        assert record["patched"]["at_placeholder"] == pytest.approx(direct.at_placeholder, abs=1e-4)
        assert record["patched"]["generated_tokens"] == direct.generated_tokens
        assert record["patched"]["ratio"] == pytest.approx(direct.at_placeholder / entry.activation, abs=1e-4)
        assert set(record["controls"]) == {"unpatched", "random_same_norm", "corpus_mean"}
        assert record["controls"]["random_same_norm"]["norm"] == pytest.approx(record["patched"]["norm"], rel=1e-4)
        mean = atlas[site].mean.float()
        (mean_row,) = inject(
            model, tokenizer, [Row("m", entry.neuron, mean)], plan, target_site=site, observe_site=neuron_site, max_new_tokens=5
        )
        assert record["controls"]["corpus_mean"]["at_placeholder"] == pytest.approx(mean_row.at_placeholder, abs=1e-4)

    # a second run reuses the atlas instead of profiling again
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["atlas"]["reused"] is True and "profile" not in again["timings"]
    assert again["neurons"][0]["patched"]["at_placeholder"] == pytest.approx(results["neurons"][0]["patched"]["at_placeholder"])


def _config(gemma_dir, corpus, tmp_path, **changes):
    base = dict(
        model=str(gemma_dir),
        device="cpu",
        out=str(tmp_path / "o"),
        sae="none",
        source=SourceConfig(dataset=str(corpus), split=""),
        profile=ProfileConfig(layer=LAYER, max_length=16),
        patchscope=PatchscopeConfig(max_new_tokens=2),
    )
    base.update(changes)
    return ExperimentConfig(**base)


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (dict(neuron=500), IndexError, "`neuron` 500 is out of range"),
        (dict(patchscope=PatchscopeConfig(source_site="blocks.2.hook_resid_middle")), ValueError, "unknown hook site"),
        (dict(profile=ProfileConfig(layer=9)), ValueError, "out of range"),
        (dict(patchscope=PatchscopeConfig(max_new_tokens=-1)), ValueError, "`max_new_tokens`"),
        (dict(patchscope=PatchscopeConfig(prompt="no placeholder")), ValueError, "not a word of the prompt"),
    ],
)
def test_bad_input_fails_before_the_model_loads(gemma_dir, corpus, tmp_path, monkeypatch, changes, error, message):
    monkeypatch.setattr("patchscope.experiment.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(error, match=message):
        run_experiment(_config(gemma_dir, corpus, tmp_path, **changes))


def test_sae_width_mismatch_fails_before_the_model_loads(gemma_dir, corpus, tmp_path, monkeypatch):
    wide = write_npz(tmp_path / "layer_1/width_16k/average_l0_9/params.npz", sae_params(d_model=128))
    monkeypatch.setattr("patchscope.experiment.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SAEError, match="width mismatch"):
        run_experiment(_config(gemma_dir, corpus, tmp_path, sae=str(wide)))
    wrong_layer = write_npz(tmp_path / "layer_2/width_16k/average_l0_9/params.npz", sae_params())
    with pytest.raises(SAEError, match="`allow_site_mismatch`"):  # the layer-2 SAE does not read blocks.2.hook_resid_pre
        run_experiment(_config(gemma_dir, corpus, tmp_path, sae=str(wrong_layer)))


def test_atlas_made_with_other_settings_is_refused_before_loading(gemma_dir, corpus, tmp_path, monkeypatch):
    run_experiment(_config(gemma_dir, corpus, tmp_path), progress=False)
    monkeypatch.setattr("patchscope.experiment.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(FileExistsError, match="other settings"):
        run_experiment(_config(gemma_dir, corpus, tmp_path, profile=ProfileConfig(layer=LAYER, max_length=12)))


def test_explicit_neuron_and_cross_layer_patch(gemma, gemma_dir, corpus, tmp_path):
    config = _config(
        gemma_dir,
        corpus,
        tmp_path,
        neuron=12,
        patchscope=PatchscopeConfig(target_site="blocks.1.hook_resid_pre", max_new_tokens=3, controls=False),
    )
    result = run_experiment(config, progress=False)
    (record,) = result.neurons
    assert record.neuron == 12 and record.controls == {} and len(record.patched.generated_tokens) <= 3
    # recompute with plain hooks: the source vector from the document, written at layer 1, read at layer 2
    model, tokenizer = gemma
    source_site, neuron_site = f"blocks.{LAYER}.hook_resid_pre", f"blocks.{LAYER}.mlp.hook_post"
    doc_ids = tokenizer((FIXTURE_CORPUS * 2)[record.source.doc], return_tensors="pt").input_ids[:, :16]
    with capture(model, source_site) as source:
        model(doc_ids)
    vector = source[source_site][0, record.source.position]
    prompt_ids = tokenizer(PatchscopeConfig().prompt, return_tensors="pt").input_ids
    position = result.prompt.position
    with patch(model, "blocks.1.hook_resid_pre", vector, positions=[position]), capture(model, neuron_site) as target:
        model(prompt_ids)
    assert record.patched.at_placeholder == pytest.approx(float(target[neuron_site][0, position, 12]), abs=1e-4)


def test_result_summary_is_the_text_report(gemma_dir, corpus, tmp_path):
    from patchscope.experiment import ExperimentResult, format_summary

    result = run_experiment(
        _config(gemma_dir, corpus, tmp_path, neuron=3, patchscope=PatchscopeConfig(max_new_tokens=1, controls=False)),
        progress=False,
    )
    text = result.summary()
    assert text == format_summary(result) and text.startswith("=== Experiment Results ===")
    assert f"neuron 3: max activation {result.neurons[0].max_activation:.4f}" in text
    assert ExperimentResult.__doc__ and "summary()" in ExperimentResult.__doc__


def test_run_verdict_names_the_case_and_never_sells_same_layer_reactivation(gemma, gemma_dir, tmp_path):
    from patchscope.experiment import format_summary
    from patchscope.scope.verdict import occurs_in  # tested on hand-made cases in tests/test_verdict.py

    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in FIXTURE_CORPUS))

    def run(target_site, out):
        config = ExperimentConfig(
            model=str(gemma_dir),
            device="cpu",
            out=str(tmp_path / out),
            sae="none",
            neuron=7,
            source=SourceConfig(dataset=str(data), split=""),
            profile=ProfileConfig(layer=2, max_length=16),
            patchscope=PatchscopeConfig(prompt="Syria: Country in the Middle East, x", target_site=target_site, max_new_tokens=4),
        )
        return run_experiment(config, progress=False)

    tokenizer = gemma[1]
    same = run(None, "same")
    (record,) = same.neurons
    assert record.case == "same_layer" and "by construction and is not evidence" in record.verdict
    assert "above every control" not in record.verdict.split("holds by construction")[1]
    generated, random = record.patched.generated_tokens, record.controls["random_same_norm"].generated_tokens
    assert record.decode.same_as_unpatched == (generated == record.controls["unpatched"].generated_tokens)
    ids = tokenizer(FIXTURE_CORPUS[record.source.doc]).input_ids[:16]
    position = record.source.position
    # the source token and 5 tokens either side, compared as stripped strings
    context = {tokenizer.decode([i]).strip() for i in ids[max(0, position - 5) : position + 6]} - {""}

    def share(tokens):
        strings = {tokenizer.decode([i]).strip() for i in tokens} - {""}
        return len(strings & context) / len(strings)

    assert record.decode.patched == pytest.approx(share(generated))
    assert record.decode.random_same_norm == pytest.approx(share(random))
    source = tokenizer.decode([ids[position]]).strip()
    text = tokenizer.decode(generated, skip_special_tokens=True)
    assert record.decode.found_in["patched"] == occurs_in(source, text) and record.decode.source_token == source
    text = format_summary(same)
    assert "  decode: " in text and text.count("almost by construction") == 1  # explained once, above the neurons
    assert "  verdict: same layer: reactivation by construction, not evidence; " in text
    earlier = run("blocks.1.hook_resid_pre", "earlier").neurons[0]
    assert earlier.case == "earlier_target_layer" and "by construction" not in earlier.verdict
    later = run("blocks.3.hook_resid_pre", "later").neurons[0]
    assert later.case == "later_target_layer" and "cannot see the patch" in later.verdict
    stored = json.loads((tmp_path / "later" / "results.json").read_text())["neurons"][0]
    assert stored["case"] == "later_target_layer" and set(stored["decode"]) >= {
        "patched",
        "random_same_norm",
        "same_as_unpatched",
        "measure",
        "decoded",
    }
