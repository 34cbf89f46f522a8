"""patchscope: TransformerLens-named hooks, neuron atlases, Gemma Scope SAEs and Patchscopes on plain HF models."""

from ._version import __version__
from .hooks import Capture, HookFn, StopForward, capture, hooks, patch, run_until, stop_after
from .models import PRESETS, load_model
from .sites import SiteError, resolve, sites

__all__ = [
    "__version__",
    "Capture",
    "HookFn",
    "StopForward",
    "PRESETS",
    "SiteError",
    "capture",
    "hooks",
    "load_model",
    "patch",
    "resolve",
    "run_until",
    "sites",
    "stop_after",
]
