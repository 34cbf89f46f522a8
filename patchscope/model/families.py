"""The family table: where each TransformerLens site sits in the decoder block of each HF family we know.

One function per block layout, keyed by the text decoder's ``model_type``. Each returns, for a block,
``{suffix: Where}`` for the sites that exist and ``{suffix: reason}`` for those that do not:

    pre-norm (Llama):   x ─ input_layernorm ─ self_attn ─(+)─ post_attention_layernorm ─ mlp ─(+)
    sandwich (Gemma-2): x ─ input_layernorm ─ self_attn ─ post_attention_layernorm ─(+)─ pre_feedforward_layernorm
                          ─ mlp ─ post_feedforward_layernorm ─(+)
    OLMo-2:             x ─ self_attn ─ post_attention_layernorm ─(+)─ mlp ─ post_feedforward_layernorm ─(+)
    parallel (NeoX, Cohere): x + attn(ln1(x)) + mlp(ln2(x)) in one sum: no residual between them

Granite scales the embedding (``embedding_multiplier``) and each sublayer's output on its way into the
residual (``residual_multiplier``); its ``hook_attn_out`` / ``hook_mlp_out`` are the sublayer outputs
*before* that multiplier, as the modules produce them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

Point = Literal["input", "output"]


@dataclass(frozen=True)
class Where:
    """One tensor on the module tree."""

    module: nn.Module
    """The module that carries the tensor."""
    point: Point
    """Its first input (forward pre-hook) or its output."""
    part: slice | None = None
    """A slice of the last dimension, when the site is part of a fused tensor (Phi-3's ``gate_up_proj``)."""


Table = dict[str, "Where | str"]
"""``suffix -> Where``, or ``suffix -> the reason the site does not exist in this family``."""


@dataclass(frozen=True)
class Family:
    """A block layout and what else differs in the family."""

    layout: str
    """One line for ``patchscope sites`` and the docs."""
    sites: Callable[[Any, Any], Table]
    """``(block, text_config) -> Table``."""
    embed_in_forward: bool = False
    """The model's forward scales the embedding, so ``hook_embed`` is the input of layer 0."""


def _gated_mlp(mlp: Any) -> Table:
    """``down_proj(act(gate_proj(x)) * up_proj(x))``."""
    return {"mlp.hook_pre": Where(mlp.gate_proj, "output"), "mlp.hook_post": Where(mlp.down_proj, "input")}


def pre_norm(block: Any, config: Any, mlp: Table | None = None) -> Table:
    return {
        "hook_attn_out": Where(block.self_attn, "output"),
        "hook_resid_mid": Where(block.post_attention_layernorm, "input"),
        **(_gated_mlp(block.mlp) if mlp is None else mlp),
        "hook_mlp_out": Where(block.mlp, "output"),
    }


def sandwich(block: Any, config: Any) -> Table:
    return {
        "hook_attn_out": Where(block.post_attention_layernorm, "output"),
        "hook_resid_mid": Where(block.pre_feedforward_layernorm, "input"),
        **_gated_mlp(block.mlp),
        "hook_mlp_out": Where(block.post_feedforward_layernorm, "output"),
    }


def olmo2(block: Any, config: Any) -> Table:
    """The norms come after the sublayers and none before them, so the MLP reads the residual itself."""
    return {
        "hook_attn_out": Where(block.post_attention_layernorm, "output"),
        "hook_resid_mid": Where(block.mlp, "input"),
        **_gated_mlp(block.mlp),
        "hook_mlp_out": Where(block.post_feedforward_layernorm, "output"),
    }


def phi3(block: Any, config: Any) -> Table:
    """One fused ``gate_up_proj`` whose first half is the gate: ``down_proj(up * act(gate))``."""
    gate = Where(block.mlp.gate_up_proj, "output", slice(0, config.intermediate_size))
    return pre_norm(block, config, {"mlp.hook_pre": gate, "mlp.hook_post": Where(block.mlp.down_proj, "input")})


PARALLEL = (
    "{family} runs attention and the MLP side by side on the block's input and adds both to the residual "
    "in one sum (a parallel block), so there is no residual between them; read hook_resid_pre, "
    "hook_attn_out or hook_mlp_out instead"
)


def cohere(block: Any, config: Any) -> Table:
    return {
        "hook_attn_out": Where(block.self_attn, "output"),
        "hook_resid_mid": PARALLEL.format(family="cohere"),
        **_gated_mlp(block.mlp),
        "hook_mlp_out": Where(block.mlp, "output"),
    }


def gpt_neox(block: Any, config: Any) -> Table:
    """``x + attn(ln1(x)) + mlp(ln2(x))`` with ``use_parallel_residual`` (Pythia), else sequential."""
    mid: Where | str = Where(block.post_attention_layernorm, "input")
    if config.use_parallel_residual:
        mid = PARALLEL.format(family="gpt_neox (use_parallel_residual=True, as in Pythia)")
    return {
        "hook_attn_out": Where(block.attention, "output"),
        "hook_resid_mid": mid,
        "mlp.hook_pre": Where(block.mlp.dense_h_to_4h, "output"),
        "mlp.hook_post": Where(block.mlp.dense_4h_to_h, "input"),
        "hook_mlp_out": Where(block.mlp, "output"),
    }


def gpt2(block: Any, config: Any) -> Table:
    """``c_fc`` / ``c_proj`` are ``Conv1D``: ``x @ W + b`` with ``W`` stored ``[in, out]``."""
    return {
        "hook_attn_out": Where(block.attn, "output"),
        "hook_resid_mid": Where(block.ln_2, "input"),
        "mlp.hook_pre": Where(block.mlp.c_fc, "output"),
        "mlp.hook_post": Where(block.mlp.c_proj, "input"),
        "hook_mlp_out": Where(block.mlp, "output"),
    }


def mixture_of_experts(block: Any, config: Any) -> Table:
    """Mixtral (``block_sparse_moe`` in transformers 4.x, ``mlp`` in 5.x) and Qwen3-MoE (some layers dense)."""
    moe = getattr(block, "block_sparse_moe", None) or block.mlp
    if not hasattr(moe, "experts"):  # a dense layer of a sparse model
        return pre_norm(block, config)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", "several")
    refusal = (
        f"{config.model_type}: the MLP of this layer is a mixture of {experts} experts, each token routed to "
        f"{getattr(config, 'num_experts_per_tok', 'a few')} of them, so there is no single MLP neuron space; "
        "read hook_mlp_out (the routed sum) or hook_resid_mid"
    )
    return {
        "hook_attn_out": Where(block.self_attn, "output"),
        "hook_resid_mid": Where(block.post_attention_layernorm, "input"),
        "mlp.hook_pre": refusal,
        "mlp.hook_post": refusal,
        "hook_mlp_out": Where(moe, "output"),
    }


_PRE_NORM = "pre-norm (Llama): input_layernorm before attention, post_attention_layernorm before the MLP"
_SANDWICH = "sandwich norms (Gemma-2): a norm before and after attention and the MLP"

FAMILIES: dict[str, Family] = {
    "llama": Family(_PRE_NORM, pre_norm),
    "mistral": Family(_PRE_NORM, pre_norm),
    "qwen2": Family(_PRE_NORM, pre_norm),
    "qwen3": Family(_PRE_NORM + "; q/k norms inside attention", pre_norm),
    "gemma": Family(_PRE_NORM + "; embedding scaled by sqrt(d_model)", pre_norm, embed_in_forward=True),
    "granite": Family(_PRE_NORM + "; embedding and residual multipliers", pre_norm, embed_in_forward=True),
    "gemma2": Family(_SANDWICH, sandwich, embed_in_forward=True),
    "gemma3_text": Family(_SANDWICH + "; q/k norms", sandwich, embed_in_forward=True),
    "olmo2": Family("post-norms only (OLMo-2): a norm after attention and after the MLP", olmo2),
    "phi3": Family(_PRE_NORM + "; fused gate_up_proj (gate first)", phi3),
    "cohere": Family("parallel block (Cohere): one LayerNorm, attention + MLP in one sum", cohere),
    "gpt_neox": Family("GPT-NeoX: two LayerNorms, parallel residual when use_parallel_residual", gpt_neox),
    "gpt2": Family("GPT-2: ln_1, attn, ln_2, Conv1D MLP (c_fc, c_proj)", gpt2),
    "mixtral": Family(_PRE_NORM + "; mixture-of-experts MLP", mixture_of_experts),
    "qwen3_moe": Family(_PRE_NORM + "; q/k norms; mixture-of-experts MLP", mixture_of_experts),
}
"""The text decoder's ``model_type`` -> its layout. Everything else goes to structural discovery."""

LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.layers", "transformer.h", "gpt_neox.layers")
"""Where the table families keep their decoder layers (``model.language_model``: Gemma 3's text tower)."""

FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_norm")
"""Names of the final norm on the decoder stack."""
