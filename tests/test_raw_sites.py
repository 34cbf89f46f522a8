"""Raw module sites (``<module path>:input`` / ``:output``): the escape hatch, with the named sites' contracts."""

from __future__ import annotations

import pytest
import torch
from factories import FIXTURE_CORPUS

from patchscope import SiteError, capture, patch, resolve, run_with_cache, stop_after
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.model.sites import parse_site, site_width, stop_site

TEXT = "In 1994 the committee met 3 times to review the budget of 12 million dollars."
RAW_POST = "model.layers.2.mlp.down_proj:input"  # the module behind blocks.2.mlp.hook_post


def _ids(tokenizer):
    return tokenizer(TEXT, return_tensors="pt").input_ids


def test_a_raw_site_is_the_module_tensor_of_its_named_twin(gemma):
    model, tokenizer = gemma
    raw_mid = "model.layers.1.pre_feedforward_layernorm:input"
    with torch.no_grad(), capture(model, [RAW_POST, "blocks.2.mlp.hook_post", raw_mid, "blocks.1.hook_resid_mid"]) as cache:
        model(_ids(tokenizer))
    torch.testing.assert_close(cache[RAW_POST], cache["blocks.2.mlp.hook_post"], rtol=0, atol=0)
    torch.testing.assert_close(cache[raw_mid], cache["blocks.1.hook_resid_mid"], rtol=0, atol=0)
    assert parse_site(RAW_POST) == (2, RAW_POST) and resolve(model, RAW_POST).layer == 2
    assert site_width(model, RAW_POST) == 128 and site_width(model, "model.layers.1:output") == 64  # the second is measured


def test_a_raw_patch_lands_at_its_positions_only(gemma):
    model, tokenizer = gemma
    ids = _ids(tokenizer)
    site = "model.layers.1.self_attn.o_proj:output"
    with torch.no_grad(), capture(model, "blocks.3.hook_resid_post") as clean:
        model(ids)
    with (
        torch.no_grad(),
        capture(model, [site, "blocks.3.hook_resid_post"]) as patched,
        patch(model, site, torch.ones(64), positions=[4]),
    ):
        model(ids)
    before, after = clean["blocks.3.hook_resid_post"], patched["blocks.3.hook_resid_post"]
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=0)
    assert (after[:, 4] - before[:, 4]).abs().max() > 1e-4


def test_a_raw_stop_ends_the_pass_and_run_with_cache_stops_after_its_layer(gemma):
    model, tokenizer = gemma
    layers = model.model.layers
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad(), capture(model, RAW_POST) as cache, stop_after(model, RAW_POST) as cut:
            model(_ids(tokenizer))
        assert ran == [0, 1] and cut.passes == 1  # layer 2 stopped inside, before its output
        ran.clear()
        with torch.no_grad():
            logits, both = run_with_cache(model, _ids(tokenizer), ["blocks.2.hook_mlp_out", RAW_POST])
        assert logits is None and ran == [0, 1, 2]  # a raw site in layer 2 stops after layer 2's output
    finally:
        for handle in handles:
            handle.remove()
    assert stop_site(model, [RAW_POST, "blocks.1.mlp.hook_post"]) == "blocks.2.hook_resid_post"
    torch.testing.assert_close(both[RAW_POST], cache[RAW_POST], rtol=0, atol=0)


def test_a_raw_site_after_the_layers_runs_the_whole_model(gemma):
    model, tokenizer = gemma
    assert stop_site(model, ["model.norm:output"]) is None
    with torch.no_grad():
        logits, cache = run_with_cache(model, _ids(tokenizer), ["model.norm:output"])
        reference = model(_ids(tokenizer), output_hidden_states=True)
    torch.testing.assert_close(logits, reference.logits)
    torch.testing.assert_close(cache["model.norm:output"], reference.hidden_states[-1])


def test_the_atlas_of_a_raw_site_equals_that_of_its_named_twin(gemma):
    model, tokenizer = gemma
    texts = [t for t in FIXTURE_CORPUS if t]
    config = ProfileConfig(sites=("blocks.2.mlp.hook_post", RAW_POST), top_k=3, max_length=12, batch_tokens=40)
    atlas = profile(model, tokenizer, texts, config, progress=False)
    named, raw = atlas["blocks.2.mlp.hook_post"], atlas[RAW_POST]
    for field in ("values", "doc", "pos", "token"):
        torch.testing.assert_close(getattr(raw.top, field), getattr(named.top, field), rtol=0, atol=0)
    torch.testing.assert_close(raw.moments.total, named.moments.total, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, fragment",
    [
        (
            "model.layers.1.mlp.up_projection:output",
            r"no module 'model.layers.1.mlp.up_projection'; children of model.layers.1.mlp: gate_proj, up_proj",
        ),
        ("model.layers.1.mlp.down_proj:inputs", "unknown hook site"),
    ],
)
def test_a_bad_raw_site_names_what_exists(gemma, name, fragment):
    with pytest.raises(SiteError, match=fragment):
        resolve(gemma[0], name)


def test_a_raw_site_on_a_module_without_a_tensor_output_says_so(gemma):
    model, tokenizer = gemma
    with pytest.raises(SiteError, match="'model:output': its module returns a BaseModelOutputWithPast, not a tensor"):
        with torch.no_grad(), capture(model, "model:output"):
            model(_ids(tokenizer))
