"""The atlas's per-neuron statistics, and the per-token fields a batch carries to the kernels that fill them.

A leaf module: it imports nothing of ours, so `kernels/` (below every other layer) can fill these
types without importing the rest of the atlas. The ranking rule the top-k follows is stated once, in
`patchscope.kernels.topk_merge`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TopK:
    """The k largest activations of each neuron so far, best first."""

    values: Tensor  # [k, n] float32
    doc: Tensor  # [k, n] int64, absolute document (row) index; -1 where empty
    pos: Tensor  # [k, n] int64, token position in the document (BOS = 0)
    token: Tensor  # [k, n] int64, token id

    @classmethod
    def empty(cls, k: int, n: int, device: torch.device | str = "cpu") -> TopK:
        return cls(
            values=torch.full((k, n), float("-inf"), device=device),
            doc=torch.full((k, n), -1, dtype=torch.long, device=device),
            pos=torch.zeros((k, n), dtype=torch.long, device=device),
            token=torch.zeros((k, n), dtype=torch.long, device=device),
        )

    @property
    def k(self) -> int:
        return self.values.shape[0]

    def to(self, device: torch.device | str) -> TopK:
        return TopK(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class Moments:
    """Per-neuron running counts and sums over every counted token."""

    fire_count: Tensor  # [n] int64, tokens with activation > 0
    total: Tensor  # [n] float64, sum of activations
    total_sq: Tensor  # [n] float64, sum of squared activations
    nonfinite: Tensor  # [n] int64, tokens whose activation was inf or nan (excluded from everything else)
    n_tokens: Tensor  # [] int64, tokens counted (the same for every neuron)

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu") -> Moments:
        return cls(
            fire_count=torch.zeros(n, dtype=torch.long, device=device),
            total=torch.zeros(n, dtype=torch.float64, device=device),
            total_sq=torch.zeros(n, dtype=torch.float64, device=device),
            nonfinite=torch.zeros(n, dtype=torch.long, device=device),
            n_tokens=torch.zeros((), dtype=torch.long, device=device),
        )

    def __add__(self, other: Moments) -> Moments:
        return Moments(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to(self, device: torch.device | str) -> Moments:
        return Moments(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass(frozen=True)
class TokenFields:
    """Where each of a batch's tokens comes from, flattened like its activations (``[tokens]`` each)."""

    doc: Tensor  # [tokens] int64, absolute document (row) index
    pos: Tensor  # [tokens] int64, position in the document (BOS = 0)
    token: Tensor  # [tokens] int64, token id
    counted: Tensor  # [tokens] bool, whether the token enters the statistics (not padding, not an excluded first slot)

    def to(self, device: torch.device | str) -> TokenFields:
        return TokenFields(*(getattr(self, f.name).to(device) for f in fields(self)))

    def __getitem__(self, rows: slice | Tensor) -> TokenFields:
        return TokenFields(*(getattr(self, f.name)[rows] for f in fields(self)))
