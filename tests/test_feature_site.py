"""SAE features as a profiled site (patchscope/atlas/feature_site.py, sae/features.py) against a brute force."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import FIXTURE_CORPUS
from sae_files import numpy_jumprelu, sae_params, write_gemma_scope_2

from patchscope.atlas.feature_site import SEPARATOR
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.sources import SourceConfig
from patchscope.atlas.store import load_atlas
from patchscope.sae.features import feature_site
from patchscope.sae.jumprelu import SAEError
from patchscope.sae.loaders import load_sae

LAYER = 1
READS = f"blocks.{LAYER}.hook_resid_post"
NEURONS = f"blocks.{LAYER}.mlp.hook_post"
CORPUS = [t for t in FIXTURE_CORPUS if t] + [t.upper() for t in FIXTURE_CORPUS if t][:4]
K = 6


def _tied_params():
    """A small SAE in which feature 0 is 1.0 at every token and feature 1 is 0.0 everywhere: exact ties."""
    params = sae_params(seed=13, d_model=64, d_sae=40)
    params["threshold"][:] = 0.05
    params["W_enc"][:, :2] = 0.0
    params["b_enc"][0], params["b_enc"][1] = 1.0, -1.0
    return params


def _brute_force(model, tokenizer, params, max_length):
    """Every counted token, one document alone, the whole model: (feature acts, doc, pos, token)."""
    rows, store = [], {}
    handle = model.model.layers[LAYER].register_forward_hook(lambda m, a, out: store.__setitem__("x", out))
    try:
        for doc, text in enumerate(CORPUS):
            ids = tokenizer(text).input_ids[:max_length]
            model(torch.tensor([ids]))
            out = store["x"][0] if isinstance(store["x"], tuple) else store["x"]
            acts, _ = numpy_jumprelu(params, out[0].detach().numpy())  # [pos, d_sae], float64
            rows += [(acts[j], doc, j, ids[j]) for j in range(1, len(ids))]  # BOS excluded
    finally:
        handle.remove()
    return rows


@pytest.fixture(scope="module")
def profiled(gemma, tmp_path_factory):
    model, tokenizer = gemma
    params = _tied_params()
    folder = write_gemma_scope_2(tmp_path_factory.mktemp("gs2") / "resid_post/layer_1_width_16k_l0_medium", params,
                                 f"model.layers.{LAYER}.output")  # fmt: skip
    sae = load_sae(folder)
    feature = feature_site(sae, label="tiny")
    small = type(feature)(**{**feature.__dict__, "encode_bytes": 4 * feature.d_sae * 7})  # 7 tokens a chunk
    assert small.chunk_tokens == 7
    config = ProfileConfig(sites=(NEURONS,), top_k=K, bottom_k=3, max_length=12, batch_tokens=48)
    out = tmp_path_factory.mktemp("atlas")
    atlas = profile(model, tokenizer, CORPUS, config, features=[small], out=out, progress=False)
    alone = profile(model, tokenizer, CORPUS, config, progress=False)
    return atlas, alone, _brute_force(model, tokenizer, params, 12), small, out


def test_feature_atlas_matches_numpy_brute_force_ties_included(profiled):
    atlas, _, rows, feature, _ = profiled
    stats = atlas[feature.name]
    assert stats.top.values.shape == (K, feature.d_sae)
    for f in range(feature.d_sae):
        ranked = sorted(((r[0][f], r[1], r[2], r[3]) for r in rows), key=lambda c: (-c[0], c[1], c[2]))
        np.testing.assert_allclose(stats.top.values[:, f].numpy(), [c[0] for c in ranked[:K]], rtol=1e-5, atol=1e-5)
        for rank in range(K):
            tie = any(abs(ranked[rank][0] - ranked[j][0]) < 1e-5 for j in (rank - 1, rank + 1) if 0 <= j < len(ranked))
            exact = ranked[rank][0] in (0.0, 1.0)  # the constant features: exact ties, broken by document then position
            if exact or not tie:
                got = (int(stats.top.doc[rank, f]), int(stats.top.pos[rank, f]), int(stats.top.token[rank, f]))
                assert got == ranked[rank][1:], (f, rank)
        column = np.array([r[0][f] for r in rows])
        assert int(stats.moments.fire_count[f]) == int((column > 0).sum())
        np.testing.assert_allclose(float(stats.moments.total[f]), column.sum(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(float(stats.moments.total_sq[f]), (column**2).sum(), rtol=1e-4, atol=1e-4)
    assert int(stats.moments.n_tokens) == len(rows)
    assert stats.top.values[:, 0].tolist() == [1.0] * K and stats.top.values[:, 1].tolist() == [0.0] * K
    assert stats.histogram is not None and int(stats.histogram[0].sum()) == len(rows)


def test_neurons_are_unchanged_by_profiling_features_beside_them(profiled):
    atlas, alone, *_ = profiled
    for part in ("values", "doc", "pos", "token"):
        assert torch.equal(getattr(atlas[NEURONS].top, part), getattr(alone[NEURONS].top, part))
    assert torch.equal(atlas[NEURONS].moments.total, alone[NEURONS].moments.total)


def test_a_saved_feature_atlas_loads_again(profiled):
    atlas, _, _, feature, out = profiled
    loaded = load_atlas(out)
    assert set(loaded.sites) == {NEURONS, feature.name}
    assert torch.equal(loaded[feature.name].top.values, atlas[feature.name].top.values)


def test_the_16k_block_is_chunked_and_counted_in_the_size_check():
    from patchscope.atlas.feature_site import FeatureSite

    feature = FeatureSite(READS, "16k", d_in=640, d_sae=16384, encode=lambda x: x)
    assert feature.chunk_tokens == 1024  # 4,096 tokens x 16,384 features would be 256 MiB at once
    assert feature.block_bytes(4096) == 64 * 2**20
    config = ProfileConfig(top_k=20)
    with pytest.raises(ValueError, match="GiB of encoded SAE chunks"):
        config.check_atlas_size({feature.name: 16384}, block_bytes=2**62)


def test_unreadable_and_mismatched_saes_are_refused(tmp_path):
    attn = load_sae(write_gemma_scope_2(tmp_path / "attn_out/layer_1_width_16k_l0_big", sae_params(),
                                        "model.layers.1.self_attn.o_proj.input"))  # fmt: skip
    with pytest.raises(SAEError, match="hook_z"):
        feature_site(attn)
    resid = load_sae(write_gemma_scope_2(tmp_path / "resid_post/layer_1_width_16k_l0_big", sae_params(), "model.layers.1.output"))
    with pytest.raises(SAEError, match="trained on blocks.1.hook_resid_post"):
        feature_site(resid, site="blocks.1.hook_resid_pre")


def test_profile_and_report_with_sae_write_feature_pages(gemma_dir, tmp_path, capsys):
    from patchscope.cli.main import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    folder = write_gemma_scope_2(tmp_path / "resid_post/layer_1_width_16k_l0_medium", _tied_params(), "model.layers.1.output")
    common = ["--model", str(gemma_dir)]
    assert main(["profile", *common, "--dataset", str(corpus), "--site", NEURONS, "--max-length", "12",
                 "--top-k", "4", "--quantile-examples", "1", "--sae", str(folder), "--out", str(tmp_path / "atlas")]) == 0  # fmt: skip
    name = f"{READS}@sae-16k"
    assert name in load_atlas(tmp_path / "atlas").sites
    assert main(["report", str(tmp_path / "atlas"), "--out", str(tmp_path / "bare"), "--top", "2"]) == 2  # "pass that SAE"
    assert "pass that SAE (--sae)" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "atlas"), "--out", str(tmp_path / "site"), "--top", "2", "--sae", str(folder)]) == 0
    pages = sorted(p.name for p in (tmp_path / "site" / "neurons").glob(f"{name}-*.html"))
    assert len(pages) == 2
    page = (tmp_path / "site" / "neurons" / pages[0]).read_text()
    assert "Top activations" in page and "Examples across the activation range" in page


# -- resume, merge and torchrun: a feature atlas equals the one run, every tensor


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    """A corpus file, a Gemma Scope 2 folder (with exact ties), and the flags of one feature run."""
    from run_inputs import write_corpus

    base = tmp_path_factory.mktemp("feature-run")
    corpus = write_corpus(base / "corpus.jsonl", [*CORPUS, *(t.lower() for t in CORPUS)])
    folder = write_gemma_scope_2(base / "resid_post/layer_1_width_16k_l0_medium", _tied_params(), f"model.layers.{LAYER}.output")
    flags = ["--site", NEURONS, "--sae", str(folder), "--top-k", "4", "--bottom-k", "2", "--max-length", "12",
             "--batch-tokens", "48", "--sort-buffer", "4", "--dtype", "float32"]  # fmt: skip
    return corpus, folder, flags


def assert_same_atlas(ours, expected) -> None:
    mine, theirs = ours.tensors(), expected.tensors()
    assert mine.keys() == theirs.keys()
    assert any(SEPARATOR in name for name in theirs)
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name


def test_an_interrupted_feature_run_resumes_to_the_one_run(gemma_dir, feature_run, tmp_path):
    from run_inputs import ctrl_c_at_batch, profile_argv

    from patchscope.atlas.folder import CHECKPOINT
    from patchscope.cli.main import main

    corpus, folder, flags = feature_run
    argv = profile_argv(gemma_dir, corpus, tmp_path / "o", *flags, "--checkpoint-every", "1")
    with ctrl_c_at_batch(3):
        assert main(argv) == 130  # stopped, with a checkpoint of 3 batches
    assert (tmp_path / "o" / CHECKPOINT).exists()
    copy = shutil.copytree(
        folder, tmp_path / "copy" / "resid_post" / folder.name
    )  # one SAE, known by its content wherever it lies
    same = [str(copy) if arg == str(folder) else arg for arg in argv]
    assert load_sae(same[same.index("--sae") + 1]).info.source != load_sae(folder).info.source
    assert main([*same, "--resume"]) == 0
    assert main(profile_argv(gemma_dir, corpus, tmp_path / "one", *flags)) == 0
    resumed = load_atlas(tmp_path / "o")
    assert resumed.meta.provenance.resumed_after_batches == 3
    assert_same_atlas(resumed, load_atlas(tmp_path / "one"))


def _other_sae(folder):
    """The same folder name and site, other weights: another SAE under the same feature-site name."""
    params = _tied_params()
    params["W_enc"][:, 5:] *= -1.0
    return write_gemma_scope_2(folder.parent.parent / "other" / folder.relative_to(folder.parent.parent), params,
                               f"model.layers.{LAYER}.output")  # fmt: skip


def test_a_resume_with_another_sae_is_refused_before_loading(gemma_dir, feature_run, tmp_path, capsys):
    from run_inputs import ctrl_c_at_batch, profile_argv

    from patchscope.cli.main import main

    corpus, folder, flags = feature_run
    argv = profile_argv(gemma_dir, corpus, tmp_path / "o", *flags, "--checkpoint-every", "1")
    with ctrl_c_at_batch(2):
        assert main(argv) == 130
    other = [str(_other_sae(folder)) if arg == str(folder) else arg for arg in argv]
    assert main([*other, "--resume"]) == 2
    assert "made with other settings" in capsys.readouterr().err


def _slices(gemma, corpus, config, features, tmp_path, splits):
    model, tokenizer = gemma
    for split in splits:
        source = SourceConfig(dataset=str(corpus), split=split)
        profile(model, tokenizer, source, config, features=features, out=tmp_path / split, progress=False)


def test_merged_slices_of_a_feature_run_equal_the_one_run(gemma, feature_run, tmp_path):
    from patchscope.cli.main import main

    corpus, folder, _ = feature_run
    model, tokenizer = gemma
    features = [feature_site(load_sae(folder))]
    config = ProfileConfig(sites=(NEURONS,), top_k=4, bottom_k=2, max_length=12, batch_tokens=48, sort_buffer=4)
    _slices(gemma, corpus, config, features, tmp_path, ("[0:8]", "[8:20]", "[20:]"))  # block boundaries: the one run's batches
    union = profile(model, tokenizer, SourceConfig(dataset=str(corpus), split=""), config, features=features, progress=False)
    assert main(["merge", str(tmp_path / "m"), *(str(tmp_path / s) for s in ("[20:]", "[0:8]", "[8:20]"))]) == 0
    merged = load_atlas(tmp_path / "m")
    assert_same_atlas(merged, union)
    assert merged.meta.features == union.meta.features == {features[0].name: features[0].identity}

    other = [feature_site(load_sae(_other_sae(folder)))]
    assert other[0].name == features[0].name and other[0].identity != features[0].identity
    _slices(gemma, corpus, config, other, tmp_path / "other", ("[8:20]",))
    assert main(["merge", str(tmp_path / "mixed"), str(tmp_path / "[0:8]"), str(tmp_path / "other" / "[8:20]")]) == 2
    assert not (tmp_path / "mixed" / "atlas.safetensors").exists()


def test_two_ranks_of_a_feature_run_equal_one_process(gemma_dir, feature_run, tmp_path):
    from run_inputs import profile_argv, torchrun

    from patchscope.cli.main import main

    corpus, _, flags = feature_run
    result = torchrun(profile_argv(gemma_dir, corpus, tmp_path / "two", *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # like each rank: CPU kernels round differently with another thread count
    try:
        assert main(profile_argv(gemma_dir, corpus, tmp_path / "one", *flags)) == 0
    finally:
        torch.set_num_threads(previous)
    two = load_atlas(tmp_path / "two")
    assert two.meta.provenance.world_size == 2 and all(rank.batches > 0 for rank in two.meta.provenance.ranks)
    assert_same_atlas(two, load_atlas(tmp_path / "one"))


# -- quantile examples: each feature gets what a neuron gets


def _brute_quantiles(rows, upper: float, feature: int, m: int, tol: float = 1e-5):
    """Per interval of ``(0, upper]``: the m (hash, doc, pos) with the smallest hashes among the tokens inside it,
    how many are inside, and whether a value within float rounding of an edge makes the interval uncertain."""
    from patchscope.kernels.quantiles import INTERVALS, example_hash

    cells = [{"inside": [], "uncertain": False} for _ in range(INTERVALS)]
    for acts, doc, pos, _ in rows:
        value = float(acts[feature])
        if value <= tol:  # zero (or all but): never picked; a value this small is not in this test's SAE
            continue
        edges = [upper * b / INTERVALS for b in range(1, INTERVALS)]
        interval = min(sum(value > edge for edge in edges), INTERVALS - 1)  # the maximum itself is in the last one
        near = [b for b, edge in enumerate(edges) if abs(value - edge) <= tol * max(1.0, upper)]
        for b in near:  # an edge between intervals b and b + 1
            cells[b]["uncertain"] = cells[b + 1]["uncertain"] = True
        hashed = int(example_hash(torch.tensor([doc]), torch.tensor([pos]))[0])
        cells[interval]["inside"].append((hashed, doc, pos, value))
    return [(sorted(c["inside"])[:m], len(c["inside"]), c["uncertain"]) for c in cells]


def test_feature_quantile_examples_match_numpy_brute_force(gemma, profiled):
    model, tokenizer = gemma
    _, _, rows, feature, _ = profiled
    m = 2
    config = ProfileConfig(sites=(NEURONS,), top_k=K, bottom_k=3, max_length=12, batch_tokens=48, quantile_examples=m)
    atlas = profile(model, tokenizer, CORPUS, config, features=[feature], progress=False)
    picks = atlas[feature.name].quantiles
    assert picks is not None and atlas[NEURONS].quantiles is not None
    checked = 0
    for f in range(feature.d_sae):
        upper = float(atlas[feature.name].max[f])
        for b, (expected, count, uncertain) in enumerate(_brute_quantiles(rows, upper, f, m)):
            if uncertain:
                continue
            assert int(picks.count[b, f]) == count, (f, b)
            got = [(int(picks.hash[b, s, f]), int(picks.doc[b, s, f]), int(picks.pos[b, s, f])) for s in range(m)]
            assert [g for g in got if g[1] >= 0] == [e[:3] for e in expected], (f, b)
            np.testing.assert_allclose(picks.values[b, : len(expected), f].numpy(), [e[3] for e in expected], rtol=1e-5)
            checked += bool(expected)
    assert checked > feature.d_sae  # most features have examples in several intervals
    assert int(picks.count[-1, 0]) == len(rows) and int(picks.count[:, 1].sum()) == 0  # the constant features


def test_the_quantile_pass_needs_the_profiled_sae(gemma, profiled, tmp_path):
    from patchscope.atlas.quantile_pass import quantile_examples

    model, tokenizer = gemma
    atlas, _, _, feature, _ = profiled
    config = ProfileConfig(sites=(NEURONS,), top_k=K, max_length=12, batch_tokens=48, quantile_examples=1)
    with pytest.raises(ValueError, match="pass that SAE"):
        quantile_examples(model, tokenizer, [], atlas, config)
    other = feature_site(load_sae(_other_sae(write_gemma_scope_2(
        tmp_path / "resid_post/layer_1_width_16k_l0_medium", _tied_params(), f"model.layers.{LAYER}.output"))), label="tiny")  # fmt: skip
    with pytest.raises(ValueError, match="profiled with the SAE"):
        quantile_examples(model, tokenizer, [], atlas, config, [other])


# -- the experiment: the vector's top features link to their atlas pages


def test_a_run_that_profiles_the_sae_links_its_top_features_to_their_pages(gemma_dir, feature_run, tmp_path):
    import json
    import re

    from patchscope.experiment import ExperimentConfig, run_experiment
    from patchscope.scope.config import PatchscopeConfig

    corpus, folder, _ = feature_run
    config = ExperimentConfig(
        model=str(gemma_dir),
        device="cpu",
        out=str(tmp_path / "out"),
        sae=str(folder),
        profile_features=True,
        top_neurons=2,
        source=SourceConfig(dataset=str(corpus), split=""),
        profile=ProfileConfig(layer=LAYER + 1, max_length=12, top_k=3),  # its resid_pre is the SAE's resid_post
        patchscope=PatchscopeConfig(max_new_tokens=2),
    )
    result = run_experiment(config, progress=False)
    name = f"{READS}@sae-16k"
    atlas = load_atlas(tmp_path / "out")
    assert name in atlas.sites and atlas.meta.features[name].endswith(feature_site(load_sae(folder)).identity.split("#")[1])
    html = (tmp_path / "out" / "report.html").read_text()
    links = set(re.findall(r"href='(dashboard/neurons/[^']+)'", html))
    for neuron in json.loads((tmp_path / "out" / "results.json").read_text())["neurons"]:
        sae = neuron["sae"]
        listed = {f["index"] for f in sae["top_features"] + sae["features_driving_neuron"]}
        assert {int(i) for i in sae["feature_pages"]} == listed
        for index in listed:
            page = sae["feature_pages"][str(index)]
            assert page == f"dashboard/neurons/{name}-{index}.html" and page in links
            text = (tmp_path / "out" / page).read_text()
            assert "Top activations" in text and f"data-stat='max' data-v='{float(atlas[name].max[index])!r}'" in text
        for hit in sae["top_features"]:  # the vector is read at a corpus token: no feature exceeds its corpus maximum
            assert hit["activation"] <= float(atlas[name].max[hit["index"]]) + 1e-4
    assert len(result.neurons) == 2 and links

    # a later run on the same atlas with another SAE under the same name: no links to pages of that other SAE
    other = run_experiment(dataclasses.replace(config, sae=str(_other_sae(folder)), profile_features=False), progress=False)
    assert result.results_file != other.results_file
    assert all(n.sae is not None and n.sae.feature_pages == {} for n in other.neurons)
    assert "dashboard/neurons/" not in Path(other.report_file).read_text()


# -- the Neuronpedia batch export of features


def test_the_neuronpedia_export_of_features_replays_them_through_their_sae(gemma, profiled, tmp_path):
    import json

    from patchscope.report.neuronpedia import export_neuronpedia

    model, tokenizer = gemma
    atlas, _, rows, feature, _ = profiled
    stats = atlas[feature.name]
    fired = [f for f in range(feature.d_sae) if float(stats.max[f]) > 0][:6]
    texts = dict(enumerate(CORPUS))
    with pytest.raises(ValueError, match="pass that SAE"):
        export_neuronpedia(atlas, tmp_path / "bare", model=model, tokenizer=tokenizer, texts=texts, site=feature.name)
    (path,) = export_neuronpedia(atlas, tmp_path / "np", model=model, tokenizer=tokenizer, texts=texts, site=feature.name,
                                 neurons=fired, features=[feature])  # fmt: skip
    batch = json.loads(path.read_text())
    assert batch["layer"] == LAYER and [f["feature_index"] for f in batch["features"]] == fired
    for record in batch["features"]:
        f = record["feature_index"]
        column = np.array([r[0][f] for r in rows])  # the brute force's NumPy encode of every counted token
        assert record["frac_nonzero"] == pytest.approx(float((column > 0).mean()))
        first = record["activations"][0]  # the top example: its qualifying token holds the feature's maximum
        assert first["values"][first["qualifying_token_index"]] == pytest.approx(column.max(), rel=1e-4, abs=1e-4)
        assert record["pos_str"] == [] and record["logits_hist_data_bar_heights"] == []
