"""The fused batch pass as a Triton kernel: block maxima and moments in one read of ``[tokens, n]``.

Each program owns BLOCK_N neurons and a run of row blocks. It reads the activations once, in their
own dtype, converts to float32 in registers, masks uncounted and non-finite entries, writes one
maximum per BLOCK_ROWS rows, and accumulates the four column sums, written as per-program partials
(summed in float64 afterwards: no atomics, so the result does not depend on scheduling).

Dispatched on CUDA only (`fused.resolve_backend`); ``tests/test_kernels.py`` runs it under
``TRITON_INTERPRET=1`` on the CPU against the plain reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .topk_merge_fast import BLOCK_ROWS

BLOCK_N = 128
"""Neurons per program: 128 contiguous bf16/fp32 values per row make full memory transactions."""
BLOCKS_PER_PROGRAM = 16
"""Row blocks per program (128 rows): enough programs to fill a GPU at 1k-4k tokens per batch."""


@triton.jit
def _block_stats_kernel(
    acts_ptr,
    counted_ptr,
    block_max_ptr,
    total_ptr,
    total_sq_ptr,
    fire_ptr,
    nonfinite_ptr,
    tokens,
    n,
    n_blocks,
    stride_token,
    stride_neuron,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < n
    offsets = tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    total_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    fire = tl.zeros([BLOCK_N], dtype=tl.int32)
    nonfinite = tl.zeros([BLOCK_N], dtype=tl.int32)
    for i in range(BLOCKS_PER_PROGRAM):
        block = pid_t * BLOCKS_PER_PROGRAM + i
        rows = block * BLOCK_ROWS + offsets
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
        block_max = tl.max(tl.where(usable, x, float("-inf")), axis=0)
        block_ok = (tl.zeros([BLOCK_N], dtype=tl.int32) + block) < n_blocks  # a vector mask: the interpreter wants one
        tl.store(block_max_ptr + block * n + cols, block_max, mask=col_ok & block_ok)
    tl.store(total_ptr + pid_t * n + cols, total, mask=col_ok)
    tl.store(total_sq_ptr + pid_t * n + cols, total_sq, mask=col_ok)
    tl.store(fire_ptr + pid_t * n + cols, fire, mask=col_ok)
    tl.store(nonfinite_ptr + pid_t * n + cols, nonfinite, mask=col_ok)


def triton_block_stats(acts: Tensor, counted: Tensor):
    """`fused.BlockStats` of ``acts [tokens, n]`` (any float dtype) with ``counted [tokens]`` bool."""
    from .fused import BlockStats

    tokens, n = acts.shape
    n_blocks = triton.cdiv(tokens, BLOCK_ROWS)
    programs = triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM)
    device = acts.device
    block_max = torch.empty((n_blocks, n), dtype=torch.float32, device=device)
    total = torch.empty((programs, n), dtype=torch.float32, device=device)
    total_sq = torch.empty_like(total)
    fire = torch.empty((programs, n), dtype=torch.int32, device=device)
    nonfinite = torch.empty_like(fire)
    grid = (triton.cdiv(n, BLOCK_N), programs)
    _block_stats_kernel[grid](
        acts,
        counted.to(torch.uint8),
        block_max,
        total,
        total_sq,
        fire,
        nonfinite,
        tokens,
        n,
        n_blocks,
        acts.stride(0),
        acts.stride(1),
        BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_N=BLOCK_N,
        BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
    )
    return BlockStats(
        block_max,
        total.double().sum(0),
        total_sq.double().sum(0),
        fire.sum(0, dtype=torch.int64),
        nonfinite.sum(0, dtype=torch.int64),
    )
