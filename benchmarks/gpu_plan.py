"""What `benchmarks.gpu` measures (`Plan`) and what each of its checks leaves (`Row`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Row:
    """One line of the check: a measured value, and for correctness rows whether it passed."""

    section: str
    name: str
    value: float | None = None
    unit: str = ""
    ok: bool | None = None  # None: a measurement (or a skipped check), not a pass/fail
    note: str = ""


@dataclass
class Plan:
    """What this run measures, chosen once from --dry-run and the device."""

    device: str
    dry_run: bool
    shape: str  # benchmarks.common.SHAPES key for the speed sections
    dtypes: tuple[torch.dtype, ...]
    layer: int  # the profiled layer of the single-site speed rows
    batch: int  # rows per batch
    seq_len: int
    n_batches: int
    warmup: int
    runs: int

    @classmethod
    def of(cls, device: str, dry_run: bool) -> Plan:
        if dry_run:
            return cls(device, True, "tiny", (torch.bfloat16, torch.float16), 2, 4, 16, 2, 0, 1)
        return cls(device, False, "gemma-2-2b-shape", (torch.bfloat16, torch.float16), 12, 16, 256, 8, 1, 5)
