"""Bottom-k, histograms, quantile examples and the output-token view: against brute force, and exact merges."""

import random

import pytest
import torch
from factories import FIXTURE_CORPUS

from patchscope.atlas.atlas import Atlas, AtlasError
from patchscope.atlas.output_tokens import output_tokens
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.atlas.quantile_pass import quantile_examples
from patchscope.atlas.sources import Document
from patchscope.atlas.store import load_atlas, save_atlas
from patchscope.kernels.bottomk import batch_bottomk, bottomk_candidates, empty_bottomk, merge_bottomk, merge_bottomk_fast
from patchscope.kernels.histogram import CENTER, N_BINS, batch_histogram, batch_histogram_reference, bin_ranges
from patchscope.kernels.quantiles import INTERVALS, batch_quantiles, example_hash, merge_quantiles

LAYER = 2
SITE = f"blocks.{LAYER}.mlp.hook_post"
CORPUS = [t for t in FIXTURE_CORPUS if t] + [t.upper() for t in FIXTURE_CORPUS if t][:5]


def reference_rows(model, tokenizer, texts, max_length):
    """Every counted token (BOS excluded, truncated): (acts[n] list, doc, position), one document at a time, full forward."""
    rows, store = [], {}
    handle = model.model.layers[LAYER].mlp.down_proj.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0]))
    try:
        for doc, text in enumerate(texts):
            ids = tokenizer(text).input_ids[:max_length]
            model(torch.tensor([ids]))
            rows += [(store["x"][0, j].tolist(), doc, j) for j in range(1, len(ids))]
    finally:
        handle.remove()
    return rows


def _batch(tokens=200, n=9, seed=0, ties=True):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(tokens, n, generator=g) * 3
    if ties:
        acts[::7] = acts[::7].round()  # many exact ties
        acts[5, 0], acts[6, 1], acts[7, 2] = float("nan"), float("-inf"), float("inf")
    doc = torch.arange(tokens) // 20 + 100
    pos = torch.arange(tokens) % 20
    token = torch.randint(0, 50, (tokens,), generator=g)
    counted = torch.rand(tokens, generator=g) > 0.15
    return acts, doc, pos, token, counted


# -- bottom-k


def brute_bottomk(acts, doc, pos, counted, k):
    out = []
    for n in range(acts.shape[1]):
        rows = [
            (float(acts[t, n]), int(doc[t]), int(pos[t]))
            for t in range(acts.shape[0])
            if counted[t] and torch.isfinite(acts[t, n])
        ]
        out.append(sorted(rows)[:k])  # value ascending, then document, then position
    return out


def test_bottomk_kernel_matches_brute_force_and_reference():
    acts, doc, pos, token, counted = _batch()
    k = 6
    fast = merge_bottomk_fast(empty_bottomk(k, acts.shape[1]), bottomk_candidates(acts, doc, pos, token, counted, k))
    ref = batch_bottomk(acts, doc, pos, token, counted, k)
    for got in (fast, ref):
        for n, expected in enumerate(brute_bottomk(acts, doc, pos, counted, k)):
            assert [(float(v), int(d), int(p)) for v, d, p in zip(got.values[:, n], got.doc[:, n], got.pos[:, n])] == expected


def test_bottomk_merge_of_any_split_is_exact():
    acts, doc, pos, token, counted = _batch(tokens=240)
    k = 5
    whole = batch_bottomk(acts, doc, pos, token, counted, k)
    for cut in (1, 37, 120, 239):
        parts = [bottomk_candidates(acts[s], doc[s], pos[s], token[s], counted[s], k) for s in (slice(0, cut), slice(cut, None))]
        merged = merge_bottomk(
            merge_bottomk_fast(empty_bottomk(k, acts.shape[1]), parts[1]),
            merge_bottomk_fast(empty_bottomk(k, acts.shape[1]), parts[0]),
        )
        for name in ("values", "doc", "pos", "token"):
            assert torch.equal(getattr(merged, name), getattr(whole, name)), (cut, name)


# -- histogram


def test_histogram_bins_are_the_documented_ones():
    low, high = bin_ranges()
    assert len(low) == N_BINS == 163 and low[CENTER] == -(2.0**-10) and high[CENTER] == 2.0**-10
    assert (low[CENTER + 1], high[CENTER + 1]) == (2.0**-10, 1.25 * 2.0**-10)
    assert (low[-1], high[-1]) == (1024.0, float("inf")) and (low[0], high[0]) == (float("-inf"), -1024.0)
    values = torch.tensor([[0.0], [-0.0], [1.0], [1.2499], [1.25], [-1.0], [-1.25], [1e-9], [5000.0], [-5000.0]])
    bins = batch_histogram(values, torch.ones(len(values), dtype=torch.bool))[0]
    expected = {CENTER: 3, CENTER + 41: 2, CENTER + 42: 1, CENTER - 41: 1, CENTER - 42: 1, N_BINS - 1: 1, 0: 1}
    assert {i: int(c) for i, c in enumerate(bins) if c} == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_histogram_kernel_matches_reference(seed):
    acts, doc, pos, token, counted = _batch(seed=seed)
    acts = acts * torch.logspace(-4, 4, acts.shape[1])  # spread over the bins, both overflow ends
    got = batch_histogram(acts, counted)
    assert torch.equal(got, batch_histogram_reference(acts, counted))
    finite = torch.isfinite(acts) & counted.unsqueeze(1)
    assert got.sum(1).tolist() == finite.sum(0).tolist()  # non-finite values are left out (counted in Moments)


# -- quantile examples


def brute_quantiles(acts, doc, pos, counted, upper, m):
    """Per (interval, neuron): the m (hash, doc, pos) smallest among tokens whose activation is in the interval."""
    hashes = example_hash(doc, pos).tolist()
    picks = {}
    for n in range(acts.shape[1]):
        for b in range(INTERVALS):
            lo, hi = float(upper[n]) * b / INTERVALS, float(upper[n]) * (b + 1) / INTERVALS
            inside = [
                (hashes[t], int(doc[t]), int(pos[t]))
                for t in range(acts.shape[0])
                if counted[t] and torch.isfinite(acts[t, n]) and lo < float(acts[t, n]) <= hi and float(acts[t, n]) > 0
            ]
            picks[b, n] = sorted(inside)[:m]
    return picks


def _picked(q, b, n):
    return [(int(h), int(d), int(p)) for h, d, p in zip(q.hash[b, :, n], q.doc[b, :, n], q.pos[b, :, n]) if d >= 0]


def test_quantile_picks_match_brute_force_and_merge_exactly():
    acts, doc, pos, token, counted = _batch(tokens=300, ties=False)
    upper = torch.where(counted.unsqueeze(1), acts, -1.0).amax(0)
    m = 3
    whole = batch_quantiles(acts, doc, pos, token, counted, upper, m)
    expected = brute_quantiles(acts, doc, pos, counted, upper, m)
    for (b, n), rows in expected.items():
        assert _picked(whole, b, n) == rows, (b, n)
        in_interval = [
            t
            for t in range(300)
            if counted[t] and 0 < float(acts[t, n]) and upper[n] * b / INTERVALS < acts[t, n] <= upper[n] * (b + 1) / INTERVALS
        ]
        assert int(whole.count[b, n]) == len(in_interval)
        for slot in range(len(rows)):  # the recorded value is the activation at the recorded place
            t = int((doc == whole.doc[b, slot, n]).nonzero()[0]) + int(whole.pos[b, slot, n])
            assert float(whole.values[b, slot, n]) == float(acts[t, n])
    order = list(range(300))
    random.Random(0).shuffle(order)  # any sharding, any order
    shards = [torch.tensor(sorted(order[i::3])) for i in range(3)]
    parts = [batch_quantiles(acts[s], doc[s], pos[s], token[s], counted[s], upper, m) for s in shards]
    merged = merge_quantiles(parts[2], merge_quantiles(parts[0], parts[1]))
    for name in ("hash", "values", "doc", "pos", "token", "count"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    with pytest.raises(ValueError, match="merged atlas"):
        merge_quantiles(whole, batch_quantiles(acts, doc, pos, token, counted, upper * 2, m))


# -- the profiler, end to end


def test_profile_bottomk_and_histogram_match_brute_force(gemma):
    model, tokenizer = gemma
    config = ProfileConfig(layer=LAYER, top_k=3, bottom_k=4, max_length=12, batch_tokens=40)
    atlas = profile(model, tokenizer, CORPUS, config, progress=False)
    rows = reference_rows(model, tokenizer, CORPUS, 12)
    bottom = atlas[SITE].bottom
    for n in range(bottom.values.shape[1]):
        expected = sorted((r[0][n], r[1], r[2]) for r in rows)[:4]
        torch.testing.assert_close(bottom.values[:, n], torch.tensor([e[0] for e in expected]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(atlas[SITE].min, bottom.values[0])
    acts = torch.tensor([r[0] for r in rows])  # [tokens, n]
    reference = batch_histogram_reference(acts, torch.ones(len(rows), dtype=torch.bool))
    histogram = atlas[SITE].histogram
    assert histogram.sum(1).tolist() == [len(rows)] * acts.shape[1]
    assert int((histogram - reference).abs().sum()) <= 2  # only a value within float rounding of a bin edge may differ


def test_profile_skipping_blocks_below_the_floor_matches_brute_force(gemma, monkeypatch):
    """Batches long enough for `cpu_pass` to read only the blocks reaching each neuron's running k-th
    value; repeated documents make exact ties across batches, ranked by document."""
    from patchscope.kernels import cpu_pass

    calls = []
    reaching = cpu_pass._entries_reaching
    monkeypatch.setattr(cpu_pass, "_entries_reaching", lambda *a: calls.append(1) or reaching(*a))
    model, tokenizer = gemma
    texts = CORPUS + CORPUS[:6]
    config = ProfileConfig(layer=LAYER, top_k=2, bottom_k=2, max_length=12, batch_tokens=120)
    atlas = profile(model, tokenizer, texts, config, progress=False)
    assert calls, "no batch took the skipping path"
    rows = reference_rows(model, tokenizer, texts, 12)
    top, bottom = atlas[SITE].top, atlas[SITE].bottom
    for n in range(top.values.shape[1]):
        best = sorted((-r[0][n], r[1], r[2]) for r in rows)[:2]
        worst = sorted((r[0][n], r[1], r[2]) for r in rows)[:2]
        assert [(int(top.doc[i, n]), int(top.pos[i, n])) for i in range(2)] == [(d, p) for _, d, p in best], n
        assert [(int(bottom.doc[i, n]), int(bottom.pos[i, n])) for i in range(2)] == [(d, p) for _, d, p in worst], n
        torch.testing.assert_close(top.values[:, n], torch.tensor([-v for v, _, _ in best]), rtol=1e-5, atol=1e-5)
    acts = torch.tensor([r[0] for r in rows])  # [tokens, n]
    histogram = atlas[SITE].histogram
    assert int((histogram - batch_histogram(acts, torch.ones(len(rows), dtype=torch.bool))).abs().sum()) <= 2
    torch.testing.assert_close(atlas[SITE].mean, acts.double().mean(0), rtol=1e-4, atol=1e-5)


def test_shards_and_second_pass_merge_exactly(gemma, tmp_path):
    """One segment per batch gives bit-identical activations in every run, so the merge must be exact."""
    model, tokenizer = gemma
    config = ProfileConfig(layer=LAYER, top_k=3, bottom_k=3, max_length=12, batch_tokens=12, quantile_examples=2)
    docs = [Document(i, t) for i, t in enumerate(CORPUS)]
    whole = profile(model, tokenizer, docs, config, progress=False)
    first_pass = ProfileConfig(**{**config.__dict__, "quantile_examples": 0})
    shards = [profile(model, tokenizer, part, first_pass, progress=False) for part in (docs[::2], docs[1::2])]
    merged = shards[0].merge(shards[1])
    second = [quantile_examples(model, tokenizer, part, merged, config) for part in (docs[::2], docs[1::2])]
    stats = merged[SITE]
    stats.quantiles = merge_quantiles(second[1][SITE], second[0][SITE])
    expected = whole.tensors()
    got = Atlas(merged.meta, {SITE: stats}).tensors()
    assert got.keys() == expected.keys() and any(k.endswith("quantile_doc") for k in got)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert int((whole[SITE].quantiles.doc >= 0).sum()) > 0
    save_atlas(whole, tmp_path)  # round trip keeps everything
    loaded = load_atlas(tmp_path)
    for name, tensor in loaded.tensors().items():
        assert torch.equal(tensor, expected[name]), name


def test_old_atlases_load_and_mixed_merges_are_refused(gemma, tmp_path):
    model, tokenizer = gemma
    old = profile(
        model,
        tokenizer,
        CORPUS[:4],
        ProfileConfig(layer=LAYER, top_k=2, bottom_k=0, histogram=False, max_length=12),
        progress=False,
    )
    assert old[SITE].bottom is None and old[SITE].histogram is None and old[SITE].quantiles is None
    save_atlas(old, tmp_path)
    assert load_atlas(tmp_path)[SITE].bottom is None
    new = profile(model, tokenizer, CORPUS[4:8], ProfileConfig(layer=LAYER, top_k=2, max_length=12), progress=False)
    with pytest.raises(AtlasError, match="same options"):
        old.merge(new)


# -- output-token view


def test_output_tokens_match_a_direct_computation(gemma):
    model, _ = gemma
    neurons = [0, 5, 77]
    view = output_tokens(model, SITE, neurons, k=4)
    layer = model.model.layers[LAYER]
    d = model.model.layers[LAYER].mlp.down_proj.weight[:, neurons]  # [d_model, 3]
    folded = (1 + layer.post_feedforward_layernorm.weight).unsqueeze(1) * (1 + model.model.norm.weight).unsqueeze(1) * d
    logits = model.lm_head.weight @ folded  # [vocab, 3]
    torch.testing.assert_close(view.top_values, logits.topk(4, dim=0).values.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(view.top_ids, logits.topk(4, dim=0).indices.T)
    torch.testing.assert_close(view.bottom_values, logits.topk(4, dim=0, largest=False).values.T, rtol=1e-5, atol=1e-5)
    # the direction really is what a neuron adds: the MLP output of a one-hot hook_post is d, scaled by the post-norm
    hot = torch.zeros(1, 1, model.config.intermediate_size)
    hot[..., 5] = 3.0
    with torch.no_grad():
        out = layer.post_feedforward_layernorm(layer.mlp.down_proj(hot))[0, 0]
    expected = (1 + layer.post_feedforward_layernorm.weight) * d[:, 1]
    torch.testing.assert_close(out / out.norm(), expected / expected.norm(), rtol=1e-4, atol=1e-5)
    assert output_tokens(model, f"blocks.{LAYER}.mlp.hook_pre", neurons) is None
