"""Atlas pages for the SAE features a run names, where the run's atlas profiled that SAE.

`patchscope run` lists, per studied neuron, the top SAE features of the extracted vector and the
features that drive the neuron. When the atlas the run used holds the feature site of that same SAE
(the same site and content digest, `patchscope.atlas.feature_site.sae_digest`: profiled in the run's
own pass with ``--profile-features``, or earlier by ``patchscope profile --sae`` into the same
``out``), each listed feature gets the dashboard's own page (`patchscope.report.dashboard.write_dashboard`)
under ``out/dashboard/``, and the run's page links every listed feature to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from patchscope.atlas.atlas import Atlas
from patchscope.atlas.feature_site import SEPARATOR, FeatureSite, reads_of, sae_digest
from patchscope.report.dashboard import DashboardConfig, neuron_file, shown_examples, top_documents, write_dashboard

PAGES = "dashboard"
"""The folder, beside the run's ``report.html``, that holds the feature pages."""


def profiled_as(atlas: Atlas, feature: FeatureSite) -> FeatureSite | None:
    """``feature`` under the name ``atlas`` profiled that same SAE (its site and content), or None if it did not."""
    for name, identity in atlas.meta.features.items():
        same = reads_of(name) == feature.reads and sae_digest(identity) == sae_digest(feature.identity)
        if same and name in atlas.sites:
            return dataclasses.replace(feature, label=name.partition(SEPARATOR)[2])
    return None


def write_feature_pages(
    atlas: Atlas,
    out: str | Path,
    feature: FeatureSite,
    indices: Iterable[int],
    *,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: DashboardConfig = DashboardConfig(),
) -> dict[int, str]:
    """The dashboard of ``feature``'s site (as `profiled_as` names it) with pages for ``indices``, under
    ``out/dashboard/``; returns ``{feature: its page, relative to out}``."""
    if feature.name not in atlas.sites:
        raise ValueError(f"the atlas has no {feature.name}: profile the SAE's features first (`profiled_as`)")
    site = Atlas(atlas.meta, {feature.name: atlas[feature.name]})  # the neuron sites' pages are `patchscope report`'s
    chosen = dataclasses.replace(config, neurons=tuple(sorted(set(indices))))
    if not chosen.neurons:
        return {}
    shown = {e.doc for n in chosen.neurons for group in shown_examples(site, feature.name, n, chosen).values() for _, e in group}
    texts = atlas.texts(shown | top_documents(site))  # the index quotes every feature's top token
    write_dashboard(site, Path(out) / PAGES, model=model, tokenizer=tokenizer, texts=texts, config=chosen, features=[feature])
    return {n: f"{PAGES}/{neuron_file(feature.name, n)}" for n in chosen.neurons}
