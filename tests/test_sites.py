import pytest
import torch
import torch.nn.functional as F

from patchscope import SiteError, capture, list_sites, resolve

TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


def _ids(tokenizer, text=TEXT):
    return tokenizer(text, return_tensors="pt").input_ids


def test_sites_lists_every_block_site(gemma):
    model, _ = gemma
    names = list_sites(model)
    assert names[0] == "hook_embed"
    assert "blocks.3.mlp.hook_post" in names and "blocks.4.hook_resid_pre" not in names
    assert len(names) == 1 + 4 * 7


@pytest.mark.parametrize(
    "bad, fragment",
    [("blocks.9.hook_resid_pre", "layers 0..3"), ("blocks.1.hook_resid", "valid"), ("resid_pre", "valid")],
)
def test_bad_site_names_list_what_is_valid(gemma, bad, fragment):
    with pytest.raises(SiteError, match=fragment):
        resolve(gemma[0], bad)


def test_a_model_without_a_layer_list_is_refused_naming_the_lists_found():
    from types import SimpleNamespace

    class Toy(torch.nn.Module):
        config = SimpleNamespace(model_type="toy", num_hidden_layers=2)

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    with pytest.raises(
        SiteError, match=r"'toy' \(Toy\) is not in the family table and no module list of 2 layers.*blocks \(3 x Linear\)"
    ):
        list_sites(Toy())


def test_resid_pre_equals_hidden_states(any_model):
    model, tokenizer = any_model
    ids = _ids(tokenizer)
    layers = len(model.model.layers)
    names = [f"blocks.{L}.hook_resid_pre" for L in range(layers)]
    with capture(model, names) as cache:
        out = model(ids, output_hidden_states=True)
    for L in range(layers):
        torch.testing.assert_close(cache[names[L]], out.hidden_states[L], rtol=0, atol=0)


def test_embed_is_scaled_embedding(gemma):
    model, tokenizer = gemma
    ids = _ids(tokenizer)
    with capture(model, "hook_embed") as cache:
        model(ids)
    expected = model.model.embed_tokens.weight[ids] * model.config.hidden_size**0.5
    torch.testing.assert_close(cache["hook_embed"], expected)


def _raw_output(module):
    store = {}
    handle = module.register_forward_hook(lambda m, a, o: store.__setitem__("out", o))
    return store, handle


def test_mlp_sites_match_hand_computation(any_model):
    model, tokenizer = any_model
    ids = _ids(tokenizer)
    L = 1
    block = model.model.layers[L]
    pre_mlp_norm = (
        block.pre_feedforward_layernorm if hasattr(block, "pre_feedforward_layernorm") else block.post_attention_layernorm
    )
    normed, handle = _raw_output(pre_mlp_norm)
    names = [f"blocks.{L}.{s}" for s in ("mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_mid", "hook_resid_post")]
    try:
        with capture(model, names) as cache:
            model(ids)
    finally:
        handle.remove()
    x = normed["out"]
    gate = x @ block.mlp.gate_proj.weight.T
    act = F.gelu(gate, approximate="tanh") if model.config.model_type == "gemma2" else F.silu(gate)
    post = act * (x @ block.mlp.up_proj.weight.T)
    torch.testing.assert_close(cache[names[0]], gate)
    torch.testing.assert_close(cache[names[1]], post)
    mlp_out = post @ block.mlp.down_proj.weight.T
    if hasattr(block, "post_feedforward_layernorm"):  # Gemma-2: mlp_out is after the post-norm
        norm = block.post_feedforward_layernorm
        var = mlp_out.float().pow(2).mean(-1, keepdim=True)
        mlp_out = mlp_out * torch.rsqrt(var + norm.eps) * (1 + norm.weight)
        assert not torch.allclose(cache[names[2]], post @ block.mlp.down_proj.weight.T, atol=1e-3)
    torch.testing.assert_close(cache[names[2]], mlp_out)
    torch.testing.assert_close(cache[names[4]], cache[names[3]] + cache[names[2]])


def test_resid_identities(any_model):
    model, tokenizer = any_model
    ids = _ids(tokenizer)
    names = [
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_resid_mid",
        "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_pre",
    ]
    with capture(model, names) as cache:
        model(ids)
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], cache["blocks.2.hook_resid_pre"], rtol=0, atol=0)
    torch.testing.assert_close(
        cache["blocks.1.hook_resid_mid"], cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"]
    )


@pytest.mark.parametrize(
    "name", ["blocks.1.hook_resid_pre\n", "hook_embed\n", " blocks.1.hook_resid_pre", "blocks.1.mlp.hook_post\n"]
)
def test_site_names_match_in_full(name):
    from patchscope.model.sites import parse_site

    with pytest.raises(SiteError, match="unknown hook site"):
        parse_site(name)
