"""The truncated forward under ``torch.compile`` (``ProfileConfig.compile``).

The decoder layers that hold no profiled site run compiled; the layers with sites stay eager, so the
hooks and the early stop behave exactly as without compilation. For ``blocks.L.mlp.hook_post`` that
compiles layers ``0..L-1``: all of the forward but the last, partial layer.

Compiled values are not bit-identical to eager ones (inductor fuses and reorders float arithmetic);
``tests/test_compile.py`` holds the atlas to the documented tolerance: relative 1e-5 in float32 and
1e-2 in bfloat16, with the same top-1 locations wherever the top two values are further apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from patchscope.model.sites import decoder_layers


class CompiledLayers:
    """Compiled wrappers of the first ``count`` decoder layers, swapped in only during a forward."""

    def __init__(self, model: nn.Module, count: int) -> None:
        self.layers = decoder_layers(model)
        # dynamic=None: the first batch shape compiles a static graph, the next one a dynamic graph
        # that serves every later (batch, pos); compiled code is shared by layers of one class.
        # torch.compile of a module returns an OptimizedModule, itself an nn.Module
        self.compiled = {index: cast(nn.Module, torch.compile(self.layers[index])) for index in range(max(count, 0))}

    @contextmanager
    def active(self) -> Iterator[None]:
        originals = {index: self.layers[index] for index in self.compiled}
        try:
            for index, wrapper in self.compiled.items():
                self.layers[index] = wrapper
            yield
        finally:
            for index, layer in originals.items():
                self.layers[index] = layer
