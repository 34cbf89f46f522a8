"""SAE features as a site of their own: encoded at the SAE's site, in the neurons' forward pass.

A feature site is named ``{site}@sae-{label}`` (``blocks.5.hook_resid_post@sae-16k``). Its hook reads
the ``[batch, pos, d_in]`` activations at ``site``, encodes them in float32 on their device, a chunk
of tokens at a time, and hands each ``[chunk, d_sae]`` block to the same reductions as a neuron
site (`patchscope.atlas.engine.Profiler._reduce`): top-k, bottom-k, moments, histogram.

Memory: a 16k SAE over a 4,096-token batch is a ``[4096, 16384]`` float32 block, 256 MiB; chunks of
`ENCODE_BYTES` keep the block (and its reduction's temporaries) bounded whatever the batch.

The atlas layer knows no SAE class (`patchscope.sae` sits above it): a feature site takes any
``encode`` callable, and `patchscope.sae.features.feature_site` builds one from a `JumpReLUSAE`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from patchscope.atlas.profile_config import ProfileConfig

SEPARATOR = "@sae-"
ENCODE_BYTES = 64 * 2**20
"""Float32 bytes of one encoded chunk: 1,024 tokens of a 16k SAE."""


@dataclass(frozen=True)
class FeatureSite:
    """One SAE's features, profiled like neurons."""

    reads: str
    """The hook site whose activations the SAE encodes, e.g. ``blocks.5.hook_resid_post``."""
    label: str
    """Tells this SAE's features apart from another's at the same site (``16k``, a file stem)."""
    d_in: int
    """Width the SAE reads (the site's width)."""
    d_sae: int
    """Number of features."""
    encode: Callable[[Tensor], Tensor]
    """``[tokens, d_in]`` -> ``[tokens, d_sae]`` float32 feature activations, on the input's device."""
    identity: str = ""
    """What the SAE is (its file or hub location and content digest); part of the run's key."""
    neuronpedia: str | None = None
    """Neuronpedia source ``{model}/{source id}`` of the features, when the SAE is a known release."""
    encode_bytes: int = ENCODE_BYTES
    """Float32 bytes of one encoded chunk."""

    @property
    def name(self) -> str:
        return f"{self.reads}{SEPARATOR}{self.label}"

    @property
    def chunk_tokens(self) -> int:
        """Tokens encoded at once."""
        return max(1, self.encode_bytes // (4 * self.d_sae))

    def block_bytes(self, batch_tokens: int) -> int:
        """Float32 bytes of the largest encoded block a batch of ``batch_tokens`` makes."""
        return 4 * self.d_sae * min(batch_tokens, self.chunk_tokens)


def is_feature_site(name: str) -> bool:
    return SEPARATOR in name


def reads_of(name: str) -> str:
    """The hook site a feature site reads (a neuron site is its own)."""
    return name.split(SEPARATOR, 1)[0]


def check_features(features: Sequence[FeatureSite], widths: dict[str, int]) -> None:
    """Each SAE reads a site of its own width; no two share a name. ``widths``: ``{reads: width}`` from the model."""
    names = [f.name for f in features]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two SAEs would both be profiled as {twice[0]}; give them different labels")
    for feature in features:
        if widths[feature.reads] != feature.d_in:
            raise ValueError(
                f"the SAE {feature.identity or feature.label} reads d_in={feature.d_in} vectors, but {feature.reads} "
                f"has width {widths[feature.reads]}; pick an SAE trained on this model's site"
            )


def check_feature_run(features: Sequence[FeatureSite], config: ProfileConfig) -> None:
    """What a profile with SAE features cannot do yet, refused before any work."""
    if features and config.quantile_examples:
        raise ValueError(
            "`quantile_examples` with SAE features: the second pass re-reads neuron sites only; "
            "profile the features without quantile examples"
        )
