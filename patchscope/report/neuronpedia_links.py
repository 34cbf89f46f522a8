"""Links from an atlas page to Neuronpedia, where its page for that neuron or feature is known.

- Raw MLP neurons of gemma-2-2b: ``neuronpedia.org/gemma-2-2b/{layer}/{index}`` (Neuronpedia's source set
  ``neurons``, one source per layer; stated in this project's issue #22 from Neuronpedia's source).
  Only ``blocks.L.mlp.hook_post`` is linked: those are the MLP's neurons.
- SAE features: ``neuronpedia.org/{model}/{source}/{index}`` for an SAE whose `SAEInfo.neuronpedia`
  names its source (Gemma Scope ``gemma-2-2b/11-gemmascope-res-16k``, Gemma Scope 2
  ``gemma-3-270m/5-gemmascope-2-res-16k``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from patchscope.atlas.feature_site import FeatureSite, is_feature_site
from patchscope.model.loading import preset_for

NEURONPEDIA = "https://www.neuronpedia.org"
RAW_NEURON_MODELS = frozenset({"gemma-2-2b"})
"""Neuronpedia model ids whose raw MLP neurons have pages."""
_MLP_NEURON = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")


def neuron_url(model: str, site: str, index: int) -> str | None:
    """The Neuronpedia page of one raw MLP neuron, or None where Neuronpedia has none we know of."""
    preset = preset_for(model)
    model_id = preset.neuronpedia_id if preset else None
    match = _MLP_NEURON.fullmatch(site)
    if model_id not in RAW_NEURON_MODELS or match is None:
        return None
    return f"{NEURONPEDIA}/{model_id}/{match.group(1)}/{index}"


def feature_url(source: str | None, index: int) -> str | None:
    """The Neuronpedia page of SAE feature ``index`` of ``source`` (``{model}/{source id}``), if it has one."""
    return f"{NEURONPEDIA}/{source}/{index}" if source else None


def page_url(model: str, site: str, index: int, features: Sequence[FeatureSite] = ()) -> str | None:
    """The Neuronpedia page of a neuron or, at an SAE feature site, of that feature; None if unknown.

    Raises ValueError for a feature site whose SAE is not among ``features``: its values cannot be replayed.
    """
    feature = feature_of(site, features)
    return feature_url(feature.neuronpedia, index) if feature else neuron_url(model, site, index)


def feature_of(site: str, features: Sequence[FeatureSite]) -> FeatureSite | None:
    """The SAE behind a feature site (None for a neuron site)."""
    if not is_feature_site(site):
        return None
    found = next((f for f in features if f.name == site), None)
    if found is None:
        raise ValueError(f"{site} holds SAE features: pass that SAE (--sae) so that its examples can be replayed")
    return found
