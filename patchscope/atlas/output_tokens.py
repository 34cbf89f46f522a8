"""The output-token view of a neuron, from the weights alone: which tokens its output promotes.

For an MLP neuron (``blocks.L.mlp.hook_post``) the output direction is ``d = down_proj.weight[:, n]``.
(GPT-2's ``Conv1D`` stores it transposed: ``c_proj.weight[n, :]``). On its way to the logits it passes
the norm after the MLP where the family has one (``hook_mlp_out`` is that norm's output: Gemma-2,
Gemma-3, OLMo-2) and the final norm, RMSNorms ``x / rms(x) * g``. We fold in their gains ``g`` (``1 + w`` in
Gemma, ``w`` in Llama), read by applying each norm to a vector of ones, and leave out the division
by ``rms(x)``: that depends on the whole vector at each token (the other neurons, the residual
stream), but it is one positive factor for every vocabulary entry, so it scales these logits
without changing which tokens rank top or bottom. Gemma's final logit soft-cap is monotone and
left out for the same reason. So the view is ``W_U (g_final * g_post * d)``. A LayerNorm (GPT-2,
GPT-NeoX, Cohere) also subtracts the mean: there the direction is centred, then scaled by the norm's
weight; its bias is the same for every neuron and left out.

For residual-stream sites (and ``hook_mlp_out`` / ``hook_attn_out``, which come after their
post-norms) the direction is the basis vector of the dimension, through the final norm only.
``mlp.hook_pre`` and raw module sites have no output direction of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from patchscope.model.sites import is_raw, layout, parse_site, resolve, text_config

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


def through_norm(norm: nn.Module, directions: Tensor) -> Tensor:
    """``[d_model, n]`` directions with a norm's gain folded in (centred first when the norm centres)."""
    width = directions.shape[0]
    weight = next(norm.parameters())
    with torch.no_grad():
        zero = norm(torch.zeros(1, width, dtype=weight.dtype, device=weight.device)).float().squeeze(0)
    gain = norm_gain(norm, width)
    if torch.allclose(gain, zero):  # ones map to the bias alone: the norm subtracts the mean (LayerNorm)
        return (directions - directions.mean(0, keepdim=True)) * weight.float().unsqueeze(1).to(directions.device)
    return directions * (gain - zero).unsqueeze(1).to(directions.device)


def _out_matrix(module: nn.Module) -> Tensor:
    """``[d_model, d_mlp]``: the output projection's weight (``Conv1D`` stores it ``[in, out]``)."""
    weight = cast(Tensor, module.weight)
    return weight.T if type(module).__name__ == "Conv1D" else weight


def output_directions(model: nn.Module, site: str, neurons: list[int]) -> Tensor | None:
    """``[d_model, neurons]`` float32 directions with the norm gains folded in, or None for ``mlp.hook_pre``."""
    layer, suffix = parse_site(site)
    found = layout(model)
    d_model: int = text_config(model).hidden_size
    index = torch.tensor(neurons, dtype=torch.long)
    if suffix == "mlp.hook_pre" or is_raw(site):
        return None
    if suffix == "mlp.hook_post":
        weight = _out_matrix(resolve(model, site).module)  # [d_model, d_mlp]
        directions = weight[:, index.to(weight.device)].float()
        after = resolve(model, f"blocks.{layer}.hook_mlp_out").module
        if not list(after.children()):  # hook_mlp_out is a norm's output, not the MLP's
            directions = through_norm(after, directions)
    else:
        device = next(found.layers.parameters()).device
        directions = torch.eye(d_model, device=device)[:, index.to(device)]
    return directions if found.final_norm is None else through_norm(found.final_norm, directions)


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
