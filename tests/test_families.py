"""Each family of the site table, proven on a tiny seeded model saved and reloaded through `load_model`.

Per family: ``hook_resid_pre`` equals ``output_hidden_states``; ``mlp.hook_post`` equals the activation
product computed by hand from the MLP's input; ``hook_resid_post`` equals the next layer's input; the
residual sums hold (with Granite's multiplier, and in one sum for parallel blocks); a patch changes no
earlier position and does change the patched one; the profiler's atlas equals a brute force on one layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
import transformers
from factories import FIXTURE_CORPUS, tiny_from_config
from transformers import GemmaConfig, GemmaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.activations import ACT2FN

from patchscope import capture, list_sites, load_model, patch, resolve
from patchscope.atlas.profile_config import ProfileConfig
from patchscope.atlas.profiling import profile
from patchscope.model.sites import SiteError, layout, refused_sites

COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
L = 1  # the layer each proof looks at


def gated(act: str) -> Callable:
    return lambda mlp, x: ACT2FN[act](x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)


def phi3_post(mlp, x):
    gate, up = (x @ mlp.gate_up_proj.weight.T).chunk(2, dim=-1)
    return up * ACT2FN["silu"](gate)


@dataclass
class Spec:
    config: Callable[[int], transformers.PretrainedConfig]
    """vocab size -> the family's config."""
    layers: Callable[[torch.nn.Module], torch.nn.ModuleList]
    """The decoder layers, found by hand."""
    post: Callable | None
    """``(mlp, mlp_input) -> mlp.hook_post`` by hand; None where the family refuses MLP neurons."""
    out_proj: str | None = None
    """Attribute path from a layer to the module whose input is ``mlp.hook_post`` (for the brute force)."""
    refused: dict[str, str] = field(default_factory=dict)
    """Sites the family refuses -> a fragment of the reason."""
    multiplier: float = 1.0
    """What scales the sublayer outputs on their way into the residual (Granite)."""
    parallel: bool = False
    pre: Callable | None = None
    """``(mlp, mlp_input) -> mlp.hook_pre`` by hand, where it is not just a projection's output."""


def _config(name: str, **settings):
    return lambda vocab: getattr(transformers, name)(vocab_size=vocab, **settings)


def _gemma3_multimodal(vocab: int):
    text = dict(COMMON, vocab_size=vocab, head_dim=8, sliding_window=8, model_type="gemma3_text")
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)


PARALLEL = "parallel block"
MODEL_LAYERS = lambda m: m.model.layers  # noqa: E731
SPECS: dict[str, Spec] = {
    "gpt2": Spec(
        _config("GPT2Config", n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=1),
        lambda m: m.transformer.h,
        lambda mlp, x: ACT2FN["gelu_new"](x @ mlp.c_fc.weight + mlp.c_fc.bias),  # Conv1D: weight [in, out]
        "mlp.c_proj",
    ),
    "gpt_neox": Spec(
        _config("GPTNeoXConfig", **{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}),
        lambda m: m.gpt_neox.layers,
        lambda mlp, x: ACT2FN["gelu"](x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias),
        "mlp.dense_4h_to_h",
        refused={"hook_resid_mid": PARALLEL},
        parallel=True,
    ),
    "gpt_neox_sequential": Spec(
        _config("GPTNeoXConfig", use_parallel_residual=False, **{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}),
        lambda m: m.gpt_neox.layers,
        lambda mlp, x: ACT2FN["gelu"](x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias),
        "mlp.dense_4h_to_h",
    ),
    "qwen3": Spec(_config("Qwen3Config", head_dim=8, **COMMON), MODEL_LAYERS, gated("silu"), "mlp.down_proj"),
    "phi3": Spec(
        _config("Phi3Config", **COMMON),
        MODEL_LAYERS,
        phi3_post,
        "mlp.down_proj",
        pre=lambda mlp, x: (x @ mlp.gate_up_proj.weight.T)[..., :48],  # the gate half of the fused projection
    ),
    "olmo2": Spec(_config("Olmo2Config", **COMMON), MODEL_LAYERS, gated("silu"), "mlp.down_proj"),
    "gemma3_multimodal": Spec(
        _gemma3_multimodal, lambda m: m.model.language_model.layers, gated("gelu_pytorch_tanh"), "mlp.down_proj"
    ),
    "granite": Spec(
        _config("GraniteConfig", embedding_multiplier=2.0, residual_multiplier=0.5, **COMMON),
        MODEL_LAYERS,
        gated("silu"),
        "mlp.down_proj",
        multiplier=0.5,
    ),
    "cohere": Spec(
        _config("CohereConfig", **COMMON),
        MODEL_LAYERS,
        gated("silu"),
        "mlp.down_proj",
        refused={"hook_resid_mid": PARALLEL},
        parallel=True,
    ),
    "mixtral": Spec(
        _config("MixtralConfig", num_local_experts=4, num_experts_per_tok=2, **COMMON),
        MODEL_LAYERS,
        None,
        refused={"mlp.hook_pre": "mixture of 4 experts", "mlp.hook_post": "mixture of 4 experts"},
    ),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def family(request, tmp_path_factory):
    spec = SPECS[request.param]
    directory = tiny_from_config(tmp_path_factory.mktemp(request.param), spec.config)
    model, tokenizer = load_model(str(directory), dtype="float32", device="cpu")
    return spec, model, tokenizer


def _ids(tokenizer):
    return tokenizer([FIXTURE_CORPUS[0], FIXTURE_CORPUS[2][:40]], return_tensors="pt", padding=True).input_ids


def test_sites_are_where_the_family_puts_them(family):
    spec, model, tokenizer = family
    layers = spec.layers(model)
    ids = _ids(tokenizer)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(len(layers))]
    names += [s for s in list_sites(model) if s.startswith(f"blocks.{L}.")]
    seen = {}
    mlp = layers[L].get_submodule(spec.out_proj.rpartition(".")[0]) if spec.out_proj else layers[L]
    handle = mlp.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("x", (a or tuple(kw.values()))[0]), with_kwargs=True)
    try:
        with torch.no_grad(), capture(model, names) as cache:
            out = model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    for layer in range(len(layers)):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer], rtol=0, atol=0)
    site = lambda s: cache[f"blocks.{L}.{s}"]  # noqa: E731
    torch.testing.assert_close(site("hook_resid_post"), cache[f"blocks.{L + 1}.hook_resid_pre"], rtol=0, atol=0)
    if spec.post is not None:
        torch.testing.assert_close(site("mlp.hook_post"), spec.post(mlp, seen["x"]))
    if spec.pre is not None:
        torch.testing.assert_close(site("mlp.hook_pre"), spec.pre(mlp, seen["x"]))
    m = spec.multiplier
    if spec.parallel:
        total = site("hook_resid_pre") + m * (site("hook_attn_out") + site("hook_mlp_out"))
        torch.testing.assert_close(site("hook_resid_post"), total)
    else:
        torch.testing.assert_close(site("hook_resid_mid"), site("hook_resid_pre") + m * site("hook_attn_out"))
        torch.testing.assert_close(site("hook_resid_post"), site("hook_resid_mid") + m * site("hook_mlp_out"))


def test_refused_sites_say_why(family):
    spec, model, _ = family
    refused = refused_sites(model)
    for suffix, fragment in spec.refused.items():
        assert fragment in refused[f"blocks.{L}.{suffix}"]
        with pytest.raises(SiteError, match=fragment):
            resolve(model, f"blocks.{L}.{suffix}")
        assert f"blocks.{L}.{suffix}" not in list_sites(model)
    assert not any(s.endswith(tuple(spec.refused)) for s in list_sites(model))
    assert set(refused) == {f"blocks.{layer}.{s}" for layer in range(len(spec.layers(model))) for s in spec.refused}
    assert layout(model).rule.startswith("family table: ")


def test_a_patch_changes_the_patched_position_and_none_before_it(family):
    spec, model, tokenizer = family
    ids = _ids(tokenizer)
    last = f"blocks.{len(spec.layers(model)) - 1}.hook_resid_post"
    with torch.no_grad(), capture(model, last) as clean:
        model(ids)
    vector = torch.randn(model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(model, last) as patched, patch(model, f"blocks.{L}.hook_resid_pre", vector, positions=[4]):
        model(ids)
    before, after = clean[last], patched[last]
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=0)
    assert (after[:, 4] - before[:, 4]).abs().amax(-1).min() > 1e-4


def _brute_force_top1(model, tokenizer, texts, module, point, max_length):
    """Per-neuron maximum over every token but BOS, one text at a time, all layers run."""
    seen = {}
    if point == "input":
        handle = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    else:
        handle = module.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    best = None
    tokens = 0
    try:
        for text in texts:
            ids = tokenizer(text).input_ids[:max_length]
            with torch.no_grad():
                model(torch.tensor([ids]))
            acts = seen["x"][0, 1:]  # BOS left out, as the profiler's default
            tokens += acts.shape[0]
            best = acts.amax(0) if best is None else torch.maximum(best, acts.amax(0))
    finally:
        handle.remove()
    return best, tokens


def test_atlas_equals_a_brute_force(family):
    spec, model, tokenizer = family
    texts = [t for t in FIXTURE_CORPUS if len(t) > 3]
    block = spec.layers(model)[L]
    if spec.out_proj is not None:
        site, module, point = f"blocks.{L}.mlp.hook_post", block.get_submodule(spec.out_proj), "input"
    else:
        site, module, point = f"blocks.{L}.hook_resid_post", block, "output"
    config = ProfileConfig(sites=(site,), top_k=3, max_length=12, batch_tokens=40)
    atlas = profile(model, tokenizer, texts, config, progress=False)
    best, tokens = _brute_force_top1(model, tokenizer, texts, module, point, 12)
    torch.testing.assert_close(atlas[site].top.values[0], best, rtol=1e-5, atol=1e-5)
    assert int(atlas[site].moments.n_tokens) == tokens


def test_a_patch_on_part_of_a_fused_tensor_writes_only_that_part(tmp_path):
    """Phi-3's mlp.hook_pre is the gate half of gate_up_proj's output: a patch leaves the up half alone."""
    model, tokenizer = load_model(str(tiny_from_config(tmp_path, SPECS["phi3"].config)), dtype="float32", device="cpu")
    fused = model.model.layers[L].mlp.gate_up_proj
    seen = {}
    handle = fused.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))  # registered first: sees the raw output
    ids = _ids(tokenizer)
    try:
        with torch.no_grad():
            model(ids)
            raw = seen["out"]
            with capture(model, f"blocks.{L}.mlp.hook_post") as cache, patch(model, f"blocks.{L}.mlp.hook_pre", torch.ones(48)):
                model(ids)
    finally:
        handle.remove()
    up = raw[..., 48:]
    torch.testing.assert_close(cache[f"blocks.{L}.mlp.hook_post"], up * ACT2FN["silu"](torch.ones_like(up)))


# The Llama-style families share one table; Gemma 3's text decoder has Gemma-2's sandwich norms.
LLAMA_STYLE = dict(
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
        (lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_STYLE)), F.silu),
        (lambda: MistralForCausalLM(MistralConfig(**LLAMA_STYLE, head_dim=8)), F.silu),
        (
            lambda: GemmaForCausalLM(GemmaConfig(**LLAMA_STYLE, head_dim=8, hidden_activation="gelu_pytorch_tanh")),
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
