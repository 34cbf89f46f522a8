"""The output-token view of a neuron, from the weights alone: which tokens its output promotes.

For an MLP neuron (``blocks.L.mlp.hook_post``) the output direction is ``d = down_proj.weight[:, n]``.
On its way to the logits it passes ``post_feedforward_layernorm`` (Gemma-2 and Gemma-3 only) and
the final norm, both RMSNorms: ``x / rms(x) * g``. We fold in their gains ``g`` (``1 + w`` in
Gemma, ``w`` in Llama), read by applying each norm to a vector of ones, and leave out the division
by ``rms(x)``: that depends on the whole vector at each token (the other neurons, the residual
stream), but it is one positive factor for every vocabulary entry, so it scales these logits
without changing which tokens rank top or bottom. Gemma's final logit soft-cap is monotone and
left out for the same reason. So the view is ``W_U (g_final * g_post * d)``.

For residual-stream sites (and ``hook_mlp_out`` / ``hook_attn_out``, which come after their
post-norms) the direction is the basis vector of the dimension, through the final norm only.
``mlp.hook_pre`` has no output direction of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from patchscope.model.sites import POST_NORM_FAMILIES, base_model, model_family, parse_site

CHUNK = 64  # neurons per [vocab, CHUNK] logit block: bounds memory for 256k-token vocabularies


@dataclass
class OutputTokens:
    """The ``k`` most promoted (top) and most suppressed (bottom) tokens per neuron."""

    neurons: list[int]
    top_ids: Tensor  # [neurons, k] int64, largest logit first
    top_values: Tensor  # [neurons, k] float32
    bottom_ids: Tensor  # [neurons, k] int64, smallest logit first
    bottom_values: Tensor  # [neurons, k] float32


def norm_gain(norm: nn.Module, width: int) -> Tensor:
    """The per-dimension gain of an RMSNorm: its output for a vector of ones (rms 1). ``[width]`` float32."""
    weight = next(norm.parameters())
    with torch.no_grad():
        return norm(torch.ones(1, width, dtype=weight.dtype, device=weight.device)).float().squeeze(0)


def output_directions(model: nn.Module, site: str, neurons: list[int]) -> Tensor | None:
    """``[d_model, neurons]`` float32 directions with the norm gains folded in, or None for ``mlp.hook_pre``."""
    layer, suffix = parse_site(site)
    base: Any = base_model(model)  # HF decoder: its submodules are found by attribute name
    d_model: int = cast(Any, model.config).hidden_size
    index = torch.tensor(neurons, dtype=torch.long)
    if suffix == "mlp.hook_pre":
        return None
    if suffix == "mlp.hook_post":
        block = base.layers[layer]
        weight = block.mlp.down_proj.weight  # [d_model, d_mlp]
        directions = weight[:, index.to(weight.device)].float()
        if model_family(model) in POST_NORM_FAMILIES:
            directions = directions * norm_gain(block.post_feedforward_layernorm, d_model).unsqueeze(1)
    else:
        directions = torch.eye(d_model, device=base.norm.weight.device)[:, index.to(base.norm.weight.device)]
    return directions * norm_gain(base.norm, d_model).unsqueeze(1)


def output_tokens(model: nn.Module, site: str, neurons: list[int], k: int = 10) -> OutputTokens | None:
    """Top and bottom tokens of each neuron's output direction through the unembedding (see the module doc)."""
    directions = output_directions(model, site, neurons)
    if directions is None:
        return None
    unembed = cast(Any, model).get_output_embeddings().weight.float()  # [vocab, d_model]
    parts = []
    with torch.no_grad():
        for start in range(0, len(neurons), CHUNK):
            logits = unembed @ directions[:, start : start + CHUNK].to(unembed.device)  # [vocab, chunk]
            top = logits.topk(k, dim=0)
            bottom = logits.topk(k, dim=0, largest=False)
            parts.append((top.indices.T, top.values.T, bottom.indices.T, bottom.values.T))
    top_ids, top_values, bottom_ids, bottom_values = (torch.cat([p[i] for p in parts]).cpu() for i in range(4))
    return OutputTokens(list(neurons), top_ids, top_values, bottom_ids, bottom_values)
