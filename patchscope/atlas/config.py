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
    bottom_k: int = 20
    """Most negative examples kept per neuron (0: none)."""
    histogram: bool = True
    """Record a per-neuron activation histogram over fixed log-spaced bins (patchscope.kernels.histogram)."""
    quantile_examples: int = 0
    """Examples kept in each of 5 activation intervals below the maximum; a second pass over the data (0: none)."""

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
