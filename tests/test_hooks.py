import pytest
import torch

from patchscope import SiteError, StopForward, add_hooks, capture, patch, stop_after
from patchscope.model.sites import base_model

TEXT = "In 1994 the committee met 3 times to review the budget of 12 million dollars."


def _ids(tokenizer, text=TEXT):
    return tokenizer(text, return_tensors="pt").input_ids


def _handle_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_patch_changes_only_later_positions(any_model):
    model, tokenizer = any_model
    ids = _ids(tokenizer)
    p = 5
    clean = model(ids).logits
    vector = torch.randn(model.config.hidden_size) * 3
    with patch(model, "blocks.1.hook_resid_pre", vector, positions=[p]):
        patched = model(ids).logits
    torch.testing.assert_close(patched[:, :p], clean[:, :p], rtol=0, atol=0)
    assert (patched[:, p:] - clean[:, p:]).abs().amax(-1).min() > 1e-4


def test_patch_with_own_value_changes_nothing(any_model):
    model, tokenizer = any_model
    ids = _ids(tokenizer)
    site = "blocks.1.mlp.hook_post"
    with capture(model, site) as cache:
        clean = model(ids).logits
    with patch(model, site, cache[site][0, [2, 7]], positions=[2, 7]):
        same = model(ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)


def test_patch_add_mode_and_rows(gemma):
    model, tokenizer = gemma
    ids = _ids(tokenizer).repeat(2, 1)
    site = "blocks.2.hook_resid_pre"
    delta = torch.randn(model.config.hidden_size)
    with capture(model, site) as clean:
        model(ids)
    with patch(model, site, delta, positions=[4], mode="add", rows=torch.tensor([True, False])), capture(model, site) as cache:
        model(ids)
    torch.testing.assert_close(cache[site][0, 4], clean[site][0, 4] + delta)
    torch.testing.assert_close(cache[site][1], clean[site][1], rtol=0, atol=0)


def test_patched_generation_same_with_and_without_cache(any_model):
    model, tokenizer = any_model
    ids = _ids(tokenizer, "A detailed description of x is that")
    vector = torch.randn(model.config.hidden_size) * 4
    runs = []
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    for use_cache in (True, False):
        with patch(model, "blocks.1.hook_resid_pre", vector, positions=[7]):
            runs.append(model.generate(ids, use_cache=use_cache, **settings))
    unpatched = model.generate(ids, **settings)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for cached, uncached in zip(runs[0].logits, runs[1].logits):
        torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(runs[0].logits[-1], unpatched.logits[-1], atol=1e-3)


def test_decode_steps_are_not_patched(gemma):
    """The site's value is read before and after the patch hook: the prefill is written, decode steps are not."""
    model, tokenizer = gemma
    ids = _ids(tokenizer, "A detailed description of x is that")
    before, after = [], []
    site = "blocks.1.hook_resid_pre"
    # pre-hooks run in the order installed: `before` sees the value entering the patch, `after` what it leaves
    with (
        add_hooks(model, {site: lambda value, step: before.append((step.offset, value.clone()))}),
        patch(model, site, torch.zeros(64), positions=[3]),
        add_hooks(model, {site: lambda value, step: after.append((step.offset, value.clone()))}),
    ):
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert [(offset, value.shape[1]) for offset, value in after] == [(0, ids.shape[1]), (ids.shape[1], 1), (ids.shape[1] + 1, 1)]
    (_, prefill_in), (_, prefill_out) = before[0], after[0]
    assert torch.equal(prefill_out[0, 3], torch.zeros(64)) and not torch.equal(prefill_in[0, 3], torch.zeros(64))
    torch.testing.assert_close(prefill_out[:, [0, 1, 2, 4, 5, 6, 7]], prefill_in[:, [0, 1, 2, 4, 5, 6, 7]], rtol=0, atol=0)
    assert len(before) == len(after) == 3
    for (_, entering), (_, leaving) in zip(before[1:], after[1:]):  # decode steps: left as they came
        assert torch.equal(entering, leaving)


def _counter(model, layer):
    calls = []
    handle = model.model.layers[layer].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_stop_after_skips_later_layers(any_model):
    model, tokenizer = any_model
    ids = _ids(tokenizer)
    site = "blocks.1.mlp.hook_post"
    full_cache_site = "blocks.1.hook_resid_post"
    with capture(model, [site, full_cache_site]) as full:
        reference = model(ids).logits
    later, h1 = _counter(model, 2)
    head_calls = []
    h2 = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        with stop_after(model, site), capture(model, site) as cache:  # capture installed after the stop still runs
            model(ids)
            pytest.fail("the forward pass should have stopped")
    finally:
        h1.remove()
        h2.remove()
    assert later == [] and head_calls == []
    torch.testing.assert_close(cache[site], full[site], rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)  # usable afterwards


def test_capture_patch_stop_compose(gemma):
    model, tokenizer = gemma
    ids = _ids(tokenizer)
    vector = torch.randn(64)
    with (
        capture(model, ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]) as cache,
        patch(model, "blocks.1.hook_resid_pre", vector, positions=[3]),
        stop_after(model, "blocks.2.hook_resid_pre"),
    ):
        model(ids)
    # capture was installed before the patch on the same site, so it saw the unpatched value
    assert not torch.equal(cache["blocks.1.hook_resid_pre"][0, 3], vector)
    with patch(model, "blocks.1.hook_resid_pre", vector, positions=[3]), capture(model, "blocks.1.hook_resid_pre") as after:
        model(ids)
    torch.testing.assert_close(after["blocks.1.hook_resid_pre"][0, 3], vector)
    assert "blocks.2.hook_resid_pre" in cache


def test_no_handles_remain(gemma):
    model, tokenizer = gemma
    ids = _ids(tokenizer)
    before = _handle_count(model)
    with capture(model, "blocks.0.hook_resid_post"), patch(model, "blocks.1.hook_resid_pre", torch.zeros(64), positions=[1]):
        with capture(model, "blocks.1.mlp.hook_post"), stop_after(model, "blocks.2.hook_resid_pre"):
            model(ids)
            assert _handle_count(model) > before
    assert _handle_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, "blocks.0.hook_resid_post"), stop_after(model, "blocks.1.hook_resid_post"):
            raise RuntimeError("boom")
    assert _handle_count(model) == before
    with pytest.raises(ValueError):  # a failing hook also unwinds everything
        with add_hooks(model, {"blocks.0.mlp.hook_pre": lambda v, s: (_ for _ in ()).throw(ValueError("in hook"))}):
            model(ids)
    assert _handle_count(model) == before
    with pytest.raises(SiteError):  # a bad name fails before anything is installed
        with capture(model, ["blocks.0.hook_resid_post", "blocks.99.hook_resid_post"]):
            pass
    assert _handle_count(model) == before


def test_stop_forward_does_not_escape(gemma):
    """`stop_after` and `run_until` end the forward at the site and return to the caller: no StopForward
    reaches it, no later layer runs, the site holds what the full forward computes there, and no stop stays."""
    from patchscope import run_until

    model, tokenizer = gemma
    site, ids = "blocks.1.hook_resid_post", _ids(tokenizer)
    layers = base_model(model).layers
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    try:
        with capture(model, site) as stopped:
            with stop_after(model, site):
                model(ids)
        with capture(model, site) as until:
            run_until(model, site, input_ids=ids)
        assert ran == [0, 1, 0, 1]  # both stopped after layer 1, and the caller's code went on
        full = model(ids, output_hidden_states=True)  # no stop is left behind: every layer runs
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0, 1, 0, 1, *range(len(layers))] and full.logits.shape[-1] == model.config.vocab_size
    torch.testing.assert_close(stopped[site], full.hidden_states[2])  # hidden_states[0] is the embedding
    torch.testing.assert_close(until[site], full.hidden_states[2])


@pytest.mark.parametrize("site, ran", [("hook_embed", 0), ("blocks.1.hook_resid_post", 2), ("blocks.2.mlp.hook_post", 2)])
def test_stop_after_ends_the_forward_there(gemma, site, ran):
    """Plain torch hooks (not ours) count which modules ran: nothing after the site may run."""
    model, tokenizer = gemma
    layers = base_model(model).layers
    calls = []
    modules = {f"layer{i}": layer for i, layer in enumerate(layers)}
    modules.update(down_proj2=layers[2].mlp.down_proj, norm=base_model(model).norm, lm_head=model.lm_head)
    handles = [module.register_forward_hook(lambda m, a, o, name=name: calls.append(name)) for name, module in modules.items()]
    try:
        with stop_after(model, site):
            model(_ids(tokenizer))
            calls.append("after the call")  # StopForward leaves model() and the rest of the block
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [f"layer{i}" for i in range(ran)]
    with pytest.raises(StopForward):  # outside stop_after's block the signal is an ordinary exception
        with add_hooks(model, {site: lambda v, s: (_ for _ in ()).throw(StopForward(site))}):
            model(_ids(tokenizer))


def test_capture_positions_and_cpu(gemma):
    model, tokenizer = gemma
    ids = _ids(tokenizer)
    with capture(model, "blocks.0.hook_resid_post") as full:
        model(ids)
    with capture(model, "blocks.0.hook_resid_post", positions=[0, 4], to_cpu=True) as some:
        model(ids)
    value = some["blocks.0.hook_resid_post"]
    assert value.shape == (1, 2, 64) and value.device.type == "cpu"
    torch.testing.assert_close(value, full["blocks.0.hook_resid_post"][:, [0, 4]])


def test_resid_pre_accepts_keyword_hidden_states(gemma):
    model, tokenizer = gemma
    ids = _ids(tokenizer)
    block = base_model(model).layers[1]
    with capture(model, "blocks.1.hook_resid_pre") as positional:
        hidden = model(ids, output_hidden_states=True).hidden_states[1]
    # call the decoder layer directly with a keyword argument
    from patchscope.model.hooks import add_hooks as install

    seen = {}
    with install(model, {"blocks.1.hook_resid_pre": lambda v, s: seen.setdefault("v", v)}):
        rotary = base_model(model).rotary_emb(hidden, torch.arange(ids.shape[1])[None])
        block(hidden_states=hidden, position_embeddings=rotary, attention_mask=None)
    torch.testing.assert_close(seen["v"], positional["blocks.1.hook_resid_pre"])


def test_capture_positions_under_generation_cached_equals_uncached(any_model):
    """One position contract with `patch`: absolute positions, filtered to each call's window."""
    model, tokenizer = any_model
    ids = _ids(tokenizer, "A detailed description of x is that")  # 8 tokens: positions 0..7
    site = "blocks.1.hook_resid_post"
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    seen = {}
    for use_cache in (True, False):
        with capture(model, site, positions=[2, 5, 10], keep_history=True) as cache:
            sequence = model.generate(ids, use_cache=use_cache, **settings)
        seen[use_cache] = cache
    cached, uncached = seen[True], seen[False]
    # cached: the prefill covers 2 and 5; decode steps cover one new position each, and only the
    # step at position 10 holds a requested one. Uncached: every call re-runs the whole prefix.
    assert cached.positions[site].tolist() == [[10]]
    assert len(cached.history[site]) == 2 and cached.history[site][0].shape == (1, 2, 64)
    with capture(model, site) as full:
        model(sequence[:, :-1])  # the final sequence, one forward: every position at once
    reference = full[site][0]
    torch.testing.assert_close(cached.history[site][0][0], reference[[2, 5]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached.history[site][1][0, 0], reference[10], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(uncached[site][0], reference[[2, 5, 10]], rtol=1e-4, atol=1e-4)
    assert uncached.positions[site].tolist() == [[2, 5, 10]]


def test_capture_per_row_positions(gemma):
    model, tokenizer = gemma
    ids = torch.cat([_ids(tokenizer)[:, :10], _ids(tokenizer)[:, 5:15]])
    with (
        capture(model, "blocks.0.hook_resid_post") as full,
        capture(model, "blocks.0.hook_resid_post", positions=torch.tensor([[1, 3], [4, 9]])) as some,
    ):
        model(ids)
    value = some["blocks.0.hook_resid_post"]
    torch.testing.assert_close(value[0], full["blocks.0.hook_resid_post"][0, [1, 3]])
    torch.testing.assert_close(value[1], full["blocks.0.hook_resid_post"][1, [4, 9]])


def test_capture_to_cpu_waits_for_copies_before_handing_values_out():
    """Copies to the host are non-blocking; every read synchronises first (CUDA events on a GPU)."""
    from patchscope.model.hooks import Capture

    class Event:
        def __init__(self):
            self.waited = False

        def synchronize(self):
            self.waited = True

    store = Capture()
    dict.__setitem__(store, "site", torch.zeros(1))
    for read in (
        lambda s: s["site"],
        lambda s: s.get("site"),
        lambda s: list(s.values()),
        lambda s: list(s.items()),
        lambda s: s.history,
    ):
        event = Event()
        store._pending.append(event)
        read(store)
        assert event.waited and not store._pending


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_capture_to_cpu_on_cuda_matches_a_blocking_copy(gemma):
    model, tokenizer = gemma
    model.cuda()
    try:
        ids = _ids(tokenizer).cuda()
        with capture(model, "blocks.1.mlp.hook_post", to_cpu=True) as fast, capture(model, "blocks.1.mlp.hook_post") as slow:
            model(ids)
            value = fast["blocks.1.mlp.hook_post"]  # read inside the block, right after the forward
        assert value.device.type == "cpu" and torch.equal(value, slow["blocks.1.mlp.hook_post"].cpu())
    finally:
        model.cpu()


def test_stop_after_says_what_it_cut(gemma):
    """The explicit contract: `Cut` counts the stopped passes and says whether the block itself was ended."""
    model, tokenizer = gemma
    ran_after = []
    with stop_after(model, "blocks.1.hook_resid_post") as cut:
        model(_ids(tokenizer))
        ran_after.append(1)  # skipped: the stop ends the block here
    assert (cut.site, cut.passes, cut.block_ended, ran_after) == ("blocks.1.hook_resid_post", 1, True, [])
    with stop_after(model, "blocks.1.hook_resid_post") as untouched:
        pass  # no forward pass: nothing cut
    assert (untouched.passes, untouched.block_ended) == (0, False)


def test_an_inner_stop_does_not_swallow_an_outer_stop(gemma):
    """Nested stops: the earlier site's signal belongs to its own block, the inner one re-raises it."""
    model, tokenizer = gemma
    with stop_after(model, "blocks.0.hook_resid_post") as outer:
        with stop_after(model, "blocks.2.hook_resid_post") as inner:
            model(_ids(tokenizer))
    assert (outer.passes, outer.block_ended, inner.passes, inner.block_ended) == (1, True, 0, False)


def test_run_with_cache_stops_after_the_deepest_site(gemma):
    from patchscope import run_with_cache

    model, tokenizer = gemma
    ids = _ids(tokenizer)
    names = ["blocks.2.mlp.hook_post", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out"]
    head_calls = []
    later, handle = _counter(model, 3)
    head = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        with torch.no_grad():
            logits, cache = run_with_cache(model, ids, names)
    finally:
        handle.remove()
        head.remove()
    assert logits is None and head_calls == [] and later == []
    with torch.no_grad(), capture(model, names) as full:
        reference = model(ids).logits
    for name in names:
        torch.testing.assert_close(cache[name], full[name], rtol=0, atol=0)
    with torch.no_grad():
        logits, whole = run_with_cache(model, tokenizer(TEXT, return_tensors="pt"), names, stop=False)
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    torch.testing.assert_close(whole["blocks.2.mlp.hook_post"], full["blocks.2.mlp.hook_post"], rtol=0, atol=0)


def test_run_with_cache_keeps_the_position_contract(gemma):
    from patchscope import run_with_cache

    model, tokenizer = gemma
    ids = _ids(tokenizer)
    with torch.no_grad():
        _, every = run_with_cache(model, ids, "blocks.1.hook_resid_post")
        _, some = run_with_cache(model, ids, "blocks.1.hook_resid_post", positions=[2, 5])
    torch.testing.assert_close(some["blocks.1.hook_resid_post"], every["blocks.1.hook_resid_post"][:, [2, 5]])
    assert some.positions["blocks.1.hook_resid_post"].tolist() == [[2, 5]]
