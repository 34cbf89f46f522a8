"""patchscope: TransformerLens-named hooks, neuron atlases, Gemma Scope SAEs and Patchscopes on plain HF models."""

from ._version import __version__
from .atlas import Atlas, AtlasEntry
from .attribution import attribute_neuron
from .data import SourceConfig, TextSource
from .hooks import Capture, HookFn, StopForward, capture, hooks, patch, run_until, stop_after
from .models import PRESETS, load_model
from .patchscope import PatchscopeConfig, extract, find_placeholder, inject
from .pipeline import ExperimentConfig, ExperimentResult, run_experiment
from .profiler import ProfileConfig, profile
from .sae import JumpReLUSAE, top_features
from .sae_io import load_sae
from .sites import SiteError, resolve, sites

__all__ = [
    "__version__",
    "Atlas",
    "AtlasEntry",
    "Capture",
    "ExperimentConfig",
    "ExperimentResult",
    "HookFn",
    "JumpReLUSAE",
    "PRESETS",
    "PatchscopeConfig",
    "ProfileConfig",
    "SiteError",
    "SourceConfig",
    "StopForward",
    "TextSource",
    "attribute_neuron",
    "capture",
    "extract",
    "find_placeholder",
    "hooks",
    "inject",
    "load_model",
    "load_sae",
    "patch",
    "profile",
    "resolve",
    "run_experiment",
    "run_until",
    "sites",
    "stop_after",
    "top_features",
]
