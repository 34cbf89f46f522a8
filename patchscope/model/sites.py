"""TransformerLens hook names, resolved to modules of a plain HuggingFace decoder.

Where each site sits in a Gemma-2 block (four RMSNorms, all computed in float32):

    resid_pre ─┬─ input_layernorm ─ self_attn ─ post_attention_layernorm ─ (+) ─ resid_mid
               └──────────────────────────────────────────────────────────┘  ↑ attn_out
    resid_mid ─┬─ pre_feedforward_layernorm ─ mlp ─ post_feedforward_layernorm ─ (+) ─ resid_post
               └──────────────────────────────────────────────────────────────┘  ↑ mlp_out
    mlp:  gate_proj(x) = mlp.hook_pre;  act(gate_proj(x)) * up_proj(x) = mlp.hook_post = input of down_proj

`hook_mlp_out` is the output of `post_feedforward_layernorm`, *after* the post-norm: hooking
the `mlp` module itself would be before it. Llama-style families (Llama, Mistral, Qwen2,
Gemma v1) have no post-norms; there `hook_attn_out` / `hook_mlp_out` are the outputs of
`self_attn` / `mlp`, and `hook_resid_mid` is the input of `post_attention_layernorm`, which
in those families is the norm *before* the MLP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, cast

from torch import nn

SITE_SUFFIXES: tuple[str, ...] = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
"""Per-block sites, in the order the forward pass reaches them."""

POST_NORM_FAMILIES = frozenset({"gemma2", "gemma3_text"})
"""Families with a norm after attention and after the MLP (the sandwich norm). Gemma 3's text
decoder (``gemma3_text``) has Gemma-2's four norms; it adds q/k norms inside attention."""

PRE_NORM_FAMILIES = frozenset({"llama", "mistral", "qwen2", "gemma"})
"""Llama-style families: one norm before attention, one before the MLP."""

SUPPORTED_FAMILIES = POST_NORM_FAMILIES | PRE_NORM_FAMILIES

_BLOCK_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class SiteError(ValueError):
    """A hook name that does not exist on this model."""


@dataclass(frozen=True)
class SiteRef:
    """Where a named site lives on the HF module tree."""

    name: str
    """TransformerLens-style name, e.g. ``blocks.12.mlp.hook_post``."""
    layer: int
    """Decoder layer index; -1 for ``hook_embed``."""
    order: int
    """Position of the site in the forward pass; used to find the deepest of several sites."""
    module: nn.Module
    """The HF module that carries the tensor."""
    point: Literal["input", "output"]
    """Whether the site is the module's first input (forward pre-hook) or its output."""


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``Gemma2Model``) of a causal LM, or the model itself if it is one."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "layers"):
        return inner
    if hasattr(model, "layers"):
        return model
    raise SiteError(
        f"{type(model).__name__} has no decoder layers at .model.layers or .layers; "
        f"supported families: {', '.join(sorted(SUPPORTED_FAMILIES))}"
    )


def model_family(model: nn.Module) -> str:
    """The HF ``model_type``, checked against the families whose layout we know."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise SiteError(
            f"unsupported architecture {family!r} ({type(model).__name__}); supported: {', '.join(sorted(SUPPORTED_FAMILIES))}"
        )
    return family


def n_layers(model: nn.Module) -> int:
    return len(cast(nn.ModuleList, base_model(model).layers))


def list_sites(model: nn.Module) -> list[str]:
    """Every hook name of this model, in forward order."""
    model_family(model)
    names = ["hook_embed"]
    for layer in range(n_layers(model)):
        names += [f"blocks.{layer}.{suffix}" for suffix in SITE_SUFFIXES]
    return names


def parse_site(name: str) -> tuple[int, str]:
    """``blocks.12.mlp.hook_post`` -> ``(12, "mlp.hook_post")``; ``hook_embed`` -> ``(-1, "hook_embed")``.

    Checks the spelling only; `resolve` also checks the layer against a model.
    """
    if name == "hook_embed":
        return -1, name
    match = _BLOCK_SITE.fullmatch(name)
    if match is None or match.group(2) not in SITE_SUFFIXES:
        raise SiteError(
            f"unknown hook site {name!r}; valid: 'hook_embed' or 'blocks.<L>.<site>' with <site> one of "
            f"{', '.join(SITE_SUFFIXES)}"
        )
    return int(match.group(1)), match.group(2)


def site_order(name: str) -> int:
    """Sort key of a site in the forward pass (works without a model)."""
    layer, suffix = parse_site(name)
    if layer < 0:
        return -1
    return layer * len(SITE_SUFFIXES) + SITE_SUFFIXES.index(suffix)


def check_layer(model: nn.Module, layer: int) -> None:
    count = n_layers(model)
    if not 0 <= layer < count:
        raise SiteError(f"layer {layer} is out of range: this model has layers 0..{count - 1}")


def resolve(model: nn.Module, name: str) -> SiteRef:
    """The module and hook point behind a TransformerLens name."""
    family = model_family(model)
    layer, suffix = parse_site(name)
    base: Any = base_model(model)  # HF decoder: its submodules are found by attribute name
    order = site_order(name)
    if layer < 0:
        embed = base.embed_tokens
        # Gemma scales embeddings by sqrt(d_model). In transformers 5.x the embedding module does
        # it; in 4.x Gemma*Model.forward does, so the scaled value is first seen entering layer 0.
        if family.startswith("gemma") and not hasattr(embed, "embed_scale"):
            return SiteRef(name, -1, order, base.layers[0], "input")
        return SiteRef(name, -1, order, embed, "output")

    check_layer(model, layer)
    block = base.layers[layer]
    post_norm = family in POST_NORM_FAMILIES
    table: dict[str, tuple[nn.Module, Literal["input", "output"]]] = {
        "hook_resid_pre": (block, "input"),
        "hook_resid_post": (block, "output"),
        "mlp.hook_pre": (block.mlp.gate_proj, "output"),
        "mlp.hook_post": (block.mlp.down_proj, "input"),
    }
    if post_norm:
        table["hook_attn_out"] = (block.post_attention_layernorm, "output")
        table["hook_resid_mid"] = (block.pre_feedforward_layernorm, "input")
        table["hook_mlp_out"] = (block.post_feedforward_layernorm, "output")
    else:
        table["hook_attn_out"] = (block.self_attn, "output")
        table["hook_resid_mid"] = (block.post_attention_layernorm, "input")
        table["hook_mlp_out"] = (block.mlp, "output")
    module, point = table[suffix]
    return SiteRef(name, layer, order, module, point)


def site_width(model: nn.Module, name: str) -> int:
    """Size of the last dimension at a site: d_mlp for ``mlp.*`` sites, d_model otherwise."""
    _, suffix = parse_site(name)
    config: Any = model.config
    return config.intermediate_size if suffix.startswith("mlp.") else config.hidden_size
