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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from patchscope.atlas.atlas import Atlas

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


def sae_digest(identity: str) -> str:
    """The content digest of a `FeatureSite.identity` (``location#digest``): what the SAE *is*, wherever it lies,
    so that ``./sae`` and ``sae``, or a copy moved elsewhere, are one SAE to a resume, a reuse or a merge."""
    return identity.rpartition("#")[2]


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


def encoded_chunks(feature: FeatureSite, x: Tensor) -> Iterator[tuple[slice, Tensor]]:
    """``x`` (``[tokens, d_in]``, the site's activations) encoded a chunk of `FeatureSite.chunk_tokens` at a time:
    ``(rows, [chunk, d_sae] float32)``. The one encode path of both passes (`patchscope.atlas.engine`,
    `patchscope.atlas.quantile_pass`), so that the second pass cuts its intervals from the very values the first ranked."""
    for start in range(0, x.shape[0], feature.chunk_tokens):
        rows = slice(start, start + feature.chunk_tokens)
        yield rows, feature.encode(x[rows])


def features_of(atlas: Atlas, features: Sequence[FeatureSite]) -> dict[str, FeatureSite]:
    """The `FeatureSite` of each feature site of ``atlas``, checked against the SAE the atlas recorded
    (`patchscope.atlas.atlas.AtlasMeta.features`): a second pass must encode with the SAE the first pass profiled."""
    given = {feature.name: feature for feature in features}
    found: dict[str, FeatureSite] = {}
    for site in filter(is_feature_site, atlas.sites):
        if site not in given:
            raise ValueError(f"the atlas profiles the SAE features {site}: pass that SAE (`features`) to re-read them")
        recorded = atlas.meta.features.get(site)
        if recorded is not None and sae_digest(recorded) != sae_digest(given[site].identity):
            raise ValueError(f"{site} was profiled with the SAE {recorded}, not {given[site].identity}: pass that SAE")
        found[site] = given[site]
    return found
