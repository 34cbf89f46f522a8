"""The Llama-style families share one site table; check each on a tiny in-memory model."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GemmaConfig, GemmaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from patchscope import capture, list_sites

COMMON = dict(
    vocab_size=120,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


@pytest.mark.parametrize(
    "build, act",
    [
        (lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)), F.silu),
        (lambda: MistralForCausalLM(MistralConfig(**COMMON, head_dim=8)), F.silu),
        (
            lambda: GemmaForCausalLM(GemmaConfig(**COMMON, head_dim=8, hidden_activation="gelu_pytorch_tanh")),
            lambda x: F.gelu(x, approximate="tanh"),
        ),
    ],
    ids=["qwen2", "mistral", "gemma"],
)
def test_family_sites(build, act):
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 120, (2, 9))
    names = [
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_mid",
        "blocks.1.hook_attn_out",
        "blocks.1.mlp.hook_post",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_post",
    ]
    assert set(names) <= set(list_sites(model))
    normed = {}
    block = model.model.layers[1]
    handle = block.post_attention_layernorm.register_forward_hook(lambda m, a, o: normed.__setitem__("x", o))
    try:
        with torch.no_grad(), capture(model, names) as cache:
            out = model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], out.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(
        cache["blocks.1.hook_resid_mid"], cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"]
    )
    x = normed["x"]
    post = act(x @ block.mlp.gate_proj.weight.T) * (x @ block.mlp.up_proj.weight.T)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_post"], post)
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"], post @ block.mlp.down_proj.weight.T)
    torch.testing.assert_close(
        cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"]
    )


def _gemma_rms_norm(x, norm):
    """Gemma's RMSNorm by hand: float32, scaled by (1 + w)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight.float())).to(x.dtype)


def test_gemma3_sites(tmp_path):
    """Gemma 3 (``gemma3_text``) has Gemma-2's sandwich norms; saved and loaded through load_model."""
    from factories import tiny_gemma3

    from patchscope import load_model

    model, tokenizer = load_model(str(tiny_gemma3(tmp_path)), dtype="float32", device="cpu")
    assert model.config.model_type == "gemma3_text"
    ids = tokenizer("The quick brown fox jumps over the lazy dog near the river bank.", return_tensors="pt").input_ids
    L = 1
    block = model.model.layers[L]
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(4)] + [
        f"blocks.{L}.{s}"
        for s in ("hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")
    ]
    normed = {}
    handle = block.pre_feedforward_layernorm.register_forward_hook(lambda m, a, o: normed.__setitem__("x", o))
    try:
        with torch.no_grad(), capture(model, names) as cache:
            out = model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    for layer in range(4):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer], rtol=0, atol=0)
    site = lambda s: cache[f"blocks.{L}.{s}"]  # noqa: E731
    torch.testing.assert_close(site("hook_resid_mid"), site("hook_resid_pre") + site("hook_attn_out"))
    x = normed["x"]
    gate = x @ block.mlp.gate_proj.weight.T
    torch.testing.assert_close(site("mlp.hook_pre"), gate)
    torch.testing.assert_close(site("mlp.hook_post"), F.gelu(gate, approximate="tanh") * (x @ block.mlp.up_proj.weight.T))
    # hook_mlp_out is after the post-norm, not the raw MLP output
    mlp_out = _gemma_rms_norm(site("mlp.hook_post") @ block.mlp.down_proj.weight.T, block.post_feedforward_layernorm)
    torch.testing.assert_close(site("hook_mlp_out"), mlp_out)
    torch.testing.assert_close(site("hook_resid_post"), site("hook_resid_mid") + site("hook_mlp_out"))
    torch.testing.assert_close(site("hook_resid_post"), out.hidden_states[L + 1], rtol=0, atol=0)
