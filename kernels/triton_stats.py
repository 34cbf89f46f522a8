"""The fused batch pass as a Triton kernel: every statistic of ``[tokens, n]`` in one read.

Each program owns BLOCK_N neurons and a run of row blocks. It reads the activations once, in their
own dtype, converts to float32 in registers, masks uncounted and non-finite entries, and writes

- the largest rank key (`fused.entry_keys`: the value's bits over its rank by document and position)
  per BLOCK_ROWS rows, and with ``BOTTOM`` the same of the negated values: the exact top-k and
  bottom-k are read from the best blocks afterwards (`fused.exact_candidates`);
- the four column sums, as per-program partials (summed in float64 afterwards: no float atomics,
  so the moments do not depend on scheduling);
- with ``HISTOGRAM``, the bin of every usable entry (`histogram.bin_index`, from the float32 bits)
  as an atomic add into int32 ``[N_BINS, n]``: integer counts, the same in any order.

Offsets are computed in int64: ``row * stride`` passes 2**31 elements at about 233k tokens of
d_mlp 9,216. The launch runs under the activations' device (`launch_device`), so its stream is that
device's current stream, the one the model wrote them on.

Dispatched on CUDA only (`fused.resolve_backend`); ``tests/test_kernels.py`` runs it under
``TRITON_INTERPRET=1`` on the CPU against the plain references.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import triton
import triton.language as tl
from torch import Tensor

from .histogram import CENTER, LOG_BINS, LOW_KEY, MANTISSA_SHIFT, N_BINS
from .topk_merge_fast import BLOCK_ROWS

BLOCK_N = 128
"""Neurons per program: 128 contiguous bf16/fp32 values per row make full memory transactions."""
BLOCKS_PER_PROGRAM = 16
"""Row blocks per program (128 rows): enough programs to fill a GPU at 1k-4k tokens per batch."""


@triton.jit
def _block_stats_kernel(
    acts_ptr,
    counted_ptr,
    low_ptr,
    block_top_ptr,
    block_bottom_ptr,
    total_ptr,
    total_sq_ptr,
    fire_ptr,
    nonfinite_ptr,
    hist_ptr,
    tokens,
    n,
    n_blocks,
    stride_token,
    stride_neuron,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    BOTTOM: tl.constexpr,
    HISTOGRAM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1).to(tl.int64)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] int64
    col_ok = cols < n
    offsets = tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    total_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    fire = tl.zeros([BLOCK_N], dtype=tl.int32)
    nonfinite = tl.zeros([BLOCK_N], dtype=tl.int32)
    for i in range(BLOCKS_PER_PROGRAM):
        block = pid_t * BLOCKS_PER_PROGRAM + i  # int64
        rows = block * BLOCK_ROWS + offsets  # [BLOCK_ROWS] int64
        row_ok = rows < tokens
        counted = tl.load(counted_ptr + rows, mask=row_ok, other=0) != 0  # [BLOCK_ROWS]
        inside = row_ok[:, None] & col_ok[None, :]
        x = tl.load(acts_ptr + rows[:, None] * stride_token + cols[None, :] * stride_neuron, mask=inside, other=0.0).to(
            tl.float32
        )  # [BLOCK_ROWS, BLOCK_N]
        finite = (x == x) & (tl.abs(x) != float("inf"))
        usable = counted[:, None] & finite & inside
        kept = tl.where(usable, x, 0.0)
        total += tl.sum(kept, axis=0)
        total_sq += tl.sum(kept * kept, axis=0)
        fire += tl.sum((kept > 0).to(tl.int32), axis=0)
        nonfinite += tl.sum((counted[:, None] & inside & ~finite).to(tl.int32), axis=0)
        block_ok = (tl.zeros([BLOCK_N], dtype=tl.int64) + block) < n_blocks  # a vector mask: the interpreter wants one
        low = tl.load(low_ptr + rows, mask=row_ok, other=0)  # [BLOCK_ROWS] int64, the rank by (document, position)
        tl.store(block_top_ptr + block * n + cols, tl.max(_keys(x, usable, low), axis=0), mask=col_ok & block_ok)
        if BOTTOM:
            tl.store(block_bottom_ptr + block * n + cols, tl.max(_keys(-x, usable, low), axis=0), mask=col_ok & block_ok)
        if HISTOGRAM:
            _count_bins(hist_ptr, x, usable, cols, n, BLOCK_ROWS, BLOCK_N)
    tl.store(total_ptr + pid_t * n + cols, total, mask=col_ok)
    tl.store(total_sq_ptr + pid_t * n + cols, total_sq, mask=col_ok)
    tl.store(fire_ptr + pid_t * n + cols, fire, mask=col_ok)
    tl.store(nonfinite_ptr + pid_t * n + cols, nonfinite, mask=col_ok)


@triton.jit
def _count_bins(hist_ptr, x, usable, cols, n, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add each usable entry to its bin of ``hist [N_BINS, n]``, read from the bits of |x| as `histogram.bin_index`."""
    bits = x.to(tl.int32, bitcast=True)
    key = (bits & 0x7FFFFFFF) >> MANTISSA_SHIFT  # exponent and the top 2 mantissa bits of |x|
    magnitude = tl.minimum(tl.maximum(key - (LOW_KEY - 1), 0), LOG_BINS + 1)  # 0: near zero; 81: overflow
    sign = bits >> 31  # 0 or -1 (arithmetic shift)
    index = ((magnitude ^ sign) - sign + CENTER).to(tl.int64)  # CENTER -/+ magnitude
    tl.atomic_add(hist_ptr + index * n + cols[None, :], tl.full([BLOCK_ROWS, BLOCK_N], 1, tl.int32), mask=usable)


@triton.jit
def _keys(x, usable, low):
    """`fused.entry_keys` in registers: ``[BLOCK_ROWS, BLOCK_N]`` int64, NO_KEY where not usable."""
    x = tl.where(x == 0, 0.0, x)  # -0.0 ranks as the 0.0 it equals
    bits = x.to(tl.int32, bitcast=True)
    monotone = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    return tl.where(usable, (monotone << 32) | low[:, None], -9223372036854775807 - 1)


def launch_device(device: torch.device) -> AbstractContextManager:
    """The context a launch runs under: the tensor's CUDA device (so also its current stream).

    Triton launches on the *current* device and stream; under a device_map, or a process on
    ``cuda:1``, that is not where the activations live.
    """
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def triton_block_stats(acts: Tensor, counted: Tensor, low: Tensor, *, bottom: bool = False, histogram: bool = False):
    """`fused.BlockStats` of ``acts [tokens, n]`` (any float dtype, any strides) with ``counted [tokens]``
    bool and ``low [tokens]`` int64 (`fused.rank_keys`)."""
    from .fused import BlockStats

    tokens, n = acts.shape
    n_blocks = triton.cdiv(tokens, BLOCK_ROWS)
    programs = triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM)
    device = acts.device
    block_top = torch.empty((n_blocks, n), dtype=torch.int64, device=device)
    block_bottom = torch.empty_like(block_top) if bottom else block_top[:0]
    total = torch.empty((programs, n), dtype=torch.float32, device=device)
    total_sq = torch.empty_like(total)
    fire = torch.empty((programs, n), dtype=torch.int32, device=device)
    nonfinite = torch.empty_like(fire)
    counts = torch.zeros((N_BINS if histogram else 1, n), dtype=torch.int32, device=device)
    grid = (triton.cdiv(n, BLOCK_N), programs)
    with launch_device(device):
        _block_stats_kernel[grid](
            acts,
            counted.to(torch.uint8),
            low,
            block_top,
            block_bottom,
            total,
            total_sq,
            fire,
            nonfinite,
            counts,
            tokens,
            n,
            n_blocks,
            acts.stride(0),
            acts.stride(1),
            BLOCK_ROWS=BLOCK_ROWS,
            BLOCK_N=BLOCK_N,
            BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
            BOTTOM=bottom,
            HISTOGRAM=histogram,
        )
    return BlockStats(
        block_top,
        total.double().sum(0),
        total_sq.double().sum(0),
        fire.sum(0, dtype=torch.int64),
        nonfinite.sum(0, dtype=torch.int64),
        block_bottom if bottom else None,
        counts.T.long() if histogram else None,  # [n, N_BINS]
    )
