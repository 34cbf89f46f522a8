"""Library versions recorded with every output."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

from patchscope._version import __version__


def versions() -> dict[str, str]:
    found = {"patchscope": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "safetensors", "datasets", "accelerate"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    if torch.cuda.is_available():
        found["cuda"] = str(torch.version.cuda)
        found["gpu"] = torch.cuda.get_device_name()
    return found
