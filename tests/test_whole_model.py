"""A whole model in one pass: `--layers`, the one-pass atlas against single-layer ones, `--max-tokens`."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest
import torch
from run_inputs import TEXTS, profile_argv, write_corpus

from patchscope.atlas.folder import CHECKPOINT, FolderRefused
from patchscope.atlas.layer_selection import LayerSelectionError, SiteKind, parse_layers
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.store import load_atlas
from patchscope.cli.main import main
from patchscope.model.sites import SITE_SUFFIXES, n_layers

CORPUS = TEXTS + [t.upper() for t in TEXTS][:6] + [" ".join(TEXTS[:6])]


@pytest.mark.parametrize(
    "text, count, layers",
    [("all", 4, (0, 1, 2, 3)), ("1-3", None, (1, 2, 3)), ("0,2", None, (0, 2)), ("3,0-1, 1", 4, (0, 1, 3)), ("2", 4, (2,))],
)
def test_layer_selections_expand_ascending_without_repeats(text, count, layers):
    assert parse_layers(text, count) == layers


@pytest.mark.parametrize(
    "text, count, message",
    [
        ("all", None, "needs the model's layer count"),
        ("3-1", None, "runs backwards; write 1-3"),
        ("1;2", None, "cannot be read"),
        ("", None, "cannot be read"),
        ("0-4", 4, "layer 4 is out of range, the model has layers 0..3"),
    ],
)
def test_bad_layer_selections_are_refused(text, count, message):
    with pytest.raises(LayerSelectionError, match=message):
        parse_layers(text, count)


def test_site_kinds_are_the_per_block_sites():
    assert get_args(SiteKind) == SITE_SUFFIXES


def test_layers_and_explicit_sites_are_one_run_key():
    from patchscope.atlas.key import Inputs, RunKey

    by_layers = ProfileConfig(layers="all", site_kind="hook_resid_post").for_model(3)
    by_sites = ProfileConfig(sites=tuple(f"blocks.{layer}.hook_resid_post" for layer in (2, 0, 1)))
    keys = [RunKey.of("m", None, config, "float32", Inputs()) for config in (by_layers, by_sites)]
    assert keys[0].fingerprint == keys[1].fingerprint
    assert ProfileConfig(layers="0-1", sites=("blocks.3.hook_resid_pre",)).site_names() == (
        "blocks.0.mlp.hook_post",
        "blocks.1.mlp.hook_post",
        "blocks.3.hook_resid_pre",
    )


@pytest.mark.parametrize("site_kind", ["mlp.hook_post", "hook_resid_post"])
def test_whole_model_atlas_equals_the_single_layer_atlases_bit_for_bit(any_model, site_kind):
    """One pass over every layer against one run per layer (each stopping after its own layer), on the
    tiny Gemma-2 and the tiny Llama: every tensor equal, not close."""
    model, tokenizer = any_model
    base = ProfileConfig(top_k=4, bottom_k=3, max_length=24, batch_tokens=96, site_kind=site_kind)
    whole = profile(model, tokenizer, CORPUS, dataclasses.replace(base, layers="all"), progress=False)
    count = n_layers(model)
    assert list(whole.sites) == [f"blocks.{layer}.{site_kind}" for layer in range(count)]
    for layer in range(count):
        single = profile(model, tokenizer, CORPUS, dataclasses.replace(base, layers=str(layer)), progress=False)
        site = f"blocks.{layer}.{site_kind}"
        tensors = single.tensors()
        assert tensors, site
        for name, tensor in tensors.items():
            assert torch.equal(whole.tensors()[name], tensor), name
    assert whole.n_tokens == single.n_tokens


def test_max_tokens_then_a_larger_budget_with_resume_equals_one_run(gemma, tmp_path):
    model, tokenizer = gemma
    config = ProfileConfig(layers="0-2", top_k=3, max_length=16, batch_tokens=48, sort_buffer=4, checkpoint_every=0)
    one_run = profile(model, tokenizer, CORPUS, config, progress=False)
    out = tmp_path / "budget"
    first = profile(model, tokenizer, CORPUS, dataclasses.replace(config, max_tokens=40), out=out, progress=False)
    assert first.meta.paused_at_tokens is not None and 40 <= first.meta.paused_at_tokens < one_run.n_tokens
    assert first.n_tokens == first.meta.paused_at_tokens
    assert (out / CHECKPOINT).exists() and (out / "atlas.json").exists()
    assert load_atlas(out).meta.paused_at_tokens == first.meta.paused_at_tokens
    with pytest.raises(FolderRefused, match="paused at its `max_tokens` budget"):
        profile(model, tokenizer, CORPUS, config, out=out, progress=False)
    second = profile(model, tokenizer, CORPUS, dataclasses.replace(config, max_tokens=90), out=out, resume=True, progress=False)
    assert second.meta.paused_at_tokens is not None and second.meta.paused_at_tokens >= 90
    assert second.meta.provenance.resumed_after_batches > 0
    last = profile(model, tokenizer, CORPUS, config, out=out, resume=True, progress=False)
    assert last.meta.paused_at_tokens is None and not (out / CHECKPOINT).exists()
    for name, tensor in one_run.tensors().items():
        assert torch.equal(last.tensors()[name], tensor), name
    assert load_atlas(out).n_tokens == one_run.n_tokens == last.n_tokens
    assert last.meta.n_documents == one_run.meta.n_documents


def test_cli_layers_profile_every_layer_once(gemma_dir, tmp_path, capsys):
    data = write_corpus(tmp_path / "corpus.jsonl", CORPUS)
    out = tmp_path / "all"
    argv = profile_argv(gemma_dir, data, out, "--layers", "all", "--top-k", "3", "--max-length", "16")
    assert main(argv) == 0
    assert "atlas state:" in capsys.readouterr().err  # said before the model loads
    atlas = load_atlas(out)
    assert list(atlas.sites) == [f"blocks.{layer}.mlp.hook_post" for layer in range(4)]
    for layer in range(4):
        assert (out / f"gemma2_neuron_mapping_layer_{layer}.json").exists()
    # the Parquet files of every layer read as one table, filtered on the layer column
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = ds.dataset(sorted(out.glob("top_examples_*.parquet")), format="parquet").to_table()
    assert sorted(set(table["layer"].to_pylist())) == [0, 1, 2, 3]
    middle = table.filter(pc.field("layer") >= 1).filter(pc.field("layer") <= 2)
    assert set(middle["site"].to_pylist()) == {"blocks.1.mlp.hook_post", "blocks.2.mlp.hook_post"}
    best = table.sort_by([("activation", "descending")]).slice(0, 1).to_pylist()[0]
    top = atlas.top_neurons_across(1)[0]
    assert (best["site"], best["neuron"], best["rank"]) == (top.site, top.neuron, 0)
    assert best["activation"] == pytest.approx(float(atlas[top.site].top.values[0, top.neuron]))


def test_top_neurons_across_sites_against_a_brute_force(gemma):
    model, tokenizer = gemma
    atlas = profile(model, tokenizer, CORPUS, ProfileConfig(layers="all", top_k=2, max_length=16), progress=False)
    every = sorted(
        (
            (float(atlas[site].max[n]), -i, -n, site, n)
            for i, site in enumerate(atlas.sites)
            for n in range(atlas[site].n_neurons)
        ),
        reverse=True,
    )
    assert [(t.site, t.neuron) for t in atlas.top_neurons_across(7)] == [(site, n) for *_, site, n in every[:7]]
    two = atlas.top_neurons_across(3, sites=["blocks.3.mlp.hook_post", "blocks.1.mlp.hook_post"])
    assert {t.site for t in two} <= {"blocks.3.mlp.hook_post", "blocks.1.mlp.hook_post"}
    assert [t.max for t in two] == sorted((t.max for t in two), reverse=True)


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--layers", "2-9"), "--layers 2-9: layer 4 is out of range, the model has layers 0..3"),
        (("--layers", "x"), "--layers 'x' cannot be read"),
        (("--max-tokens", "0"), "--max-tokens must be at least 1"),
        (("--layers", "all", "--site-kind", "hook_z"), "invalid choice: 'hook_z'"),
    ],
)
def test_cli_bad_layers_fail_before_the_model_loads(gemma_dir, tmp_path, capsys, monkeypatch, flags, message):
    import patchscope.model.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(loading, "load_model_until", lambda *a, **k: pytest.fail("the model loaded"))
    data = write_corpus(tmp_path / "corpus.jsonl", CORPUS)
    try:
        code = main(profile_argv(gemma_dir, data, tmp_path / "out", *flags))
    except SystemExit as stopped:  # argparse's own refusals (a bad choice)
        code = stopped.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("changes", [{}, {"bottom_k": 0, "histogram": False}, {"top_k": 7}])
def test_the_footprint_said_before_starting_is_the_state_the_atlas_holds(gemma, changes):
    from patchscope.atlas.footprint import footprint, widths_from_config

    model, tokenizer = gemma
    config = ProfileConfig(layers="0,2", sites=("blocks.1.hook_resid_post",), max_length=16, **changes).for_model(4)
    atlas = profile(model, tokenizer, CORPUS, config, progress=False)
    said = footprint(config, widths_from_config(config.site_names(), model.config.hidden_size, model.config.intermediate_size))
    for site in config.site_names():
        held = sum(t.numel() * t.element_size() for name, t in atlas.tensors().items() if name.startswith(site + "/"))
        assert said.per_site[site] == held, site
    assert said.workspace == config.batch_tokens * 128 * 4  # the widest site's, reduced site by site
    assert "atlas state:" in said.describe() and "x 3 sites" in said.describe()


def _run_argv(model_dir, data, out, *flags: str) -> list[str]:
    argv = ["run", "--model", str(model_dir), "--device", "cpu", "--dataset", str(data), "--split", "", "--max-length", "16"]
    return argv + ["--top-k", "3", "--sae", "none", "--max-new-tokens", "2", "--out", str(out), *flags]


def _brute_force_pick(atlas, sites: list[str], n: int, pick: str) -> list[tuple[str, int]]:
    """The pick, from the atlas's max tensors alone: largest max first, ties to the earlier site, then the lower index."""
    ranked = {site: sorted(range(atlas[site].n_neurons), key=lambda i: (-float(atlas[site].max[i]), i)) for site in sites}
    if pick == "per-layer":
        return [(site, i) for site in sites for i in ranked[site][:n]]
    every = [
        (-float(atlas[site].max[i]), order, i, site) for order, site in enumerate(sites) for i in range(atlas[site].n_neurons)
    ]
    return [(site, i) for *_, i, site in sorted(every)[:n]]


def _hand_patched(model, tokenizer, text: str, position: int, max_length: int, layer: int, neuron: int, prompt: str, at: int):
    """A plain HF forward with hand-written hooks: the vector entering layer ``layer`` at the top example, written
    at ``at`` of the prompt entering the same layer, and the neuron read there (the input of its down_proj)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_length]
    with torch.no_grad():
        vector = model(ids, output_hidden_states=True).hidden_states[layer][0, position]  # blocks.L.hook_resid_pre
    block, seen = model.model.layers[layer], {}

    def write(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        hidden[0, at] = vector
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handles = [
        block.register_forward_pre_hook(write, with_kwargs=True),
        block.mlp.down_proj.register_forward_pre_hook(lambda module, args: seen.update(post=args[0])),
    ]
    try:
        with torch.no_grad():
            model(tokenizer(prompt, return_tensors="pt").input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen["post"][0, :, neuron]  # [pos]


@pytest.mark.parametrize("pick", ["per-layer", "overall"])
@pytest.mark.parametrize("family", ["gemma_dir", "llama_dir"])
def test_run_layers_studies_each_neuron_at_its_own_layer(family, pick, request, tmp_path, capsys):
    """`run --layers all --pick ...`: the neurons are the brute-force pick over the atlas, and each one's patched
    readout is a plain HF forward that writes its own top example's vector at its own layer."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = request.getfixturevalue(family)
    data = write_corpus(tmp_path / "corpus.jsonl", CORPUS)
    out = tmp_path / "run"
    assert main(_run_argv(model_dir, data, out, "--layers", "all", "--pick", pick, "--top-neurons", "4")) == 0
    printed = capsys.readouterr().out
    atlas, results = load_atlas(out), json.loads((out / "results.json").read_text())
    layers = list(range(n_layers_of(model_dir)))
    mlp = [f"blocks.{layer}.mlp.hook_post" for layer in layers]
    assert set(atlas.sites) == {*mlp, *(f"blocks.{layer}.hook_resid_pre" for layer in layers)}  # profiled in one pass
    assert [(n["site"], n["neuron"]) for n in results["neurons"]] == _brute_force_pick(atlas, mlp, 4, pick)
    assert results["sites"]["layers"] == layers and results["sites"]["pick"] == pick
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    tokenizer, texts, prompt = AutoTokenizer.from_pretrained(model_dir), atlas.texts(), results["prompt"]
    for n in results["neurons"]:
        layer, source = n["layer"], n["source"]
        assert n["site"] == f"blocks.{layer}.mlp.hook_post" and source["site"] == f"blocks.{layer}.hook_resid_pre"
        assert n["max_activation"] == float(atlas[n["site"]].max[n["neuron"]])
        along = _hand_patched(
            model, tokenizer, texts[source["doc"]], source["position"], 16, layer, n["neuron"], prompt["text"], prompt["position"]
        )
        torch.testing.assert_close(torch.tensor(n["patched"]["prompt_activations"]), along, rtol=1e-4, atol=1e-5)
        assert n["patched"]["at_placeholder"] == n["patched"]["prompt_activations"][prompt["position"]]
        assert f"layer {layer} neuron {n['neuron']}: max activation" in printed
    report = (out / "report.html").read_text()
    for n in results["neurons"]:  # the run report names each neuron's layer
        assert f"<tr data-neuron={n['neuron']} data-layer={n['layer']}>" in report
        assert f"id='neuron-{n['layer']}-{n['neuron']}'" in report or f'id="neuron-{n["layer"]}-{n["neuron"]}"' in report


def n_layers_of(model_dir) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).num_hidden_layers


def test_run_layers_reuses_a_profile_of_those_layers_and_computes_their_means_once(gemma_dir, tmp_path, capsys):
    """A `profile --layers all` folder serves `run --layers all`: the missing source sites' means come from one
    extra pass, and the results equal those of a run that profiled everything itself."""
    import json

    data = write_corpus(tmp_path / "corpus.jsonl", CORPUS)
    reused, fresh = tmp_path / "reused", tmp_path / "fresh"
    assert main(profile_argv(gemma_dir, data, reused, "--layers", "all", "--top-k", "3", "--max-length", "16")) == 0
    for out in (reused, fresh):
        assert main(_run_argv(gemma_dir, data, out, "--layers", "all", "--top-neurons", "2")) == 0
    printed = capsys.readouterr().out
    assert "the atlas has no blocks.0.hook_resid_pre, blocks.1.hook_resid_pre, blocks.2.hook_resid_pre, " in printed
    assert "their corpus means were computed in this run" in printed
    first, second = (json.loads((out / "results.json").read_text()) for out in (reused, fresh))
    assert "atlas reused from --out" in first["notes"] or "atlas reused from `out`" in first["notes"]
    assert [(n["site"], n["neuron"]) for n in first["neurons"]] == [(n["site"], n["neuron"]) for n in second["neurons"]]
    for a, b in zip(first["neurons"], second["neurons"]):
        assert a["patched"]["at_placeholder"] == b["patched"]["at_placeholder"]
        got, want = a["controls"]["corpus_mean"]["at_placeholder"], b["controls"]["corpus_mean"]["at_placeholder"]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_run_layers_reads_with_an_sae_only_the_vectors_of_its_own_site(gemma_dir, tmp_path, capsys):
    """Over several layers a given SAE reads the layer it was trained on, as the single-layer run of that layer does."""
    import json

    from sae_files import sae_params, write_npz

    data = write_corpus(tmp_path / "corpus.jsonl", CORPUS)
    sae = write_npz(
        tmp_path / "sae" / "layer_1/width_16k/average_l0_30/params.npz", sae_params(seed=7)
    )  # blocks.2.hook_resid_pre
    whole, single = tmp_path / "whole", tmp_path / "single"
    flags = ("--top-neurons", "2", "--sae", str(sae))
    assert main([*_run_argv(gemma_dir, data, whole, "--layers", "all", *flags)]) == 0
    assert (
        "reads the vectors of blocks.2.hook_resid_pre; the other layers' neurons have no SAE read-out" in capsys.readouterr().out
    )
    assert main([*_run_argv(gemma_dir, data, single, "--layer", "2", *flags)]) == 0
    many, one = (json.loads((out / "results.json").read_text())["neurons"] for out in (whole, single))
    assert [n["layer"] for n in many if n["sae"]] == [2, 2] and all(n["sae"] is None for n in many if n["layer"] != 2)
    assert [n["sae"] for n in many if n["layer"] == 2] == [n["sae"] for n in one]
    wrong = write_npz(tmp_path / "sae" / "layer_3/width_16k/average_l0_30/params.npz", sae_params(seed=7))  # after the last layer
    assert main([*_run_argv(gemma_dir, data, tmp_path / "refused", "--layers", "0-2", "--sae", str(wrong))]) == 2
    assert "no studied layer's vector comes from there" in capsys.readouterr().err


def test_run_layer_alone_studies_that_layer_as_before(gemma_dir, tmp_path):
    """Without `--layers`, `--pick` changes nothing: the `--layer` neurons, the same sites, the same results key."""
    import json

    data = write_corpus(tmp_path / "corpus.jsonl", CORPUS)
    keys = []
    for pick in ("per-layer", "overall"):
        out = tmp_path / pick
        assert main(_run_argv(gemma_dir, data, out, "--layer", "2", "--top-neurons", "2", "--pick", pick)) == 0
        results, atlas = json.loads((out / "results.json").read_text()), load_atlas(out)
        assert list(atlas.sites) == ["blocks.2.mlp.hook_post", "blocks.2.hook_resid_pre"]
        assert results["sites"] == {
            "source": "blocks.2.hook_resid_pre",
            "target": "blocks.2.hook_resid_pre",
            "neuron": "blocks.2.mlp.hook_post",
        }
        assert [n["neuron"] for n in results["neurons"]] == atlas.top_neurons("blocks.2.mlp.hook_post", 2)
        assert {n["layer"] for n in results["neurons"]} == {2}
        keys.append(results["key"])
    assert keys[0] == keys[1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--pick", "overall", "--neuron", "3"), "use it with --pick per-layer"),
        (("--source-site", "blocks.1.hook_resid_pre"), "--source-site and --target-site name one layer"),
        (("--site-kind", "hook_resid_post"), "the --site-kind is mlp.hook_post, not hook_resid_post"),
        (("--pick", "both"), "invalid choice: 'both'"),
    ],
)
def test_run_layers_refuses_what_it_cannot_pick_before_the_model_loads(gemma_dir, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr("patchscope.experiment.load_model", lambda *a, **k: pytest.fail("the model loaded"))
    data = write_corpus(tmp_path / "corpus.jsonl", CORPUS)
    try:
        code = main(_run_argv(gemma_dir, data, tmp_path / "out", "--layers", "all", *flags))
    except SystemExit as stopped:  # argparse's own refusals (a bad choice)
        code = stopped.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_the_progress_bar_counts_what_is_known_and_estimates_from_the_first_batches():
    from patchscope.atlas.progress import Progress

    budget = Progress("p", n_documents=None, max_tokens=1000, tokens_done=200, enabled=False)
    assert budget.by_tokens and budget.bar.total == 1000 and budget.bar.n == 200
    budget.update(100, 2, 0)
    assert budget.tokens_done == 300 and "the 1,000-token budget takes about" in budget.estimate(100.0)  # 7 s left
    assert "about 7 s more" in budget.estimate(100.0)
    corpus = Progress("p", n_documents=10, max_tokens=None, enabled=False)
    assert not corpus.by_tokens and corpus.bar.total == 10
    corpus.update(50, 2, 2)
    assert "the 10 documents take about 2 s more" in corpus.estimate(100.0)  # 8 documents x 25 tokens at 100/s
    stream = Progress("p", n_documents=None, max_tokens=None, enabled=False)
    stream.update(50, 2, 7)
    assert stream.bar.total is None and stream.estimate(100.0) == "first 1 batches: 100 tokens/s"
