"""What to profile and how to batch it."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import torch

from patchscope.atlas.batching import Overflow, Segment, plan
from patchscope.atlas.layer_selection import SiteKind, check_spelling, layer_sites, needs_count, parse_layers

Reduction = Literal["auto", "one_pass", "separate", "triton", "inductor"]
"""How the profiler reduces each batch to its statistics; every choice gives the same atlas."""


if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from patchscope.atlas.sources import Document


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
    layers: str = field(
        default="",
        metadata={
            "help": "Several layers in one forward pass, instead of --layer: all, a range 3-9, or a list 0,6,12 (each layer's "
            "--site-kind site; the pass stops after the deepest). Added to any --site given. See docs/whole-model.md."
        },
    )
    site_kind: SiteKind = field(default="mlp.hook_post", metadata={"help": "The per-block site that --layers profiles."})
    max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many counted tokens (at the end of the batch that reaches it), with a checkpoint: "
            "--resume, with a larger budget or none, continues to the atlas of one uninterrupted run."
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

    def plan(self, documents: Iterable[Document], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[Segment]]:
        """The batches this config cuts ``documents`` into (`batching.plan` with its length, overflow, BOS and
        batch settings): the profiler's, the quantile pass's, and any replay of them."""
        return plan(
            documents,
            tokenizer,
            max_length=self.max_length,
            overflow=self.overflow,
            exclude_bos=self.exclude_bos,
            batch_tokens=self.batch_tokens,
            sort_buffer=self.sort_buffer,
        )

    def site_names(self) -> tuple[str, ...]:
        """The sites profiled: those of `layers` then `sites`, else the MLP neurons of `layer`."""
        if self.layers:
            return tuple(dict.fromkeys((*layer_sites(parse_layers(self.layers), self.site_kind), *self.sites)))
        return self.sites or (f"blocks.{self.layer}.mlp.hook_post",)

    def for_model(self, n_layers: int) -> ProfileConfig:
        """This config with `layers` expanded into `sites` for a model of ``n_layers`` blocks, checked against it
        (``--layers all`` and ``--site`` spellings of the same sites then make the same run)."""
        if not self.layers:
            return self
        sites = layer_sites(parse_layers(self.layers, n_layers), self.site_kind)
        return dataclasses.replace(self, layers="", sites=tuple(dict.fromkeys((*sites, *self.sites))))

    @property
    def needs_layer_count(self) -> bool:
        return needs_count(self.layers)

    def validate(self) -> None:
        if self.layers:
            check_spelling(self.layers)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"`max_tokens` must be at least 1 (or unset: no budget), got {self.max_tokens}")
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
        """Bytes of the running state for sites of these widths: top-k and bottom-k slots (a float32
        value and three int64 indices each) and the histogram's int64 counts."""
        slots = ATLAS_BYTES_PER_SLOT * (self.top_k + self.bottom_k)
        bins = HISTOGRAM_BYTES_PER_NEURON if self.histogram else 0
        return (slots + bins) * sum(widths.values())

    def workspace_bytes(self, widths: Mapping[str, int], device: torch.device | str = "cpu") -> int:
        """Bytes of the CPU pass's reused buffers: two float32 and two int16 copies of the largest
        batch's activations (`kernels.cpu_pass.Workspace`), 12 bytes an entry; none off the CPU."""
        if torch.device(device).type != "cpu" or self.reduction == "separate" or not widths:
            return 0
        return WORKSPACE_BYTES_PER_ENTRY * self.batch_tokens * max(widths.values())

    def check_atlas_size(self, widths: Mapping[str, int], device: torch.device | str = "cpu", *, block_bytes: int = 0) -> None:
        """Refuse, before allocating, a state that cannot fit in the device's memory.

        The running state and the merge of new candidates into it are held at once (about twice
        `atlas_bytes`), beside the CPU pass's workspace (`workspace_bytes`). ``block_bytes``: the
        largest encoded SAE chunk a batch makes (`patchscope.atlas.feature_site.FeatureSite.block_bytes`),
        held, with as much again for its reduction, on top of that.
        """
        state, workspace = 2 * self.atlas_bytes(widths), self.workspace_bytes(widths, device) + 2 * block_bytes
        needed = state + workspace
        available = _memory_bytes(torch.device(device))
        if available is not None and needed > available // 2:
            blocks = f" (with {2 * block_bytes / 2**30:.2f} GiB of encoded SAE chunks)" if block_bytes else ""
            raise ValueError(
                f"the atlas state for {sum(widths.values())} neurons (`top_k` {self.top_k}, `bottom_k` {self.bottom_k}) "
                f"needs about {state / 2**30:.1f} GiB and the batch workspace{blocks} {workspace / 2**30:.1f} GiB, more "
                f"than half of the {available / 2**30:.1f} GiB of {torch.device(device).type} memory; lower "
                "`top_k`/`bottom_k` or `batch_tokens`"
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
HISTOGRAM_BYTES_PER_NEURON = 8 * 163  # kernels.histogram.N_BINS int64 counts (tests/test_profile_config.py checks the count)
WORKSPACE_BYTES_PER_ENTRY = 4 + 4 + 2 + 2  # float32 values and scratch, the histogram's int16 key and sign


def _memory_bytes(device: torch.device) -> int | None:
    """Total memory of a CUDA device, or the machine's physical memory for the CPU; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
