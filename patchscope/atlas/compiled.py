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

_LAST_DTYPE: list[torch.dtype] = []  # the dtype of the layers compiled last in this process


class CompiledLayers:
    """Compiled wrappers of the first ``count`` decoder layers, swapped in only during a forward.

    Dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (8) graphs per code object, and the
    layers of one class share one ``forward``; past the limit it runs that code eagerly with no more
    than a log line. So every graph here is dynamic from the first call (``dynamic=True``: no static
    graph for the first batch shape, then a dynamic one), and the graphs of another dtype are dropped
    first (`torch._dynamo.reset`). What is left per class: one graph per attention variant (Gemma-2's
    sliding and full layers), and one more for 1-row batches, whose size Dynamo specialises.
    `compiles` counts them.
    """

    def __init__(self, model: nn.Module, count: int) -> None:
        self.layers = decoder_layers(model)
        dtype = next(model.parameters()).dtype
        if _LAST_DTYPE and _LAST_DTYPE[0] != dtype:
            torch._dynamo.reset()
        _LAST_DTYPE[:] = [dtype]
        # torch.compile of a module returns an OptimizedModule, itself an nn.Module
        self.compiled = {
            index: cast(nn.Module, torch.compile(self.layers[index], dynamic=True)) for index in range(max(count, 0))
        }

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


def compiles() -> int:
    """Frames Dynamo compiled in this process so far (a recompile adds one); compare before and after a run."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])
