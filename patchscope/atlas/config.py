"""What to profile and how to batch it."""

from __future__ import annotations

from dataclasses import dataclass, field

from patchscope.atlas.batching import Overflow


@dataclass(frozen=True)
class ProfileConfig:
    """What to profile and how to batch it."""

    layer: int = field(
        default=12, metadata={"help": "Layer whose MLP neurons (blocks.L.mlp.hook_post) are profiled when no --site is given."}
    )
    sites: tuple[str, ...] = field(
        default=(), metadata={"help": "Explicit sites to profile instead of --layer; any number, any layers.", "flags": ("--site", "--sites")}
    )
    top_k: int = field(default=20, metadata={"help": "Examples kept per neuron."})
    max_length: int = field(default=128, metadata={"help": "Tokens per segment, BOS included (the original used 128)."})
    overflow: Overflow = field(
        default="truncate", metadata={"help": "Longer documents: truncate (as the original), or split into consecutive windows."}
    )
    batch_tokens: int = field(default=4096, metadata={"help": "Budget of padded tokens per batch."})
    exclude_bos: bool = field(
        default=True, metadata={"help": "Keep BOS positions out of the statistics (they dominate naive top lists)."}
    )
    checkpoint_every: int = field(
        default=50, metadata={"help": "Write a resumable checkpoint to the output directory every N batches (0: never)."}
    )
    sort_buffer: int = field(
        default=4096, metadata={"help": "Documents buffered and length-sorted together; bounds memory for streamed sources."}
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
