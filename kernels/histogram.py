"""Per-neuron activation histograms over bins fixed in advance, so shards merge by adding counts.

The bins (`N_BINS` = 163, the same for every site and model) are signed, log-spaced by magnitude:

- bin `CENTER` (81) holds ``|x| < 2**MIN_EXP`` (1/1024), zero included;
- bins ``CENTER + j`` for ``j = 1..80`` hold positive ``x`` with ``|x|`` in ``[lo_j, hi_j)``, where
  the edges are ``2**e * (1, 1.25, 1.5, 1.75)`` for ``e = MIN_EXP .. MAX_EXP - 1``: four bins per
  octave, from 1/1024 up to 1024;
- bin ``CENTER + 81`` (162) holds ``x >= 2**MAX_EXP``;
- bins ``CENTER - j`` mirror them for negative ``x`` (``|x|`` in the same ``[lo_j, hi_j)``).

The edges are exactly the float32 values whose exponent and top two mantissa bits change, so a
bin is read straight from the bits of the float32 activation (a shift and a clamp) instead of a
binary search (`torch.bucketize` is several times slower on a CPU). Non-finite and uncounted
tokens are not binned; non-finite ones are counted apart in `Moments.nonfinite`.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_EXP = -10
MAX_EXP = 10
STEPS_PER_OCTAVE = 4  # the top two mantissa bits
LOG_BINS = (MAX_EXP - MIN_EXP) * STEPS_PER_OCTAVE  # 80 per sign
CENTER = LOG_BINS + 1
N_BINS = 2 * CENTER + 1
MANTISSA_SHIFT = 23 - 2  # float32: 23 mantissa bits, keep the top 2
LOW_KEY = (127 + MIN_EXP) * STEPS_PER_OCTAVE  # (biased exponent, 2 mantissa bits) of 2**MIN_EXP
_NONFINITE_KEY = 255 * STEPS_PER_OCTAVE  # exponent all ones: inf or nan


def magnitude_edges() -> Tensor:
    """The lower edge of each positive log bin ``j = 1..80``, then ``2**MAX_EXP``: ``[81]`` float64."""
    steps = torch.arange(LOG_BINS + 1, dtype=torch.float64)
    exponent = torch.floor(steps / STEPS_PER_OCTAVE) + MIN_EXP
    return torch.pow(2.0, exponent) * (1 + (steps % STEPS_PER_OCTAVE) / STEPS_PER_OCTAVE)


def bin_ranges() -> tuple[Tensor, Tensor]:
    """``(low, high)`` of every bin, ``[N_BINS]`` float64 each, as half-open ranges of the value.

    Negative bins are ``(-hi, -lo]`` in value (``[lo, hi)`` in magnitude); the outermost bins
    reach ``-inf`` / ``+inf``; the centre bin is ``(-2**MIN_EXP, 2**MIN_EXP)``.
    """
    edges = magnitude_edges()  # [81]
    upper = torch.cat([edges[1:], torch.tensor([float("inf")], dtype=torch.float64)])  # [81]
    low = torch.cat([-upper.flip(0), -edges[:1], edges])
    high = torch.cat([-edges.flip(0), edges[:1], upper])
    return low, high


def bin_values() -> Tensor:
    """A representative value per bin, for plots: the midpoint, or the finite edge of an open bin."""
    low, high = bin_ranges()
    middle = (low + high) / 2
    middle[0], middle[-1] = high[0], low[-1]
    return middle


def bin_index(values: Tensor, counted: Tensor) -> Tensor:
    """The bin of every entry, ``[tokens, n]`` int64; uncounted and non-finite entries get ``N_BINS``.

    ``values``: float32 ``[tokens, n]``; ``counted``: ``[tokens]`` bool.
    """
    bits = values.contiguous().view(torch.int32)  # [tokens, n]
    key = (bits & 0x7FFFFFFF) >> MANTISSA_SHIFT  # exponent and 2 mantissa bits of |x|
    magnitude = (key - (LOW_KEY - 1)).clamp_(0, LOG_BINS + 1)  # 0: near zero; 81: overflow
    sign = bits >> 31  # 0 or -1
    index = ((magnitude ^ sign) - sign + CENTER).long()  # CENTER -/+ magnitude
    dropped = (key >= _NONFINITE_KEY) | ~counted.unsqueeze(1)
    return index.masked_fill_(dropped, N_BINS)


def batch_histogram(values: Tensor, counted: Tensor) -> Tensor:
    """Counts per neuron and bin of one batch: ``[n, N_BINS]`` int64. ``values``: float32 ``[tokens, n]``."""
    index = bin_index(values, counted)  # [tokens, n]
    counts = torch.zeros(N_BINS + 1, values.shape[1], dtype=torch.long, device=values.device)  # last row: dropped
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:N_BINS].T.contiguous()


def batch_histogram_reference(acts: Tensor, counted: Tensor) -> Tensor:
    """`batch_histogram` by comparing against every bin's range (slow; for the tests)."""
    values = acts.float()
    usable = counted.unsqueeze(1) & torch.isfinite(values)  # [tokens, n]
    low, high = (edge.float() for edge in bin_ranges())
    magnitude = values.abs()
    counts = []
    for b in range(N_BINS):
        if b == CENTER:
            inside = magnitude < high[b]
        elif b > CENTER:
            inside = (values >= low[b]) & (values < high[b])
        else:  # negative: |x| in [|high|, |low|)
            inside = (values < 0) & (magnitude >= -high[b]) & (magnitude < -low[b])
        counts.append((inside & usable).sum(0))
    return torch.stack(counts, dim=1)  # [n, N_BINS]


def empty_histogram(n: int, device: torch.device | str = "cpu") -> Tensor:
    return torch.zeros(n, N_BINS, dtype=torch.long, device=device)
