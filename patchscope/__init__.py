"""patchscope: TransformerLens-named hooks, neuron atlases, Gemma Scope SAEs and Patchscopes on plain HF models.

The package is layered; imports only go down:

    util/        storage (atomic writes), locks, signals, content identity, versions
    model/       sites (TransformerLens names -> HF modules), hooks (capture / patch / stop), loading
    atlas/       sources, batching, the run key and the folder's plan, the fold engine, the atlas and
                 its files, exports, `profile`
    sae/         the JumpReLU module, its loaders, neuron attribution
    scope/       placeholder, extraction, the Patchscope row engine, controls, verdicts, sweeps
    experiment   the whole experiment
    cli/         the ``patchscope`` command

README.md, "Architecture", says which module owns which decision.

Public names are imported lazily, so ``import patchscope`` (and ``patchscope --help``) does not
pay for torch and transformers until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from patchscope._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Atlas": "patchscope.atlas.atlas",
    "AtlasEntry": "patchscope.atlas.atlas",
    "AtlasNeuron": "patchscope.atlas.atlas",
    "AtlasError": "patchscope.atlas.atlas",
    "AtlasMeta": "patchscope.atlas.atlas",
    "SiteAtlas": "patchscope.atlas.atlas",
    "SiteNeuron": "patchscope.atlas.atlas",
    "FeatureSite": "patchscope.atlas.feature_site",
    "AtlasFolder": "patchscope.atlas.folder",
    "RunKey": "patchscope.atlas.key",
    "load_atlas": "patchscope.atlas.store",
    "save_atlas": "patchscope.atlas.store",
    "export_original": "patchscope.atlas.exports",
    "export_parquet": "patchscope.atlas.exports",
    "ProfileConfig": "patchscope.atlas.profile_config",
    "Segment": "patchscope.atlas.batching",
    "profile": "patchscope.atlas.profiling",
    "SourceConfig": "patchscope.atlas.sources",
    "TextSource": "patchscope.atlas.sources",
    "Document": "patchscope.atlas.sources",
    "attribute_neuron": "patchscope.sae.attribution",
    "JumpReLUSAE": "patchscope.sae.jumprelu",
    "SAEError": "patchscope.sae.jumprelu",
    "top_features": "patchscope.sae.jumprelu",
    "load_sae": "patchscope.sae.loaders",
    "Capture": "patchscope.model.hooks",
    "HookFn": "patchscope.model.hooks",
    "Step": "patchscope.model.hooks",
    "StopForward": "patchscope.model.hooks",
    "Cut": "patchscope.model.hooks",
    "ModelInputs": "patchscope.model.hooks",
    "PositionSpec": "patchscope.model.hooks",
    "run_with_cache": "patchscope.model.hooks",
    "add_hooks": "patchscope.model.hooks",
    "capture": "patchscope.model.hooks",
    "patch": "patchscope.model.hooks",
    "run_until": "patchscope.model.hooks",
    "stop_after": "patchscope.model.hooks",
    "PRESETS": "patchscope.model.loading",
    "load_model": "patchscope.model.loading",
    "SiteError": "patchscope.model.sites",
    "SiteRef": "patchscope.model.sites",
    "Layout": "patchscope.model.sites",
    "layout": "patchscope.model.sites",
    "refused_sites": "patchscope.model.sites",
    "list_sites": "patchscope.model.sites",
    "resolve": "patchscope.model.sites",
    "PatchscopeConfig": "patchscope.scope.config",
    "Extraction": "patchscope.scope.extract",
    "ReproductionError": "patchscope.scope.extract",
    "extract": "patchscope.scope.extract",
    "Observation": "patchscope.scope.inject",
    "Row": "patchscope.scope.inject",
    "control_rows": "patchscope.scope.inject",
    "inject": "patchscope.scope.inject",
    "PlaceholderError": "patchscope.scope.placeholder",
    "PromptPlan": "patchscope.scope.placeholder",
    "find_placeholder": "patchscope.scope.placeholder",
    "plan_prompt": "patchscope.scope.placeholder",
    "read_neurons": "patchscope.scope.readout",
    "run_rows": "patchscope.scope.rows",
    "sweep_token": "patchscope.scope.sweep_token",
    "SweepConfig": "patchscope.scope.sweep",
    "SweepResult": "patchscope.scope.sweep",
    "sweep": "patchscope.scope.sweep",
    # types the public functions take and return
    "Policy": "patchscope.atlas.folder",
    "Plan": "patchscope.atlas.folder",
    "Cursor": "patchscope.atlas.folder",
    "World": "patchscope.atlas.distributed",
    "Inputs": "patchscope.atlas.key",
    "Provenance": "patchscope.atlas.atlas",
    "PromptRecord": "patchscope.experiment",
    "NeuronResult": "patchscope.experiment",
    "AtlasRecord": "patchscope.experiment",
    "SAEInfo": "patchscope.sae.jumprelu",
    "SAEReadout": "patchscope.sae.jumprelu",
    "Where": "patchscope.model.families",
    "Generation": "patchscope.scope.rows",
    "PatchRow": "patchscope.scope.rows",
    "RowReadout": "patchscope.scope.rows",
    "Moments": "patchscope.atlas.stats",
    "TopK": "patchscope.atlas.stats",
    "ExactSum": "patchscope.atlas.exact",
    "QuantileExamples": "patchscope.kernels.quantiles",
    "TargetPrompt": "patchscope.scope.prompts",
    "PromptSpec": "patchscope.scope.config",
    "NeuronAttribution": "patchscope.sae.attribution",
    "NeuronTarget": "patchscope.scope.readout",
    "NeuronReadout": "patchscope.scope.readout",
    "Source": "patchscope.scope.sweep",
    "SweepInput": "patchscope.scope.sweep_token",
    "SweepOutcome": "patchscope.scope.sweep_token",
    "Action": "patchscope.atlas.folder",
    "Case": "patchscope.scope.controls",
    "DecodeRelatedness": "patchscope.scope.verdict",
    "FeatureContribution": "patchscope.sae.attribution",
    "FeatureHit": "patchscope.sae.jumprelu",
    "RankShare": "patchscope.atlas.atlas",
    "SAEResult": "patchscope.experiment",
    "SourceToken": "patchscope.experiment",
    "ExperimentConfig": "patchscope.experiment",
    "ExperimentResult": "patchscope.experiment",
    "run_experiment": "patchscope.experiment",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def _notebook_views() -> None:
    """Under IPython (a notebook), register the HTML views of atlas neurons, entries and sweep results."""
    import sys

    if "IPython" in sys.modules:
        importlib.import_module("patchscope.report.notebook")


_notebook_views()


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'patchscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from patchscope.atlas.atlas import (
        Atlas,
        AtlasEntry,
        AtlasError,
        AtlasMeta,
        AtlasNeuron,
        Provenance,
        RankShare,
        SiteAtlas,
        SiteNeuron,
    )
    from patchscope.atlas.batching import Segment
    from patchscope.atlas.distributed import World
    from patchscope.atlas.exact import ExactSum
    from patchscope.atlas.exports import export_original, export_parquet
    from patchscope.atlas.feature_site import FeatureSite
    from patchscope.atlas.folder import Action, AtlasFolder, Cursor, Plan, Policy
    from patchscope.atlas.key import Inputs, RunKey
    from patchscope.atlas.profile_config import ProfileConfig
    from patchscope.atlas.profiling import profile
    from patchscope.atlas.sources import Document, SourceConfig, TextSource
    from patchscope.atlas.stats import Moments, TopK
    from patchscope.atlas.store import load_atlas, save_atlas
    from patchscope.experiment import (
        AtlasRecord,
        ExperimentConfig,
        ExperimentResult,
        NeuronResult,
        PromptRecord,
        SAEResult,
        SourceToken,
        run_experiment,
    )
    from patchscope.kernels.quantiles import QuantileExamples
    from patchscope.model.families import Where
    from patchscope.model.hooks import (
        Capture,
        Cut,
        HookFn,
        ModelInputs,
        PositionSpec,
        Step,
        StopForward,
        add_hooks,
        capture,
        patch,
        run_until,
        run_with_cache,
        stop_after,
    )
    from patchscope.model.loading import PRESETS, load_model
    from patchscope.model.sites import Layout, SiteError, SiteRef, layout, list_sites, refused_sites, resolve
    from patchscope.sae.attribution import FeatureContribution, NeuronAttribution, attribute_neuron
    from patchscope.sae.jumprelu import FeatureHit, JumpReLUSAE, SAEError, SAEInfo, SAEReadout, top_features
    from patchscope.sae.loaders import load_sae
    from patchscope.scope.config import PatchscopeConfig, PromptSpec
    from patchscope.scope.controls import Case
    from patchscope.scope.extract import Extraction, ReproductionError, extract
    from patchscope.scope.inject import Observation, Row, control_rows, inject
    from patchscope.scope.placeholder import PlaceholderError, PromptPlan, find_placeholder, plan_prompt
    from patchscope.scope.prompts import TargetPrompt
    from patchscope.scope.readout import NeuronReadout, NeuronTarget, read_neurons
    from patchscope.scope.rows import Generation, PatchRow, RowReadout, run_rows
    from patchscope.scope.sweep import Source, SweepConfig, SweepResult, sweep
    from patchscope.scope.sweep_token import SweepInput, SweepOutcome, sweep_token
    from patchscope.scope.verdict import DecodeRelatedness
