"""Exact per-neuron sums, so an atlas's moments do not depend on how its batches were grouped.

Float addition is not associative: a single process adds batch sums ``((b0 + b1) + b2) + ...``, while
two ranks each add their own batches and then add the two totals, which rounds differently. To make
a sharded atlas (and `patchscope merge` of independent jobs) bit-identical to the single-process
one, every batch's float64 sum is split, exactly, into integer multiples of fixed powers of two
(limbs of 32 bits, from 2^32 down to 2^-96). Integer sums do not care about order or grouping; the
float64 moment is read back from the limbs in one fixed order.

The only rounding is the per-batch truncation below 2^-96, decided by the batch alone. Batch sums
too large for the limbs (beyond 2^84) or non-finite ones go to an ``excess`` row summed as plain
floats; it stays zero for any real activation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LIMB_BITS = 32
SHIFTS: tuple[int, ...] = (32, 0, -32, -64, -96)
"""Row ``i`` counts units of ``2**SHIFTS[i]``; the first (top) row is signed, the others lie in [0, 2^32)."""
LIMIT = 2.0**84
"""Largest batch sum split into limbs: the top row then stays below 2^52, exact in float64."""


@dataclass
class ExactSum:
    """A per-neuron sum kept exactly: ``parts[:-1]`` are the limb rows, ``parts[-1]`` the excess."""

    parts: Tensor  # [len(SHIFTS) + 1, *shape] float64; limb rows hold integers

    @classmethod
    def zeros(cls, *shape: int, device: torch.device | str = "cpu") -> ExactSum:
        return cls(torch.zeros(len(SHIFTS) + 1, *shape, dtype=torch.float64, device=device))

    @classmethod
    def of(cls, value: Tensor) -> ExactSum:
        """Split float64 sums (any shape) into limbs (exactly, down to 2^-96) and excess."""
        value = value.double()
        splittable = torch.isfinite(value) & (value.abs() < LIMIT)
        rest = torch.where(splittable, value, 0.0)
        rows = []
        for shift in SHIFTS:
            # trunc(rest / 2^s) * 2^s are rest's leading bits (same sign), so the subtraction is exact
            count = torch.trunc(rest * 2.0**-shift)  # scaling by a power of two is exact
            rest = rest - count * 2.0**shift
            rows.append(count)
        rows.append(torch.where(splittable, 0.0, value))
        return cls(torch.stack(rows))  # rows share the value's sign; the first `+` brings them to canonical form

    def __add__(self, other: ExactSum) -> ExactSum:
        """The canonical form of the sum (equal sums give equal ``parts``, however they were grouped)."""
        parts = self.parts + other.parts  # limb rows: integer sums below 2^53, exact
        return ExactSum(_carry(parts))

    def value(self) -> Tensor:  # [*shape] float64
        """The sum as float64, read from the top limb down (one fixed order)."""
        total = torch.zeros_like(self.parts[0])
        for row, shift in zip(self.parts, SHIFTS):
            total = total + row * 2.0**shift
        return total + self.parts[-1]

    def to(self, device: torch.device | str) -> ExactSum:
        return ExactSum(self.parts.to(device))


def _carry(parts: Tensor) -> Tensor:
    """Bring every limb row but the top into [0, 2^32) (rows may start in (-2^32, 2^33)); the result is unique."""
    parts = parts.clone()
    base = float(2**LIMB_BITS)
    for i in range(len(SHIFTS) - 1, 0, -1):
        carry = torch.floor(parts[i] / base)
        parts[i] -= carry * base
        parts[i - 1] += carry
    return parts
