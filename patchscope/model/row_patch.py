"""Patch each batch row at its own site: one batch can carry several target layers.

A Patchscope sweep writes source vectors at many target layers. Putting rows with different
target layers in one batch needs one `patch` hook per distinct site, each limited by a row mask to
the rows that target it; a row whose site is ``None`` runs unpatched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from patchscope.model.hooks import patch


@contextmanager
def patch_rows(model: nn.Module, sites: Sequence[str | None], vectors: Tensor, positions: Tensor) -> Iterator[None]:
    """Write ``vectors[i]`` at site ``sites[i]``, absolute position ``positions[i]``, in batch row ``i``.

    ``vectors`` is ``[batch, d]`` and ``positions`` ``[batch]``. Positions are absolute, as in
    `patch`: under a KV cache the write lands in the prefill and decode steps are left alone.
    """
    batch = len(sites)
    if vectors.shape[0] != batch or positions.shape[0] != batch:
        raise ValueError(f"{batch} sites but {vectors.shape[0]} vectors and {positions.shape[0]} positions")
    values = vectors.unsqueeze(1)  # [batch, 1, d]
    where = positions.view(batch, 1)  # [batch, 1]
    with ExitStack() as stack:
        for site in dict.fromkeys(s for s in sites if s is not None):
            rows = torch.tensor([s == site for s in sites])
            stack.enter_context(patch(model, site, values, positions=where, rows=rows))
        yield
