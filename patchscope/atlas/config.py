"""What to profile and how to batch it."""

from __future__ import annotations

from dataclasses import dataclass, field

from patchscope.atlas.batching import Overflow


@dataclass(frozen=True)
class ProfileConfig:
    """What to profile and how to batch it."""

    layer: int = 12
    """Layer whose MLP neurons (``blocks.L.mlp.hook_post``) are profiled when no --site is given."""
    sites: tuple[str, ...] = field(default=(), metadata={"flags": ("--site", "--sites")})
    """Explicit sites to profile instead of --layer; any number, any layers."""
    top_k: int = 20
    """Examples kept per neuron."""
    max_length: int = 128
    """Tokens per segment, BOS included (the original used 128)."""
    overflow: Overflow = "truncate"
    """Longer documents: truncate (as the original), or split into consecutive windows."""
    batch_tokens: int = 4096
    """Budget of padded tokens per batch."""
    exclude_bos: bool = True
    """Keep BOS positions out of the statistics (they dominate naive top lists)."""
    checkpoint_every: int = 50
    """Write a resumable checkpoint to the output directory every N batches (0: never)."""
    sort_buffer: int = 4096
    """Documents buffered and length-sorted together; bounds memory for streamed sources."""
    compile: bool = False
    """Run the layers before the profiled sites and the batch reduction under torch.compile, after a
    one-off compile (tens of seconds on a CPU); values agree with eager within relative 1e-5
    (float32) or 1e-2 (bfloat16). Whether it is faster depends on the machine: see benchmarks/RESULTS.md."""

    def site_names(self) -> tuple[str, ...]:
        return self.sites or (f"blocks.{self.layer}.mlp.hook_post",)

    def validate(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"`top_k` must be at least 1, got {self.top_k}")
        if self.max_length < 2:
            raise ValueError(f"`max_length` must be at least 2, got {self.max_length}")
        if self.batch_tokens < self.max_length:
            raise ValueError(f"`batch_tokens` ({self.batch_tokens}) must be at least `max_length` ({self.max_length})")
