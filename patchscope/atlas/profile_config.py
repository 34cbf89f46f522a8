"""What to profile and how to batch it."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from patchscope.atlas.batching import Overflow

Reduction = Literal["auto", "one_pass", "separate", "triton", "inductor"]
"""How the profiler reduces each batch to its statistics; every choice gives the same atlas."""


@dataclass(frozen=True)
class ProfileConfig:
    """What to profile and how to batch it."""

    layer: int = field(
        default=12, metadata={"help": "Layer whose MLP neurons (blocks.L.mlp.hook_post) are profiled when no --site is given."}
    )
    sites: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Explicit sites to profile instead of --layer; any number, any layers.",
            "flags": ("--site", "--sites"),
        },
    )
    top_k: int = field(default=20, metadata={"help": "Examples kept per neuron."})
    max_length: int = field(default=128, metadata={"help": "Tokens per segment, BOS included (the original used 128)."})
    overflow: Overflow = field(
        default="truncate", metadata={"help": "Longer documents: truncate (as the original), or split into consecutive windows."}
    )
    batch_tokens: int = field(default=4096, metadata={"help": "Budget of padded tokens per batch."})
    exclude_bos: bool = field(
        default=True,
        metadata={
            "help": "Keep each segment's first position out of the statistics: the BOS token, or where the tokenizer adds "
            "none (SmolLM2) the first token, an attention sink. Either dominates naive top lists.",
            "flags": ("--exclude-bos", "--exclude-first"),
        },
    )
    checkpoint_every: int = field(
        default=50, metadata={"help": "Write a resumable checkpoint to the output directory every N batches (0: never)."}
    )
    sort_buffer: int = field(
        default=4096,
        metadata={
            "help": "Documents buffered and length-sorted together (blocks of consecutive row indices); bounds memory for streamed "
            "sources. Blocks are also what the ranks of a torchrun job share out."
        },
    )
    compile: bool = field(
        default=False,
        metadata={
            "help": "Run the layers before the profiled sites (and, on a GPU, the batch reduction) under torch.compile, after a one-off "
            "compile (tens of seconds on a CPU); values agree with eager within relative 1e-5 (float32) or 1e-2 (bfloat16). "
            "Whether it is faster depends on the machine: see benchmarks/RESULTS.md."
        },
    )
    reduction: Reduction = field(
        default="auto",
        metadata={
            "help": "How each batch is reduced to its statistics; all give the same atlas, at different speeds "
            "(benchmarks/RESULTS.md). auto: one_pass on the CPU, triton on a CUDA GPU where Triton imports, inductor "
            "under --compile on a GPU, else separate. one_pass: one CPU pass over the batch (patchscope.kernels.cpu_pass; "
            "CPU only). separate: the plain-torch kernels, one per statistic. triton: the fused Triton kernel (CUDA only). "
            "inductor: the fused reduction under torch.compile."
        },
    )
    bottom_k: int = field(default=20, metadata={"help": "Most negative examples kept per neuron (0: none)."})
    histogram: bool = field(
        default=True,
        metadata={"help": "Record a per-neuron activation histogram over fixed log-spaced bins (patchscope.kernels.histogram)."},
    )
    quantile_examples: int = field(
        default=0,
        metadata={
            "help": "Examples kept in each of 5 activation intervals below the maximum; a second pass over the data (0: none)."
        },
    )

    def site_names(self) -> tuple[str, ...]:
        return self.sites or (f"blocks.{self.layer}.mlp.hook_post",)

    def validate(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"`top_k` must be at least 1, got {self.top_k}")
        if self.max_length < 2:
            raise ValueError(f"`max_length` must be at least 2, got {self.max_length}")
        if self.batch_tokens < self.max_length:
            raise ValueError(f"`batch_tokens` ({self.batch_tokens}) must be at least `max_length` ({self.max_length})")
        if self.bottom_k < 0 or self.quantile_examples < 0:
            raise ValueError(
                f"`bottom_k` ({self.bottom_k}) and `quantile_examples` ({self.quantile_examples}) must be 0 (off) or positive"
            )
        if self.sort_buffer < 1:
            raise ValueError(f"`sort_buffer` must be at least 1 document, got {self.sort_buffer}")
        if self.checkpoint_every < 0:
            raise ValueError(f"`checkpoint_every` must be 0 (never) or a number of batches, got {self.checkpoint_every}")
        if self.reduction not in get_args(Reduction):
            raise ValueError(f"`reduction` must be one of {', '.join(get_args(Reduction))}; got {self.reduction!r}")

    def atlas_bytes(self, widths: Mapping[str, int]) -> int:
        """Bytes of the top-k state for sites of these widths (a float32 value and three int64 indices per slot)."""
        return ATLAS_BYTES_PER_SLOT * self.top_k * sum(widths.values())

    def check_atlas_size(self, widths: Mapping[str, int], device: torch.device | str = "cpu", *, block_bytes: int = 0) -> None:
        """Refuse, before allocating, a top-k state that cannot fit in the device's memory.

        The running state and the merge of new candidates into it are held at once: about twice
        `atlas_bytes`. ``block_bytes``: the largest encoded SAE chunk a batch makes
        (`patchscope.atlas.feature_site.FeatureSite.block_bytes`), held, with as much again for its
        reduction, on top of that.
        """
        needed = 2 * self.atlas_bytes(widths) + 2 * block_bytes
        available = _memory_bytes(torch.device(device))
        if available is not None and needed > available // 2:
            blocks = f" and {2 * block_bytes / 2**30:.2f} GiB of encoded SAE chunks" if block_bytes else ""
            raise ValueError(
                f"`top_k` {self.top_k} over {sum(widths.values())} neurons{blocks} needs about {needed / 2**30:.1f} GiB, "
                f"more than half of the {available / 2**30:.1f} GiB of {torch.device(device).type} memory; lower `top_k`"
            )

    def capped_for(self, n_documents: int | None, *, warn: bool = True) -> ProfileConfig:
        """This config with `top_k` capped at the tokens ``n_documents`` can hold (with a warning).

        A longer list could never fill: truncated documents give at most `max_length` counted tokens each.
        """
        if not n_documents or self.overflow != "truncate":
            return self  # unknown, or empty (which the source reports itself)
        most = n_documents * self.max_length
        if self.top_k <= most:
            return self
        if warn:
            warnings.warn(
                f"`top_k` {self.top_k} is more than the at most {most} tokens of {n_documents} documents "
                f"of up to {self.max_length} tokens; keeping top {most}",
                RuntimeWarning,
                stacklevel=2,
            )
        return dataclasses.replace(self, top_k=most)


ATLAS_BYTES_PER_SLOT = 4 + 3 * 8


def _memory_bytes(device: torch.device) -> int | None:
    """Total memory of a CUDA device, or the machine's physical memory for the CPU; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
