"""Which SAE features explain an MLP neuron at one token.

With ``x`` the residual vector at ``(site, position)`` and ``a(x)`` the neuron's activation at that
position (the rest of the context held fixed), each active feature ``i`` contributes
``grad a(x) · (acts_i * W_dec[i])``: a first-order estimate of how much the neuron would drop if
the feature were removed from ``x``. The decomposition is exact in the gradient:
``grad·x = sum_i contribution_i + grad·b_dec + grad·error``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from patchscope.model.hooks import Step, add_hooks, patch, stop_after
from patchscope.model.sites import parse_site, site_order
from patchscope.sae.jumprelu import JumpReLUSAE, check_site


@dataclass(frozen=True)
class FeatureContribution:
    index: int
    activation: float
    """The feature's SAE activation on ``x``."""
    contribution: float
    """``grad · (activation * W_dec[index])``, in units of the neuron's activation."""
    url: str | None


@dataclass
class NeuronAttribution:
    neuron: int
    neuron_site: str
    value: float
    """The neuron's activation at the position."""
    features: list[FeatureContribution]
    """Active features, largest |contribution| first."""
    bias_contribution: float
    """``grad · b_dec``."""
    error_contribution: float
    """``grad · (x - reconstruction)``: what the SAE misses."""
    gradient: Tensor  # [d_model]


def neuron_function(model: nn.Module, input_ids: Tensor, site: str, position: int, neuron_site: str, neuron: int):
    """``f(v)`` = the neuron at ``position`` when the residual at (site, position) is replaced by ``v``.

    Each call runs the model only up to ``neuron_site``.
    """
    if site_order(neuron_site) <= site_order(site):
        raise ValueError(f"the neuron site {neuron_site} must come after {site} in the forward pass")

    def f(vector: Tensor) -> Tensor:
        seen: dict[str, Tensor] = {}

        def keep(value: Tensor, step: Step) -> None:
            seen["value"] = value

        with (
            patch(model, site, vector, positions=[position]),
            add_hooks(model, {neuron_site: keep}),
            stop_after(model, neuron_site),
        ):
            model(input_ids=input_ids, use_cache=False)
        return seen["value"][0, position, neuron].float()

    return f


def attribute_neuron(
    model: nn.Module,
    sae: JumpReLUSAE,
    input_ids: Tensor,
    position: int,
    vector: Tensor,
    *,
    site: str,
    neuron: int,
    neuron_site: str | None = None,
    allow_site_mismatch: bool = False,
) -> NeuronAttribution:
    """Rank the SAE features active in ``vector`` (from ``site`` at ``position``) by how much each drives ``neuron``.

    ``neuron_site`` defaults to the MLP (``mlp.hook_post``) of the first layer that reads ``site``.
    """
    check_site(sae, site, allow_site_mismatch=allow_site_mismatch)
    if neuron_site is None:
        layer, suffix = parse_site(site)
        neuron_site = f"blocks.{layer + (suffix == 'hook_resid_post')}.mlp.hook_post"
    f = neuron_function(model, input_ids, site, position, neuron_site, neuron)
    x = vector.detach().float().reshape(-1)
    with torch.enable_grad():
        v = x.clone().requires_grad_(True)
        value = f(v)
        (gradient,) = torch.autograd.grad(value, v)
    gradient = gradient.to(sae.W_dec.device)
    x = x.to(sae.W_dec.device)
    acts = sae.encode(x)  # [d_sae]
    active = acts.nonzero().flatten()
    contributions = acts[active] * (sae.W_dec[active] @ gradient)  # [n_active]
    order = contributions.abs().argsort(descending=True)
    features = [
        FeatureContribution(int(active[i]), float(acts[active[i]]), float(contributions[i]), sae.feature_url(int(active[i])))
        for i in order.tolist()
    ]
    recon = sae.decode(acts)
    return NeuronAttribution(
        neuron=neuron,
        neuron_site=neuron_site,
        value=float(value.detach()),
        features=features,
        bias_contribution=float(sae.b_dec @ gradient),
        error_contribution=float((x - recon) @ gradient),
        gradient=gradient,
    )
