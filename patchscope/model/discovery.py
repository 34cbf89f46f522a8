"""Structural discovery: the sites of a decoder whose ``model_type`` is not in the family table.

Read from the module tree alone, and used only when unambiguous:

1. the decoder layers are the one ``nn.ModuleList`` of ``num_hidden_layers`` modules of one class;
2. the MLP is the one child of a layer named like ``mlp``, ``ffn`` or ``feed_forward``;
3. its output projection is the one ``Linear`` / ``Conv1D`` child that writes ``hidden_size`` from a
   wider input: ``mlp.hook_post`` is that input; ``mlp.hook_pre`` is the output of the one projection
   that writes that width (or of the one named ``gate`` among several).

``hook_resid_pre`` / ``hook_resid_post`` are the layer's input and output. Where attention's output,
the residual between the sublayers and the MLP's output sit depends on the norms and the residual
wiring, which the tree does not show, so those sites are refused with the raw site to use instead.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from patchscope.model.families import Table, Where

_MLP_NAME = re.compile(r"mlp|ffn|feed_?forward", re.IGNORECASE)


class DiscoveryError(ValueError):
    """The module tree does not say unambiguously where a site is; the message names what was found."""


def find_layers(model: nn.Module, count: int) -> tuple[str, nn.ModuleList]:
    """Rule 1: the path and the list of the decoder layers."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count and len({type(m) for m in module}) == 1
    ]
    if len(found) == 1:
        return found[0]
    lists = [
        f"{name} ({len(m)} x {type(m[0]).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m)
    ]
    if not found:
        raise DiscoveryError(
            f"no module list of {count} layers (num_hidden_layers) of one class; module lists found: "
            f"{', '.join(lists) or 'none'}. Use raw module sites ('<path>:input' / '<path>:output')"
        )
    raise DiscoveryError(
        f"{len(found)} module lists could be the {count} decoder layers: {', '.join(n for n, _ in found)}; "
        "use raw module sites ('<path>:input' / '<path>:output')"
    )


def _width(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` of a ``Linear`` or a ``Conv1D`` (GPT-2's, weight stored ``[in, out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        weight: Any = module.weight
        return int(weight.shape[0]), int(weight.shape[1])
    return None


def _mlp_sites(block: nn.Module, path: str, hidden: int) -> Table:
    """Rules 2 and 3 for one layer; refusals name the modules found."""
    named = [(name, child) for name, child in block.named_children() if _MLP_NAME.search(name)]
    if len(named) != 1:
        children = ", ".join(name for name, _ in block.named_children())
        why = f"discovery found {len(named)} MLP-like children of {path} (its children: {children})"
        return {"mlp.hook_pre": why, "mlp.hook_post": why}
    mlp_name, mlp = named[0]
    projections = [(name, m, _width(m)) for name, m in mlp.named_children() if _width(m) is not None]
    outs = [(name, m, w) for name, m, w in projections if w and w[1] == hidden and w[0] != hidden]
    if len(outs) != 1:
        listed = ", ".join(f"{name} {w[0]}->{w[1]}" for name, _, w in projections if w) or "none"
        why = f"discovery found no single output projection ({hidden} wide) in {path}.{mlp_name}; projections: {listed}"
        return {"mlp.hook_pre": why, "mlp.hook_post": why}
    d_mlp = outs[0][2][0]
    table: Table = {"mlp.hook_post": Where(outs[0][1], "input")}
    ups = [(name, m) for name, m, w in projections if w and w[1] == d_mlp and w[0] == hidden]
    gates = [(name, m) for name, m in ups if "gate" in name]
    chosen = ups if len(ups) == 1 else gates
    if len(chosen) == 1:
        table["mlp.hook_pre"] = Where(chosen[0][1], "output")
    else:
        names = ", ".join(f"{path}.{mlp_name}.{name}" for name, _ in ups) or "none"
        table["mlp.hook_pre"] = f"discovery cannot tell which projection is the pre-activation among: {names}"
    return table


def discovered_sites(block: nn.Module, path: str, hidden: int) -> Table:
    """The table of one discovered layer (``path`` is its module path, for the messages)."""
    table = _mlp_sites(block, path, hidden)
    for suffix, module in (
        ("hook_attn_out", "<attention>"),
        ("hook_resid_mid", "<norm before the MLP>"),
        ("hook_mlp_out", "<mlp>"),
    ):
        table[suffix] = (
            f"discovery does not place {suffix}: it depends on the block's norms and residual wiring, which the "
            f"module tree does not show; use a raw site such as '{path}.{module}:output' (see `patchscope sites`)"
        )
    return table


def discovery_rule(layers_path: str, table: Table) -> str:
    """The line ``patchscope sites`` prints for a discovered model."""
    found = [suffix for suffix, where in table.items() if isinstance(where, Where)]
    extra = f"; {', '.join(found)} from the MLP's projections" if found else ""
    return f"structural discovery: decoder layers at {layers_path}{extra}"
