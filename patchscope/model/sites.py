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

Every other family's block is in `patchscope.model.families` (one table, switched on the text
decoder's ``model_type``); a decoder not in it is read by structural discovery
(`patchscope.model.discovery`). Any module is also a *raw site*: its path and ``:input`` or
``:output`` (``model.layers.3.mlp.down_proj:input``), with the same capture, patch and stop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import torch
from torch import nn

from patchscope.model.discovery import DiscoveryError, discovered_sites, discovery_rule, find_layers
from patchscope.model.families import FAMILIES, FINAL_NORMS, LAYER_PATHS, Table, Where

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

SUPPORTED_FAMILIES = frozenset(FAMILIES)
"""Families in the table; others are read by structural discovery or through raw module sites."""

_BLOCK_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_RAW_SITE = re.compile(r"^(?P<path>[A-Za-z_][\w.]*):(?P<point>input|output)$")
UNORDERED = 1 << 30
"""Order of a raw site outside the decoder layers: no early stop can be placed after it."""


class SiteError(ValueError):
    """A hook name that does not exist on this model."""


@dataclass(frozen=True)
class SiteRef:
    """Where a named site lives on the HF module tree."""

    name: str
    """TransformerLens-style name (``blocks.12.mlp.hook_post``) or raw module site (``model.norm:output``)."""
    layer: int
    """Decoder layer index; -1 for ``hook_embed`` and for raw sites outside the decoder layers."""
    order: int
    """Position of the site in the forward pass; used to find the deepest of several sites."""
    module: nn.Module
    """The HF module that carries the tensor."""
    point: Literal["input", "output"]
    """Whether the site is the module's first input (forward pre-hook) or its output."""
    part: slice | None = None
    """A slice of the module tensor's last dimension (Phi-3's fused ``gate_up_proj``); None for all of it."""


@dataclass(frozen=True)
class Layout:
    """How one model's decoder is laid out, and which rule said so."""

    family: str
    """The text decoder's ``model_type``."""
    rule: str
    """The family table entry or discovery rule that placed the sites (``patchscope sites`` prints it)."""
    layers_path: str
    """Module path of the decoder layers, e.g. ``model.layers`` or ``transformer.h``."""
    layers: nn.ModuleList
    stack: nn.Module
    """The module that owns the layers (``Gemma2Model``, ``GPT2Model``)."""
    final_norm: nn.Module | None
    embed_in_forward: bool
    """The model's forward scales the embedding after the embedding module (see `resolve`)."""

    def table(self, layer: int, config: Any) -> Table:
        block = self.layers[layer]
        family = FAMILIES.get(self.family)
        if family is not None:
            return family.sites(block, config)
        return discovered_sites(block, f"{self.layers_path}.{layer}", config.hidden_size)


def text_config(model: nn.Module) -> Any:
    """The decoder's config: ``config.text_config`` for multimodal checkpoints (Gemma 3), else ``config``."""
    config: Any = getattr(model, "config", None)
    if config is None:
        raise SiteError(f"{type(model).__name__} has no HF config; pass a transformers model")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _table_layers(model: nn.Module) -> str | None:
    for path in (*LAYER_PATHS, "layers", "h"):
        try:
            if isinstance(model.get_submodule(path), nn.ModuleList):
                return path
        except AttributeError:
            continue
    return None


def layout(model: nn.Module) -> Layout:
    """The family table entry for this model's ``model_type``, else structural discovery."""
    config = text_config(model)
    family = FAMILIES.get(config.model_type)
    path = _table_layers(model) if family is not None else None
    if family is not None and path is not None:
        top = getattr(model.config, "model_type", config.model_type)
        rule = f"family table: {config.model_type}" + (f" (text tower of {top})" if top != config.model_type else "")
        rule += f" - {family.layout}"
    else:
        try:
            path, _ = find_layers(model, config.num_hidden_layers)
        except DiscoveryError as error:
            raise SiteError(f"{config.model_type!r} ({type(model).__name__}) is not in the family table and {error}") from None
        rule = ""
    layers = cast(nn.ModuleList, model.get_submodule(path))
    stack = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    norm = next((getattr(stack, n) for n in FINAL_NORMS if isinstance(getattr(stack, n, None), nn.Module)), None)
    found = Layout(config.model_type, rule, path, layers, stack, norm, family is not None and family.embed_in_forward)
    if not rule:
        found = replace(found, rule=discovery_rule(path, found.table(0, config)))
    return found


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``Gemma2Model``, ``GPT2Model``) of a causal LM, or the model itself if it is one."""
    return layout(model).stack


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return layout(model).layers


def model_family(model: nn.Module) -> str:
    """The text decoder's HF ``model_type``."""
    return text_config(model).model_type


def n_layers(model: nn.Module) -> int:
    return len(layout(model).layers)


def is_raw(name: str) -> bool:
    """Whether ``name`` is a raw module site (``<module path>:input`` or ``:output``)."""
    return _RAW_SITE.fullmatch(name) is not None


def list_sites(model: nn.Module) -> list[str]:
    """Every named hook site of this model, in forward order (refused sites left out; see `refused_sites`)."""
    found = layout(model)
    config = text_config(model)
    names = ["hook_embed"]
    for layer in range(len(found.layers)):
        table = found.table(layer, config)
        names += [
            f"blocks.{layer}.{s}"
            for s in SITE_SUFFIXES
            if s in ("hook_resid_pre", "hook_resid_post") or isinstance(table.get(s), Where)
        ]
    return names


def refused_sites(model: nn.Module) -> dict[str, str]:
    """``{site: why it does not exist}`` for the named sites this model's layout refuses."""
    found = layout(model)
    config = text_config(model)
    refused = {}
    for layer in range(len(found.layers)):
        for suffix, where in found.table(layer, config).items():
            if isinstance(where, str):
                refused[f"blocks.{layer}.{suffix}"] = where
    return refused


def parse_site(name: str) -> tuple[int, str]:
    """``blocks.12.mlp.hook_post`` -> ``(12, "mlp.hook_post")``; ``hook_embed`` -> ``(-1, "hook_embed")``.

    A raw site gives ``(the first number in its path or -1, the name)``: ``model.layers.3.mlp:output``
    -> ``(3, "model.layers.3.mlp:output")``. Checks the spelling only; `resolve` also checks the model.
    """
    if name == "hook_embed":
        return -1, name
    raw = _RAW_SITE.fullmatch(name)
    if raw is not None:
        number = next((int(part) for part in raw.group("path").split(".") if part.isdigit()), -1)
        return number, name
    match = _BLOCK_SITE.fullmatch(name)
    if match is None or match.group(2) not in SITE_SUFFIXES:
        raise SiteError(
            f"unknown hook site {name!r}; valid: 'hook_embed', 'blocks.<L>.<site>' with <site> one of "
            f"{', '.join(SITE_SUFFIXES)}, or a raw module site '<module path>:input' / '<module path>:output'"
        )
    return int(match.group(1)), match.group(2)


def site_order(name: str) -> int:
    """Sort key of a site in the forward pass (works without a model).

    A raw site in layer L sorts with ``blocks.L.hook_resid_post`` (somewhere inside layer L); one
    without a layer number sorts last (`UNORDERED`).
    """
    layer, suffix = parse_site(name)
    if is_raw(name):
        return layer * len(SITE_SUFFIXES) + len(SITE_SUFFIXES) - 1 if layer >= 0 else UNORDERED
    if layer < 0:
        return -1
    return layer * len(SITE_SUFFIXES) + SITE_SUFFIXES.index(suffix)


def check_layer(model: nn.Module, layer: int) -> None:
    count = n_layers(model)
    if not 0 <= layer < count:
        raise SiteError(f"layer {layer} is out of range: this model has layers 0..{count - 1}")


def _resolve_raw(model: nn.Module, name: str) -> SiteRef:
    match = cast(re.Match, _RAW_SITE.fullmatch(name))
    path, point = match.group("path"), cast(Literal["input", "output"], match.group("point"))
    try:
        module = model.get_submodule(path)
    except AttributeError:
        parent = path.rpartition(".")[0]
        try:
            children = ", ".join(n for n, _ in model.get_submodule(parent).named_children()) if parent else ""
        except AttributeError:
            children = ""
        hint = f"; children of {parent}: {children}" if children else "; `patchscope sites --modules` lists them"
        raise SiteError(f"raw site {name!r}: {type(model).__name__} has no module {path!r}{hint}") from None
    try:
        prefix = layout(model).layers_path + "."
    except SiteError:
        prefix = None  # no layer list known: the site works, but no early stop can follow it
    layer = -1
    if prefix and path.startswith(prefix) and path[len(prefix) :].split(".")[0].isdigit():
        layer = int(path[len(prefix) :].split(".")[0])
    order = layer * len(SITE_SUFFIXES) + len(SITE_SUFFIXES) - 1 if layer >= 0 else UNORDERED
    return SiteRef(name, layer, order, module, point)


def resolve(model: nn.Module, name: str) -> SiteRef:
    """The module and hook point behind a TransformerLens name or a raw module site."""
    if is_raw(name):
        return _resolve_raw(model, name)
    layer, suffix = parse_site(name)
    found = layout(model)
    order = site_order(name)
    if layer < 0:
        embed: Any = cast(Any, model).get_input_embeddings()
        # Gemma scales embeddings by sqrt(d_model), Granite by embedding_multiplier. In transformers 5.x
        # Gemma's embedding module does it; in 4.x and in Granite the model's forward does, so the
        # scaled value is first seen entering layer 0.
        if found.embed_in_forward and not hasattr(embed, "embed_scale"):
            return SiteRef(name, -1, order, found.layers[0], "input")
        return SiteRef(name, -1, order, embed, "output")
    check_layer(model, layer)
    block = found.layers[layer]
    if suffix == "hook_resid_pre":
        return SiteRef(name, layer, order, block, "input")
    if suffix == "hook_resid_post":
        return SiteRef(name, layer, order, block, "output")
    where = found.table(layer, text_config(model)).get(suffix, f"{found.family} has no {suffix}")
    if isinstance(where, str):
        raise SiteError(f"{name} does not exist on this model: {where}")
    return SiteRef(name, layer, order, where.module, where.point, where.part)


def stop_site(model: nn.Module, names: list[str] | tuple[str, ...]) -> str | None:
    """The site after which a forward pass that must reach every one of ``names`` can stop; None: run it all.

    The deepest site by forward order. A raw site inside layer L stops after that layer's output; a
    raw site outside the decoder layers (the final norm, the LM head) needs the whole forward.
    """
    if not names:
        return None
    deepest = max((resolve(model, name) for name in names), key=lambda ref: ref.order)
    if deepest.order >= UNORDERED:
        return None
    return f"blocks.{deepest.layer}.hook_resid_post" if is_raw(deepest.name) else deepest.name


def _projection_width(module: nn.Module, point: str) -> int | None:
    """Width of a ``Linear`` / ``Conv1D`` / embedding / 1-d-weighted (norm) module's input or output."""
    if isinstance(module, nn.Linear):
        return module.in_features if point == "input" else module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):  # weight [in, out]
        return int(weight.shape[0] if point == "input" else weight.shape[1])
    if isinstance(module, nn.Embedding) and point == "output":
        return module.embedding_dim
    return None


def site_width(model: nn.Module, name: str) -> int:
    """Size of the last dimension at a site: d_mlp for ``mlp.*`` sites, d_model otherwise; raw sites are measured."""
    ref = resolve(model, name)
    if ref.part is not None:
        return len(range(*ref.part.indices(1 << 62)))
    if is_raw(name):
        return _projection_width(ref.module, ref.point) or _probe_width(model, ref)
    _, suffix = parse_site(name)
    if suffix.startswith("mlp."):
        width = _projection_width(ref.module, ref.point)
        if width is not None:
            return width
    return text_config(model).intermediate_size if suffix.startswith("mlp.") else text_config(model).hidden_size


class _Seen(Exception):
    pass


def _probe_width(model: nn.Module, ref: SiteRef) -> int:
    """Run one token until ``ref`` is reached and read its width (a raw site on a module of unknown shape)."""
    widths: list[int] = []

    def seen(tensor: Any) -> None:
        tensor = tensor[0] if isinstance(tensor, tuple) else tensor
        widths.append(int(tensor.shape[-1]))
        raise _Seen

    if ref.point == "input":
        handle = ref.module.register_forward_pre_hook(
            lambda m, args, kwargs: seen(args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))),
            with_kwargs=True,
        )
    else:
        handle = ref.module.register_forward_hook(lambda m, args, output: seen(output))
    device = cast(Any, model).get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    except _Seen:
        pass
    finally:
        handle.remove()
    if not widths:
        raise SiteError(f"raw site {ref.name!r}: its module did not run in a one-token forward pass")
    return widths[0]
