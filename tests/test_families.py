"""The Llama-style families share one site table; check each on a tiny in-memory model."""

import pytest
import torch
import torch.nn.functional as F
from transformers import GemmaConfig, GemmaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from patchscope import capture, list_sites

COMMON = dict(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize(
    "build, act",
    [
        (lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)), F.silu),
        (lambda: MistralForCausalLM(MistralConfig(**COMMON, head_dim=8)), F.silu),
        (lambda: GemmaForCausalLM(GemmaConfig(**COMMON, head_dim=8, hidden_activation="gelu_pytorch_tanh")), lambda x: F.gelu(x, approximate="tanh")),
    ],
    ids=["qwen2", "mistral", "gemma"],
)
def test_family_sites(build, act):
    torch.manual_seed(0)
    model = build().eval()
    ids = torch.randint(0, 120, (2, 9))
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_attn_out", "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
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
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid"], cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"])
    x = normed["x"]
    post = act(x @ block.mlp.gate_proj.weight.T) * (x @ block.mlp.up_proj.weight.T)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_post"], post)
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"], post @ block.mlp.down_proj.weight.T)
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"])
